"""The table assembler in benchmarks/: rows are taken by label from result files, never chosen silently."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _gram_table():
    spec = importlib.util.spec_from_file_location("gram_table", ROOT / "benchmarks" / "gram_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _result(path: Path, labels: dict[str, float]) -> str:
    path.write_text(json.dumps({"seeds": [1, 2, 3], "results": {k: {"average": {"hm": v}} for k, v in labels.items()}}))
    return str(path)


def test_collect_takes_rows_by_label_and_refuses_a_silent_choice(tmp_path):
    g = _gram_table()
    a = _result(tmp_path / "a.json", {"cocoop": 0.1, "cocoop + GRAM": 0.2})
    b = _result(tmp_path / "b.json", {"cocoop + GRAM": 0.3})
    with pytest.raises(SystemExit, match="'cocoop \\+ GRAM' is in a.json and b.json"):
        g._collect([a, b])
    rows = g._collect([a + ":cocoop", b])
    assert {k: v["average"]["hm"] for k, v in rows.items()} == {"cocoop": 0.1, "cocoop + GRAM": 0.3}
    assert rows["cocoop + GRAM"]["_file"] == "b.json"
    with pytest.raises(SystemExit, match="has no rows \\['vpt'\\]"):
        g._collect([a + ":vpt"])


def test_tta_benchmark_refuses_an_artifact_of_another_recipe(tmp_path):
    import argparse

    spec = importlib.util.spec_from_file_location("tta_bench", ROOT / "benchmarks" / "tta.py")
    tta = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tta)

    class _Backbone:
        ident = "gramvl-small:test"

    art = tmp_path / "meta_tta.safetensors"
    art.write_bytes(b"")
    # an artifact made before session 12: its sidecar names neither the guard nor the anchor (both were off)
    art.with_suffix(".json").write_text(json.dumps({"backbone": "gramvl-small:test", "config": {
        "views": 16, "selection": 0.125, "outer_lr_phi": 0.01}}))
    args = dict(tta_artifact=None, work=str(tmp_path), meta_steps=240, meta_budget=3000.0, meta_views=16,
                meta_lr_phi=0.01, meta_min_cos=-1.0, retrain=False, model="small", quiet=True)
    assert tta.tta_artifact(argparse.Namespace(meta_theta_anchor=0.0, **args), _Backbone())[0] == art
    with pytest.raises(SystemExit, match="theta_anchor 0.0 \\(asked 0.25\\).*--retrain"):
        tta.tta_artifact(argparse.Namespace(meta_theta_anchor=0.25, **args), _Backbone())


def test_scale_optimum_rows_are_the_image_to_text_half_of_the_training_loss():
    import torch

    from gramvl.pretrain import contrastive_loss, positive_matrix

    spec = importlib.util.spec_from_file_location("scale_optimum", ROOT / "benchmarks" / "scale_optimum.py")
    so = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(so)
    g = torch.Generator().manual_seed(0)
    logits = 10 * torch.randn(6, 6, generator=g)
    pos = positive_matrix(torch.tensor([0, 1, 1, 2, 3, 3]), None, None)  # rows 1-2 and 4-5 have two positives
    rows = so.image_to_text_rows(logits, pos)
    cols = so.image_to_text_rows(logits.T, pos.T)
    assert rows.shape == (6,)
    assert torch.allclose(0.5 * (rows.mean() + cols.mean()), contrastive_loss(logits, pos))
    # a row with one positive is plain cross-entropy on it
    assert torch.allclose(rows[0], torch.nn.functional.cross_entropy(logits[:1], torch.tensor([0])))


def test_scale_geometry_cone_is_an_affine_map_that_leaves_the_loss_unchanged_at_the_rescaled_scale(monkeypatch):
    import torch
    import torch.nn.functional as F

    from gramvl.pretrain import contrastive_loss, positive_matrix

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # it imports scale_optimum, as a script run there does
    spec = importlib.util.spec_from_file_location("scale_geometry", ROOT / "benchmarks" / "scale_geometry.py")
    sg = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sg)
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(8, 16, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(img + 0.8 * torch.randn(8, 16, generator=g, dtype=torch.float64), dim=-1)
    pos = positive_matrix(torch.tensor([0, 1, 1, 2, 3, 4, 5, 6]), None, None)
    a2 = 0.3
    ci, ct = sg.append_cone(img, a2), sg.append_cone(txt, a2)
    assert ci.shape == (8, 17) and torch.allclose(ci.norm(dim=1), torch.ones(8, dtype=torch.float64))
    cos, cos_cone = img @ txt.T, ci @ ct.T
    assert torch.allclose(cos_cone, a2 * cos + (1 - a2))
    for s in (5.0, 35.0):
        assert torch.allclose(contrastive_loss(s / a2 * cos_cone, pos), contrastive_loss(s * cos, pos))
    # the same features at the unrescaled scale give another loss: the map changes the scale, not the predictions
    assert not torch.allclose(contrastive_loss(35.0 * cos_cone, pos), contrastive_loss(35.0 * cos, pos))
    # the participation ratio counts the dimensions a set of features uses
    flat = torch.zeros(50, 4, dtype=torch.float64)
    flat[:, 0] = torch.randn(50, generator=g, dtype=torch.float64)
    assert abs(sg.participation_ratio(flat) - 1.0) < 1e-9
    assert sg.participation_ratio(torch.randn(4000, 4, generator=g, dtype=torch.float64)) > 3.8


@pytest.mark.parametrize("item, message", [("no_such_field=1", "unknown MetaConfig field"),
                                           ("steps=5", "have their own options")])
def test_meta_seed_spread_refuses_a_meta_set_it_cannot_apply(item, message):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "meta_seed_spread.py"), "--meta-set", item],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and message in out.stderr
