"""The command line: one clear error line per bad input, and the zero-shot record contract."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from gramvl.cli import main


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory, small_random_backbone):
    from gramvl.io import save_tensors

    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    sd = {k: v for k, v in small_random_backbone.model.state_dict().items() if not k.endswith("attn_mask")}
    save_tensors(path, sd, small_random_backbone.meta)
    return path


def make_folder(root, classes=("red apple", "blue car"), per=2, corrupt=False):
    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        for c in classes:
            d = root / split / c.replace(" ", "_")
            d.mkdir(parents=True)
            for i in range(per):
                Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(d / f"{i}.png")
    if corrupt:
        (root / "test" / classes[0].replace(" ", "_") / "bad.png").write_bytes(b"\x89PNG not really")
    return root


def run(capsys, *argv):
    code = main(["--quiet", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_zeroshot_on_a_folder_dataset_writes_the_record(tmp_path, capsys, small_ckpt):
    root = make_folder(tmp_path / "ds")
    code, out, _ = run(capsys, "zeroshot", "--model", str(small_ckpt), "--dataset", f"folder:{root}",
                       "--json", str(tmp_path / "r.json"))
    assert code == 0 and "accuracy" in out
    rec = json.loads((tmp_path / "r.json").read_text())
    assert 0.0 <= rec["metrics"]["accuracy"] <= 1.0 and rec["metrics"]["num_classes"] == 2
    assert set(rec) >= {"metrics", "config", "versions", "seconds"}
    assert rec["versions"]["torch"] == torch.__version__
    assert rec["environment"]["threads"] == torch.get_num_threads() and rec["environment"]["cpu"]


def test_unknown_dataset_is_one_clear_error(capsys):
    code, _, err = run(capsys, "zeroshot", "--dataset", "no-such-dataset")
    assert code == 2
    assert err.count("\n") == 1 and "unknown dataset 'no-such-dataset'" in err


def test_wrong_folder_layout_is_one_clear_error(tmp_path, capsys):
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "a.png")
    code, _, err = run(capsys, "zeroshot", "--dataset", f"folder:{tmp_path / 'flat'}")
    assert code == 2 and "wrong folder layout" in err and err.count("\n") == 1


def test_corrupt_image_is_one_clear_error_naming_the_file(tmp_path, capsys, small_ckpt):
    root = make_folder(tmp_path / "ds", corrupt=True)
    code, _, err = run(capsys, "zeroshot", "--model", str(small_ckpt), "--dataset", f"folder:{root}")
    assert code == 2 and "corrupt or unreadable image" in err and "bad.png" in err


def test_missing_weights_file_is_one_clear_error(tmp_path, capsys):
    root = make_folder(tmp_path / "ds")
    code, _, err = run(capsys, "zeroshot", "--model", "ViT-B-32", "--weights", str(tmp_path / "none.pt"),
                       "--dataset", f"folder:{root}")
    assert code == 2 and "weights file not found" in err and "never downloads" in err


def test_template_without_placeholder_is_rejected(tmp_path, capsys, small_ckpt):
    root = make_folder(tmp_path / "ds")
    code, _, err = run(capsys, "zeroshot", "--model", str(small_ckpt), "--dataset", f"folder:{root}",
                       "--template", "a photo")
    assert code == 2 and "placeholder" in err


def test_train_then_eval_round_trip_on_a_folder_dataset(tmp_path, capsys, small_ckpt):
    root = make_folder(tmp_path / "ds", per=3)
    out = tmp_path / "run"
    code, _, err = run(capsys, "train", "--model", str(small_ckpt), "--method", "coop", "--dataset",
                       f"folder:{root}", "--shots", "2", "--epochs", "2", "--out", str(out),
                       "--set", "host.n_ctx=4", "host.ctx_init='a photo of a'")
    assert code == 0, err
    rec = json.loads((out / "record.json").read_text())
    assert rec["config"]["host"]["n_ctx"] == 4 and rec["train"]["epochs"] == 2
    code, _, err = run(capsys, "eval", "--model", str(small_ckpt), "--prompt", str(out / "prompt.safetensors"),
                       "--dataset", f"folder:{root}", "--json", str(tmp_path / "e.json"))
    assert code == 0, err
    assert json.loads((tmp_path / "e.json").read_text())["metrics"]["accuracy"] == rec["metrics"]["accuracy"]


def test_command_line_of_a_benchmark_quotes_what_the_shell_would_split(tmp_path, monkeypatch):
    from gramvl.engine.results import command_line

    assert command_line(["benchmarks/x.py", "--set", "ctx_init=a photo of a", "n_ctx=4"]) == (
        "python benchmarks/x.py --set 'ctx_init=a photo of a' n_ctx=4")
    monkeypatch.chdir(tmp_path)
    assert command_line([str(tmp_path / "benchmarks" / "y.py"), "--name", "z"]) == "python benchmarks/y.py --name z"


def test_protocol_resumes_from_its_records_but_never_reuses_another_runs(tmp_path, capsys, small_ckpt):
    # a record made with another GRAM artifact at the same path (a re-run meta-training) used to be reused
    # silently; it is now an error naming what differs
    from gramvl.backbone import load_backbone
    from gramvl.gram.meta import ARTIFACT_FORMAT
    from gramvl.io import save_tensors

    root = make_folder(tmp_path / "ds", per=2)
    bb = load_backbone(str(small_ckpt))
    art = tmp_path / "gram.safetensors"

    def write_artifact(value):
        save_tensors(art, {"theta.text_ctx": torch.full((4, bb.text_width), value)},
                     {"format": ARTIFACT_FORMAT, "backbone": bb.ident, "host": "coop", "regulator": None,
                      "slots": {"text_ctx": [4, bb.text_width]}})

    write_artifact(0.01)
    out = tmp_path / "run"
    argv = ["protocol", "fewshot", "--method", "coop", "--model", str(small_ckpt), "--datasets", f"folder:{root}",
            "--seeds", "1", "--shots", "1", "--epochs", "1", "--gram", str(art), "--out", str(out),
            "--set", "host.n_ctx=4"]
    code, _, err = run(capsys, *argv)
    assert code == 0, err
    record = out / "records" / next(p.name for p in (out / "records").iterdir())
    first = json.loads(record.read_text())
    assert first["unit_identity"]["gram"]
    code, _, err = run(capsys, *argv)  # the same run again: the record is reused as it is
    assert code == 0, err
    assert json.loads(record.read_text()) == first
    write_artifact(0.02)  # another artifact at the same path
    code, _, err = run(capsys, *argv)
    assert code == 2 and "was made by another run (different GRAM artifact)" in err
    assert json.loads(record.read_text()) == first  # nothing overwritten


def test_protocol_names_a_corrupt_record_and_a_missing_artifact(tmp_path, capsys, small_ckpt):
    root = make_folder(tmp_path / "ds", per=2)
    out = tmp_path / "run"
    argv = ["protocol", "fewshot", "--method", "zeroshot", "--model", str(small_ckpt), "--datasets",
            f"folder:{root}", "--seeds", "1", "--shots", "1", "--out", str(out)]
    code, _, err = run(capsys, *argv)
    assert code == 0, err
    record = next((out / "records").iterdir())
    record.write_text("{not json")
    code, _, err = run(capsys, *argv)
    assert code == 2 and f"corrupt record {record}" in err
    code, _, err = run(capsys, "protocol", "fewshot", "--method", "coop", "--model", str(small_ckpt),
                       "--datasets", f"folder:{root}", "--seeds", "1", "--shots", "1",
                       "--gram", str(tmp_path / "absent.safetensors"), "--out", str(tmp_path / "run2"))
    assert code == 2 and "GRAM artifact not found" in err and "absent.safetensors" in err


def test_zeroshot_loss_is_the_cross_entropy_of_the_models_scaled_logits(tmp_path, small_random_backbone):
    """The record's loss is what a prompt-tuning run starts from: CE of logit_scale * cos, compared to log C."""
    import math

    from gramvl.data.features import image_features
    from gramvl.data.registry import get_dataset
    from gramvl.engine.evaluate import evaluate_zeroshot, zeroshot_weights

    ds = get_dataset(f"folder:{make_folder(tmp_path / 'ds')}", "test")
    m = evaluate_zeroshot(small_random_backbone, ds, progress=False, cache=False)
    feats, labels = image_features(small_random_backbone, ds, progress=False, cache=False)
    w = zeroshot_weights(small_random_backbone, ds.classnames, ("a photo of a {}.",))
    scale = float(small_random_backbone.logit_scale)
    logp = torch.log_softmax(scale * feats @ w.T, dim=1)
    expected = float(-logp[torch.arange(len(labels)), labels].mean())
    assert m["loss"] == pytest.approx(expected, rel=1e-5)
    assert m["uniform_loss"] == pytest.approx(math.log(2))
    # a different scale gives a different loss: the metric does use the model's own scale
    assert abs(float(torch.nn.functional.cross_entropy(2 * scale * feats @ w.T, labels)) - m["loss"]) > 1e-6


def test_cached_features_are_encoded_on_one_thread_whatever_the_runs_thread_count(tmp_path, small_random_backbone,
                                                                                   monkeypatch):
    """A cache outlives the run that filled it, so its bytes must not depend on that run's thread count (float
    sums do): every batch of features that a cache keeps is encoded on one intra-op thread, the run's threads
    encoding that many batches at once, and the run's own count is restored afterwards."""
    from gramvl.data.features import image_features
    from gramvl.data.registry import get_dataset
    from gramvl.gram.corpus import encode_corpus

    monkeypatch.setenv("GRAMVL_HOME", str(tmp_path / "home"))
    bb = small_random_backbone
    ds = get_dataset(f"folder:{make_folder(tmp_path / 'ds', per=5)}", "test")
    pairs = [{"image": p, "caption": f"a picture of {ds.classnames[y]}"} for p, y in ds.samples]
    seen = []
    encode_image = bb.encode_image

    def spy(x):
        seen.append((torch.get_num_threads(), torch.is_grad_enabled()))
        return encode_image(x)

    monkeypatch.setattr(bb, "encode_image", spy)
    before = torch.get_num_threads()
    try:
        out = {}
        for threads in (2, 1):
            torch.set_num_threads(threads)
            out[threads] = (image_features(bb, ds, batch_size=3, progress=False, cache=False)[0],
                            image_features(bb, ds, train_views=2, seed=1, batch_size=3, progress=False,
                                           cache=False)[0],
                            np.asarray(encode_corpus(bb, pairs, batch_size=3, cache=False, progress=False,
                                                     workers=0).zI))
            assert torch.get_num_threads() == threads
        assert len(seen) >= 20 and set(seen) == {(1, False)}, seen  # one intra-op thread, no autograd graph
        assert torch.equal(out[1][0], out[2][0]) and torch.equal(out[1][1], out[2][1])
        assert np.array_equal(out[1][2], out[2][2])
    finally:
        torch.set_num_threads(before)


def test_cached_features_do_not_depend_on_the_batch_size(tmp_path, small_random_backbone, monkeypatch):
    """A cache key does not record the batch size, and torchrun splits the data over processes: a dataset's
    features must be the same whatever batches it is cut into, the last short one included (batches of 1-3
    rows take other matmul kernels on the CPU; `pad_rows`)."""
    from gramvl.data.features import image_features
    from gramvl.data.registry import get_dataset

    monkeypatch.setenv("GRAMVL_HOME", str(tmp_path / "home"))
    ds = get_dataset(f"folder:{make_folder(tmp_path / 'ds', per=5)}", "test")
    n = len(ds)
    feats = {bs: image_features(small_random_backbone, ds, batch_size=bs, progress=False, cache=False)[0]
             for bs in (n, n - 1, 3, 2, 1)}
    for bs, f in feats.items():
        assert torch.equal(f, feats[n]), f"batches of {bs} (dataset of {n})"


def test_cache_fill_map_keeps_order_raises_and_restores_the_thread_count():
    import random
    import time

    from gramvl.paths import cache_fill_map

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)

        def slow_square(i):
            time.sleep(random.random() * 0.01)
            return i * i, torch.get_num_threads()

        got = list(cache_fill_map(slow_square, range(20), "cpu"))
        assert [r for r, _ in got] == [i * i for i in range(20)] and {t for _, t in got} == {1}
        assert torch.get_num_threads() == 2

        def boom(i):
            if i == 5:
                raise ValueError("bad item 5")
            return i

        with pytest.raises(ValueError, match="bad item 5"):
            list(cache_fill_map(boom, range(10), "cpu"))
        assert torch.get_num_threads() == 2
        assert list(cache_fill_map(str, [1, 2], "meta")) == ["1", "2"]  # off the CPU: a plain map
        with torch.no_grad():  # grad mode is thread-local: the calls get the caller's
            assert set(cache_fill_map(lambda _: torch.is_grad_enabled(), range(4), "cpu")) == {False}
        assert set(cache_fill_map(lambda _: torch.is_grad_enabled(), range(4), "cpu")) == {True}
    finally:
        torch.set_num_threads(before)


def test_demo_meta_trains_afresh_instead_of_resuming_an_earlier_demos_checkpoint(tmp_path, monkeypatch):
    """A finished meta-training checkpoint is resumed at its last step (nothing re-run) when its data match, so
    the demo clears its own scratch artifact first: its 'meta-trained now' row is always meta-trained now."""
    import gramvl.gram.pipeline as pipeline
    from gramvl.demo import gram_demo

    for name in ("gram_coop.ckpt.safetensors", "gram_coop.ckpt.json", "gram_coop.safetensors", "gram_coop.json"):
        (tmp_path / name).write_text("from an earlier demo")
    (tmp_path / "zeroshot.md").write_text("kept")

    class Reached(Exception):
        pass

    def fake_meta_train(job, out, bb=None):
        assert not list(tmp_path.glob("gram_coop.*")), "an earlier demo's artifact or checkpoint is still there"
        raise Reached

    monkeypatch.setattr(pipeline, "run_meta_train", fake_meta_train)
    with pytest.raises(Reached):
        gram_demo(None, tmp_path, quick=True)
    assert (tmp_path / "zeroshot.md").read_text() == "kept"


def test_cache_command_lists_and_prunes_only_the_entries_no_run_serves(tmp_path, small_random_backbone, capsys,
                                                                        monkeypatch):
    """Each cache entry records how it was made; the entries made under earlier rules are stale (their keys are
    never asked for again) and `gramvl cache --prune` deletes those, and nothing else."""
    import shutil

    from gramvl.caches import scan
    from gramvl.data.features import image_features
    from gramvl.data.registry import get_dataset
    from gramvl.gram.cmhc import CMHCConfig
    from gramvl.gram.corpus import encode_corpus
    from gramvl.gram.pipeline import build_hierarchy
    from gramvl.tta.meta_tta import ViewFeatureCache

    home = tmp_path / "home"
    monkeypatch.setenv("GRAMVL_HOME", str(home))
    bb = small_random_backbone
    ds = get_dataset(f"folder:{make_folder(tmp_path / 'ds', per=3)}", "test")
    image_features(bb, ds, progress=False)  # current entries, one of each kind, written by gramvl itself
    pairs = [{"image": p, "caption": f"a {ds.classnames[y]}"} for p, y in ds.samples]
    feats = encode_corpus(bb, pairs, batch_size=4, progress=False, workers=0)
    build_hierarchy(feats, "flat", CMHCConfig(k1=2, min_children=2, max_children=2, leaf_min_size=1,
                                              use_faiss=False), progress=False)
    ViewFeatureCache(bb, [p for p, _ in ds.samples], views=2)
    c = home / "cache"
    # the same entries as an earlier session wrote them: no fill, or the session-15 fill
    for kind, field in (("features", "fill"), ("cmhc", "cluster_fill")):
        src = next((c / kind).glob("*.safetensors"))
        shutil.copy(src, c / kind / "old.safetensors")
        side = json.loads(src.with_suffix(".json").read_text())
        side.pop(field)
        (c / kind / "old.json").write_text(json.dumps(side))
    old_corpus = c / "corpus" / "old"
    shutil.copytree(next((c / "corpus").iterdir()), old_corpus)
    rec = json.loads((old_corpus / "corpus.json").read_text())
    (old_corpus / "corpus.json").write_text(json.dumps({**rec, "fill": "cpu-threads-1"}))
    shutil.copytree(next((c / "tta-views").iterdir()), c / "tta-views" / "old")
    (c / "tta-views" / "old" / "recipe.json").unlink()
    (c / "fewshot").mkdir()
    (c / "fewshot" / "emoji-x-shots1-seed1.json").write_text("{}")
    (c / "features" / "notes.txt").write_text("mine")  # not gramvl's: listed, never deleted

    entries = scan()
    state = {(e.kind, e.paths[0].name if e.paths[0].stem != "old" else "old"): e.state for e in entries}
    assert sorted(k for k, v in state.items() if v == "stale") == [
        ("cmhc", "old"), ("corpus", "old"), ("features", "old"), ("tta-views", "old")]
    assert state["features", "notes.txt"] == "unknown" and state["fewshot", "emoji-x-shots1-seed1.json"] == "current"
    assert sum(v == "current" for v in state.values()) == 5
    code, out, _ = run(capsys, "cache")
    assert code == 0 and "| features | 3 | 1 | 1 |" in out and "--prune" in out
    assert (c / "features" / "old.safetensors").exists()  # listing deletes nothing
    code, out, _ = run(capsys, "cache", "--prune")
    assert code == 0 and "deleted 4 stale entries" in out
    after = scan()
    assert {e.state for e in after} == {"current", "unknown"} and len(after) == len(entries) - 4
    assert not (c / "features" / "old.json").exists() and not old_corpus.exists()
    assert image_features(bb, ds, progress=False)[0].shape[0] == len(ds)  # the current entries still serve
