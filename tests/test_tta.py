"""Test-time prompt tuning: selection, objective, AdamW, batching, reset, zero-shot, ψ(g; e(x)), errors."""

import argparse
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from gramvl.errors import GramvlError
from gramvl.gram.regulator import Regulator
from gramvl.io import load_tensors, save_tensors
from gramvl.tta.structure import StructureContext, StructuredRegulator
from gramvl.tta.tpt import (
    TPT,
    AdamState,
    ContextInit,
    TPTConfig,
    adamw_step,
    confident_views,
    gram_init,
    hand_init,
    marginal_entropy,
    n_confident,
    prompt_file_init,
    resolve_init,
)

CLASSES = ["cat", "dog", "red car", "apple"]


def _feats(B, V, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(B, V, D, generator=g), dim=-1)


def _image(seed, size=40):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


def _conditioned_regulator(d, D, seed=0):
    torch.manual_seed(seed)
    reg = Regulator(d, rank=8, ctx_dim=D, gate_init=0.0)
    with torch.no_grad():
        reg.up.weight.normal_(0, 0.5)
        reg.gate_ctx.weight.normal_(0, 2.0)
        reg.film.weight.normal_(0, 2.0)
    for p in reg.parameters():
        p.requires_grad_(False)
    return reg


def reference_tpt(bb, cp, ctx0, feats, cfg, psi=None):
    """TPT written plainly, one image at a time: own nn.Parameter and torch.optim.AdamW, reset per image."""
    ctx = torch.nn.Parameter(ctx0.clone())
    opt = torch.optim.AdamW([ctx], lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    sel = None
    for _ in range(cfg.steps):
        logits = bb.logit_scale * feats @ bb.prompted_text_features(cp, ctx).T  # [V, C]
        if sel is None:
            ent = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
            sel = torch.argsort(ent, stable=True)[: int(feats.shape[0] * cfg.selection)]
        p = logits[sel].softmax(-1).mean(0)
        loss = -(p * p.log()).sum()
        opt.zero_grad()
        loss.backward()
        if psi is not None:
            ctx.grad = psi(ctx.grad[None, None], feats[:1])[0, 0]
        opt.step()
    with torch.no_grad():
        return bb.logit_scale * feats[0] @ bb.prompted_text_features(cp, ctx).T


# ----------------------------------------------------------------------------------------- the objective
def test_confidence_selection_keeps_exactly_the_lowest_entropy_tenth():
    torch.manual_seed(0)
    logits = torch.randn(64, 7) * torch.linspace(0.1, 6, 64)[torch.randperm(64)].unsqueeze(1)
    idx = confident_views(logits, 0.1)
    ent = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    assert n_confident(64, 0.1) == 6 == len(idx)  # int(64 * 0.1), as TPT
    assert set(idx.tolist()) == set(torch.topk(ent, 6, largest=False).indices.tolist())
    assert ent[idx].max() < ent[[i for i in range(64) if i not in idx.tolist()]].min()
    batched = confident_views(torch.stack([logits, logits.flip(0)]), 0.1)
    assert set(batched[1].tolist()) == {63 - i for i in idx.tolist()}
    assert n_confident(5, 0.1) == 1


def test_marginal_entropy_is_the_entropy_of_the_mean_prediction():
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 5) * 3
    p = logits.softmax(-1).mean(-2)
    assert torch.allclose(marginal_entropy(logits), -(p * p.log()).sum(-1), atol=1e-6)


def test_functional_adamw_matches_torch_adamw():
    torch.manual_seed(0)
    p0 = torch.randn(2, 1, 3, 5)
    grads = [torch.randn_like(p0) for _ in range(3)]
    ref = torch.nn.Parameter(p0.clone())
    opt = torch.optim.AdamW([ref], lr=5e-3)
    p, state = p0.clone(), AdamState.zeros_like(p0)
    for g in grads:
        ref.grad = g.clone()
        opt.step()
        p, state = adamw_step(p, g, state, 5e-3)
    assert torch.allclose(p, ref.detach(), atol=1e-7)
    one, _ = adamw_step(p0, grads[0], AdamState.zeros_like(p0), 5e-3)
    assert torch.allclose(one, p0 * (1 - 5e-5) - 5e-3 * grads[0] / (grads[0].abs() + 1e-8), atol=1e-7)


def test_adamw_surrogate_keeps_the_step_and_passes_gradient():
    torch.manual_seed(0)
    g = torch.randn(2, 1, 3, 5, requires_grad=True)
    p0 = torch.randn(2, 1, 3, 5)
    exact, _ = adamw_step(p0, g, AdamState.zeros_like(p0), 5e-3)
    ste, _ = adamw_step(p0, g, AdamState.zeros_like(p0), 5e-3, surrogate=True)
    assert torch.allclose(exact, ste, atol=1e-7)
    (gx,) = torch.autograd.grad(exact.sum(), g)
    (gs,) = torch.autograd.grad(ste.sum(), g)
    assert gx.abs().max() < 1e-4 < gs.abs().max()  # sign-like step: no gradient without the surrogate


# ----------------------------------------------------------------------------------------- the tuner
def test_batched_tpt_equals_the_one_image_at_a_time_loop(small_random_backbone):
    bb = small_random_backbone
    cfg = TPTConfig(n_views=20, steps=2, lr=5e-2)
    tpt = TPT(bb, CLASSES, hand_init(bb), cfg)
    feats = _feats(3, 20, bb.embed_dim)
    batched = tpt.predict(feats)
    for b in range(3):
        ref = reference_tpt(bb, tpt.cp, tpt.ctx0, feats[b], cfg)
        assert torch.allclose(batched[b], ref, atol=1e-4), b
    zero = TPT(bb, CLASSES, hand_init(bb), TPTConfig(steps=0)).predict(feats)
    assert (batched - zero).abs().max() > 1e-3  # tuning did change the predictions
    tpt._vjp_ok = False  # the first step without the shared text forward: B x C rows
    assert torch.allclose(tpt.predict(feats), batched, atol=1e-4)


def test_batched_tpt_with_structured_regulator_equals_the_loop(small_random_backbone):
    bb = small_random_backbone
    reg = _conditioned_regulator(bb.text_width, bb.embed_dim)
    protos = _feats(1, 5, bb.embed_dim, seed=3)[0]
    init = ContextInit(hand_init(bb).ctx, "hand", reg, StructureContext(protos, tau=0.1))
    cfg = TPTConfig(n_views=20, steps=1, lr=5e-2)
    tpt = TPT(bb, CLASSES, init, cfg)
    feats = _feats(2, 20, bb.embed_dim, seed=1)
    batched = tpt.predict(feats)
    for b in range(2):
        ref = reference_tpt(bb, tpt.cp, tpt.ctx0, feats[b], cfg, psi=tpt.psi)
        assert torch.allclose(batched[b], ref, atol=1e-4), b
    plain = TPT(bb, CLASSES, hand_init(bb), cfg).predict(feats)
    assert (batched - plain).abs().max() > 1e-4  # the regulator changed the step


def test_reset_the_prompt_of_one_image_never_leaks_into_the_next(small_random_backbone):
    bb = small_random_backbone
    tpt = TPT(bb, CLASSES, hand_init(bb), TPTConfig(n_views=8, steps=1, lr=0.1, batch_images=1))
    ctx0 = tpt.ctx0.clone()
    a, b = _image(0), _image(1)
    alone, _ = tpt.classify([a], [0])
    tpt.classify([b], [1])
    after, _ = tpt.classify([a], [0])
    assert torch.equal(alone, after)
    together, _ = tpt.classify([b, a], [1, 0])
    assert torch.allclose(together[1], alone[0], atol=1e-4)
    assert torch.equal(tpt.ctx0, ctx0)
    other_seed = TPT(bb, CLASSES, hand_init(bb), TPTConfig(n_views=8, steps=1, lr=0.1, seed=5))
    assert not torch.equal(other_seed.views([a], [0]), tpt.views([a], [0]))  # the seed drives the views
    assert torch.equal(tpt.views([a], [0])[0, 0], tpt.augment.base(a))  # view 0 is the image itself


def test_tpt_with_zero_steps_is_zero_shot(small_random_backbone):
    from gramvl.engine.evaluate import zeroshot_weights

    bb = small_random_backbone
    feats = _feats(4, 6, bb.embed_dim, seed=2)
    tpt = TPT(bb, CLASSES, hand_init(bb, "a photo of a"), TPTConfig(steps=0))
    zs = bb.logit_scale * feats[:, 0] @ zeroshot_weights(bb, CLASSES, ["a photo of a {}."]).T
    assert torch.allclose(tpt.predict(feats), zs, atol=1e-4)
    assert torch.allclose(tpt.predict(feats, tpt.tune(feats)), zs, atol=1e-4)
    assert tpt.views([_image(0)], [0]).shape[1] == 1  # zero-shot encodes only the image itself


# ----------------------------------------------------------------------------------------- structure
def test_structure_context_is_a_softmax_mixture_of_prototypes():
    protos = F.normalize(torch.eye(4, 6) + 0.01, dim=-1)
    ctx = StructureContext(protos, tau=0.01)
    x = protos[2:3] + 0.05 * torch.randn(1, 6)
    w = ctx.weights(x)
    assert torch.allclose(w.sum(-1), torch.ones(1))
    assert torch.allclose(ctx(x), protos[2:3], atol=1e-3)  # low temperature: the nearest prototype
    with pytest.raises(GramvlError, match="another backbone"):
        ctx(torch.randn(1, 5))


def test_structure_context_changes_psi_only_through_its_conditioning():
    d, D = 12, 6
    reg = _conditioned_regulator(d, D)
    protos = F.normalize(torch.randn(5, D), dim=-1)
    psi = StructuredRegulator(reg, StructureContext(protos, tau=0.05))
    g = torch.randn(1, 1, 3, d).repeat(2, 1, 1, 1)  # the same gradient for two images
    out = psi(g, torch.stack([protos[0], protos[3]]))
    assert (out[0] - out[1]).abs().max() > 1e-3
    assert torch.allclose(out.norm(dim=-1), g.norm(dim=-1), atol=1e-5)  # ψ only turns rows
    with torch.no_grad():
        reg.gate_ctx.weight.zero_()
        reg.film.weight.zero_()
        reg.film.bias.zero_()
    out0 = psi(g, torch.stack([protos[0], protos[3]]))
    assert torch.allclose(out0[0], out0[1], atol=1e-6)


# ----------------------------------------------------------------------------------------- inits and errors
def test_prompt_file_init_and_its_errors(small_random_backbone, tmp_path):
    bb = small_random_backbone
    ctx = torch.randn(6, bb.text_width)
    good = tmp_path / "prompt.safetensors"
    save_tensors(good, {"text_ctx": ctx}, {"format": "gramvl-prompt", "method": "coop", "backbone": bb.ident})
    init = prompt_file_init(bb, good)
    assert torch.equal(init.ctx, ctx) and init.source.startswith("prompt:")
    with pytest.raises(GramvlError, match="prompt length mismatch"):
        prompt_file_init(bb, good, n_ctx=4)
    other = tmp_path / "other.safetensors"
    save_tensors(other, {"text_ctx": ctx}, {"format": "gramvl-prompt", "method": "coop",
                                            "backbone": "ViT-B-16:x"})
    with pytest.raises(GramvlError, match="another backbone"):
        prompt_file_init(bb, other)
    wide = tmp_path / "wide.safetensors"
    save_tensors(wide, {"text_ctx": torch.randn(4, 512)}, {"format": "gramvl-prompt", "backbone": bb.ident})
    with pytest.raises(GramvlError, match="prompt length mismatch"):
        prompt_file_init(bb, wide)
    csc = tmp_path / "csc.safetensors"
    save_tensors(csc, {"text_ctx": torch.randn(3, 4, bb.text_width)}, {"format": "gramvl-prompt",
                                                                      "backbone": bb.ident})
    with pytest.raises(GramvlError, match="class-specific"):
        prompt_file_init(bb, csc)
    with pytest.raises(GramvlError, match="not a gramvl prompt file"):
        prompt_file_init(bb, _plain_file(tmp_path))
    with pytest.raises(GramvlError, match="prompt length mismatch"):
        hand_init(bb, "a photo of a", n_ctx=16)
    with pytest.raises(GramvlError, match="one"):
        resolve_init(bb, good, tmp_path / "artifact.safetensors")
    with pytest.raises(GramvlError, match="prompt length mismatch"):  # too long for the text context
        TPT(bb, ["x " * 40], prompt_file_init(bb, good))


def _plain_file(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_tensors(path, {"w": torch.zeros(2)})
    return path


def _write_images(folder, n, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"{i:03d}.png"
        _image(seed + i, 24).save(p)
        paths.append(str(p))
    return paths


class _ToySampler:
    def sample(self, rng):
        idx = rng.permutation(8)
        return SimpleNamespace(classnames=["cat", "dog"], query_idx=idx[:4], query_labels=[0, 1, 0, 1],
                               classnames_shift=["car", "tree", "sun"], shift_idx=idx[4:7],
                               shift_labels=[0, 1, 2])


def test_meta_training_for_test_time_writes_a_structured_artifact_tpt_uses(small_random_backbone, tmp_path):
    from gramvl.tta.meta_tta import MetaTTAConfig, ViewFeatureCache, meta_train_tta

    bb = small_random_backbone
    paths = _write_images(tmp_path / "corpus", 8)
    views = ViewFeatureCache(bb, paths, views=6, cache=False)
    protos = _feats(1, 4, bb.embed_dim, seed=4)[0]
    cfg = MetaTTAConfig(steps=2, meta_batch=1, views=6, selection=0.34, outer_lr_phi=0.05, rank=4)
    out = meta_train_tta(cfg, bb, _ToySampler(), views, tmp_path / "tta.safetensors", protos, progress=False)
    tensors, meta = load_tensors(out)
    assert meta["tta"] and meta["format"] == "gramvl-gram-artifact" and meta["backbone"] == bb.ident
    assert meta["regulator"]["ctx_dim"] == bb.embed_dim and meta["structure"]["mode"] == "complexity"
    assert torch.allclose(tensors["prototypes"], F.normalize(protos, dim=-1))
    assert tensors["psi.regs.text.up.weight"].abs().max() > 0  # ψ learned through the surrogate step
    assert tensors["psi.regs.text.film.weight"].abs().max() > 0  # ... and its structure conditioning
    assert not torch.equal(tensors["theta.text_ctx"], hand_init(bb).ctx)
    assert len(meta["curve"]) == 2 and "post_acc_psi_step" in meta["psi_diagnostics"]
    init = gram_init(bb, out)
    assert init.regulator is not None and init.structure is not None and init.structure.tau == cfg.tau
    logits = TPT(bb, CLASSES, init, TPTConfig(n_views=8)).predict(_feats(2, 8, bb.embed_dim))
    assert logits.shape == (2, len(CLASSES)) and torch.isfinite(logits).all()
    plain = gram_init(bb, out, structure=False)
    assert plain.structure is None and TPT(bb, CLASSES, plain).psi.structured is False
    only_psi = gram_init(bb, out, parts="regulator")
    assert torch.equal(only_psi.ctx, hand_init(bb).ctx)
    meta["backbone"] = "ViT-B-16:other"
    out.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(GramvlError, match="another backbone"):
        gram_init(bb, out)


def test_meta_training_for_test_time_gives_the_same_artifact_at_any_thread_count(small_random_backbone, tmp_path):
    """As `gramvl meta-train`: on the CPU the tasks run at once, one intra-op thread each, summed in task order, so
    the artifact is the same bit for bit at 1 and 2 threads and equal to the one-after-another loop at one
    thread; the view features are still read (and cached) in the calling thread, outside the tasks."""
    import threading
    from dataclasses import replace

    from safetensors.torch import load_file

    from gramvl.tta.meta_tta import MetaTTAConfig, ViewFeatureCache, meta_train_tta

    bb = small_random_backbone
    paths = _write_images(tmp_path / "corpus", 8)
    protos = _feats(1, 4, bb.embed_dim, seed=4)[0]
    cfg = MetaTTAConfig(steps=3, meta_batch=3, views=6, selection=0.34, outer_lr_phi=0.05, rank=4)
    reads = set()

    class Views(ViewFeatureCache):
        def get(self, idx):
            reads.add(threading.current_thread().name)
            return super().get(idx)

    before = torch.get_num_threads()
    arts = {}
    try:
        for mode, threads in (("tasks", 2), ("tasks", 1), ("intra-op", 1)):
            torch.set_num_threads(threads)
            views = Views(bb, paths, views=6, cache=False)
            out = meta_train_tta(replace(cfg, cpu_parallel=mode), bb, _ToySampler(), views,
                                 tmp_path / f"{mode}_{threads}.safetensors", protos, progress=False)
            arts[mode, threads] = load_file(str(out))
            assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
    assert reads == {threading.main_thread().name}
    ref = arts["tasks", 1]
    assert not torch.equal(ref["theta.text_ctx"], hand_init(bb).ctx)
    for key, art in arts.items():
        assert art.keys() == ref.keys() and all(torch.equal(art[k], ref[k]) for k in ref), key
    with pytest.raises(GramvlError, match="cpu_parallel must be one of"):
        meta_train_tta(replace(cfg, cpu_parallel="threads"), bb, _ToySampler(), Views(bb, paths, views=6, cache=False),
                       tmp_path / "bad.safetensors", protos, progress=False)


def test_test_time_descent_guard_travels_with_the_artifact(small_random_backbone, tmp_path):
    from gramvl.tta.meta_tta import MetaTTAConfig, ViewFeatureCache, meta_train_tta

    bb = small_random_backbone
    views = ViewFeatureCache(bb, _write_images(tmp_path / "corpus", 8), views=6, cache=False)
    protos = _feats(1, 4, bb.embed_dim, seed=4)[0]
    cfg = MetaTTAConfig(steps=1, meta_batch=1, views=6, selection=0.34, rank=4, psi_min_cos=0.5)
    out = meta_train_tta(cfg, bb, _ToySampler(), views, tmp_path / "tta.safetensors", protos, progress=False)
    init = gram_init(bb, out)
    assert init.regulator.min_cos == 0.5
    reg = init.regulator
    with torch.no_grad():  # turn ψ far from the identity: only the guard keeps it within 0.5 of g
        reg.up.weight.normal_(std=3.0)
        reg.gate.fill_(-6.0)
    g = torch.randn(3, 4, bb.text_width)
    reg.min_cos = -1.0
    free = F.cosine_similarity(reg(g).reshape(-1, bb.text_width), g.reshape(-1, bb.text_width), dim=-1)
    assert (free < 0.5).any()
    reg.min_cos = 0.5
    cos = F.cosine_similarity(init.regulator(g).reshape(-1, bb.text_width), g.reshape(-1, bb.text_width), dim=-1)
    assert (cos >= 0.5 - 1e-5).all()


def test_test_time_theta_anchor_keeps_every_row_near_the_words(small_random_backbone, tmp_path):
    from gramvl.gram.meta import token_norm
    from gramvl.tta.meta_tta import MetaTTAConfig, ViewFeatureCache, meta_train_tta

    bb = small_random_backbone
    views = ViewFeatureCache(bb, _write_images(tmp_path / "corpus", 8), views=6, cache=False)
    protos = _feats(1, 4, bb.embed_dim, seed=4)[0]
    radius = 0.05 * token_norm(bb)
    dist = {}
    for anchor in (0.0, 0.05):
        cfg = MetaTTAConfig(steps=3, meta_batch=1, views=6, selection=0.34, rank=4, outer_lr_theta=0.5,
                            theta_anchor=anchor)
        out = meta_train_tta(cfg, bb, _ToySampler(), views, tmp_path / f"tta{anchor}.safetensors", protos,
                             progress=False)
        theta = load_tensors(out)[0]["theta.text_ctx"]
        dist[anchor] = (theta - hand_init(bb).ctx).norm(dim=-1)
    assert dist[0.0].max() > 2 * radius  # unanchored, a large outer lr carries θ far from the words
    assert (dist[0.05] <= radius * (1 + 1e-4)).all() and dist[0.05].max() > 0.5 * radius
    with pytest.raises(GramvlError, match="theta_anchor"):
        MetaTTAConfig(theta_anchor=-1.0)


def test_second_order_meta_gradient_reaches_theta_and_phi(small_random_backbone):
    from gramvl.tta.meta_tta import MetaTTAConfig, tta_query_loss

    bb = small_random_backbone
    reg = Regulator(bb.text_width, rank=4, ctx_dim=bb.embed_dim)
    psi = StructuredRegulator(reg, StructureContext(_feats(1, 3, bb.embed_dim, seed=5)[0]))
    theta = hand_init(bb).ctx.requires_grad_(True)
    feats, y = _feats(3, 10, bb.embed_dim, seed=6), torch.tensor([0, 1, 1])
    loss, pre, post = tta_query_loss(bb, ["cat", "dog"], theta, feats, y, MetaTTAConfig(), psi, True)
    loss.backward()
    assert theta.grad is not None and theta.grad.abs().max() > 0
    assert reg.up.weight.grad.abs().max() > 0  # U starts at 0; its gradient is not
    assert reg.gate_ctx.weight.grad.abs().max() > 0 and 0 <= pre <= 1 and 0 <= post <= 1


def test_gramvl_tta_command_writes_a_record(small_random_backbone, tmp_path):
    from gramvl.tta.cli import add_parser

    bb = small_random_backbone
    model = tmp_path / "model.safetensors"
    save_tensors(model, dict(bb.model.state_dict()), bb.meta)
    for split in ("train", "test"):
        for c in ("cat", "dog", "red_car"):
            _write_images(tmp_path / "data" / split / c, 2, seed=len(c))
    parser = argparse.ArgumentParser()
    parser.add_argument("--quiet", action="store_true")
    add_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "rec.json"
    common = ["--quiet", "tta", "--model", str(model), "--dataset", f"folder:{tmp_path / 'data'}"]
    args = parser.parse_args([*common, "--limit", "4", "--n-views", "8", "--batch-images", "3",
                              "--json", str(out)])
    assert args.func(args) == 0
    rec = json.loads(out.read_text())
    m = rec["metrics"]
    assert rec["kind"] == "tta" and m["n"] == 4 and 0.0 <= m["accuracy"] <= 1.0 and m["latency_ms"] > 0
    assert len(rec["per_sample"]["latency_ms"]) == 4
    assert rec["config"]["init"]["source"] == "hand:a photo of a"
    assert math.isclose(m["accuracy"], np.mean(rec["per_sample"]["correct"]))
    bad = parser.parse_args([*common, "--n-ctx", "7"])
    with pytest.raises(GramvlError, match="prompt length mismatch"):
        bad.func(bad)


def test_methods_sharing_views_get_the_results_of_separate_runs(small_random_backbone, tmp_path):
    from gramvl.data.base import ImageDataset
    from gramvl.tta.tpt import run_tta, run_tta_many

    bb = small_random_backbone
    paths = _write_images(tmp_path / "imgs", 5)
    ds = ImageDataset("toy", "test", CLASSES, [(p, i % len(CLASSES)) for i, p in enumerate(paths)])
    cfg = TPTConfig(n_views=8, lr=0.1, batch_images=2, seed=3)
    make = {"zeroshot": lambda: TPT(bb, CLASSES, hand_init(bb), TPTConfig(steps=0, batch_images=2)),
            "tpt": lambda: TPT(bb, CLASSES, hand_init(bb), cfg),
            "tpt-words": lambda: TPT(bb, CLASSES, hand_init(bb, "an icon of the"), cfg)}
    shared = run_tta_many({k: f() for k, f in make.items()}, ds, limit=4, progress=False)
    for k, f in make.items():
        alone = run_tta(f(), ds, limit=4, progress=False)
        assert alone["per_sample"]["pred"] == shared[k]["per_sample"]["pred"], k
        assert alone["per_sample"]["index"] == shared[k]["per_sample"]["index"]
        assert shared[k]["metrics"]["n"] == 4 and shared[k]["metrics"]["latency_ms"] > 0
    # per-stage latencies are reported for every method (speed itself is measured in benchmarks/tta.py)
    stage = {k: shared[k]["metrics"]["stage_ms"] for k in shared}
    assert all("encode" in s and s["encode"] >= 0 for s in stage.values())


def test_view_feature_cache_is_kept_on_disk_per_recipe(small_random_backbone, tmp_path, monkeypatch):
    from gramvl.tta.meta_tta import ViewFeatureCache

    monkeypatch.setenv("GRAMVL_HOME", str(tmp_path / "home"))
    bb = small_random_backbone
    paths = _write_images(tmp_path / "corpus", 4)
    first = ViewFeatureCache(bb, paths, views=3)
    f = first.get([2, 0])
    assert f.shape == (2, 3, bb.embed_dim) and first.done.tolist() == [True, False, True, False]
    again = ViewFeatureCache(bb, paths, views=3)
    assert again.done.tolist() == [True, False, True, False]
    assert torch.equal(again.get([0]), f[1:])
    other = ViewFeatureCache(bb, paths, views=3, seed=1)
    assert other.key != first.key and not other.done.any()
    assert torch.allclose(f.norm(dim=-1), torch.ones(2, 3), atol=1e-3)


def test_meta_train_flags_map_onto_the_test_time_job():
    from gramvl.tta.cli import _job_overrides

    args = argparse.Namespace(host="coop", unigram=False, steps=5, time_budget=60.0, first_order=True,
                              no_regulator=False, no_shifted_query=True, no_complexity=True,
                              set=["meta.structure=flat"])
    assert _job_overrides(args) == ["meta.structure=flat", "meta.steps=5", "meta.time_budget_s=60.0",
                                    "meta.second_order=false", "meta.shifted_weight=0",
                                    "tasks.shifted_query=false", "tasks.complexity_informed=false"]
    with pytest.raises(GramvlError, match="--host"):
        _job_overrides(argparse.Namespace(host="vpt"))
    with pytest.raises(GramvlError, match="--unigram"):
        _job_overrides(argparse.Namespace(unigram=True))


def test_augmix_views_are_deterministic_per_seed_and_sample(small_random_backbone):
    from gramvl.tta.tpt import ViewAugmenter, sample_generator

    bb = small_random_backbone
    aug = ViewAugmenter(bb, 6, augmix=True)
    a = aug(_image(0, 48), sample_generator(1, 7))
    assert a.shape == (6, 3, bb.image_size, bb.image_size) and torch.isfinite(a).all()
    assert torch.equal(a, aug(_image(0, 48), sample_generator(1, 7)))
    assert not torch.equal(a, ViewAugmenter(bb, 6)(_image(0, 48), sample_generator(1, 7)))


def test_gram_default_names_the_shipped_artifact_at_test_time(small_packaged):
    """`gramvl tta --gram default` read the artifact's tensors a second time from the literal path 'default'."""
    from gramvl.gram.attach import resolve_artifact
    from gramvl.tta.tpt import gram_init

    init = gram_init(small_packaged, "default")
    assert init.source == f"gram:{resolve_artifact('default')}" and init.regulator is not None
    assert init.ctx.shape[-1] == small_packaged.text_width
