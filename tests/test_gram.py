"""GRAM core: the regulator, the bi-level meta-gradient, attach, and the artifact."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from gramvl.errors import GramvlError
from gramvl.gram.attach import attach, load_artifact
from gramvl.gram.meta import CorpusBatches, MetaConfig, inner_adapt, meta_train, slot_paths, task_loss
from gramvl.gram.regulator import Regulator, RegulatorSet
from gramvl.prompts.base import PromptLearner


class ToyHost(PromptLearner):
    """A tiny differentiable host: class embeddings are a fixed function of the text slot."""

    name = "toy"

    def __init__(self, dim=6, n_ctx=2, width=5, extra=True):
        super().__init__(SimpleNamespace(ident="toy-backbone"), ["a", "b", "c"])
        g = torch.Generator().manual_seed(0)
        self.text_ctx = nn.Parameter(torch.randn(n_ctx, width, generator=g) * 0.5)
        self.mix = nn.Parameter(torch.randn(n_ctx * width, dim, generator=g) * 0.5, requires_grad=extra)
        self.class_codes = torch.randn(26, dim, generator=g)
        self.frozen_weight = nn.Parameter(torch.randn(dim, dim, generator=g) * 0.3, requires_grad=False)

    def slots(self):
        return {"text_ctx": self.text_ctx}

    def logits(self, batch):
        base = torch.tanh(self.text_ctx.reshape(-1) @ self.mix)
        idx = [ord(c[0]) - 97 for c in self.classnames]
        cls = self.class_codes[idx] * (1 + base)
        return (batch["features"] @ self.frozen_weight) @ cls.T


class ToySampler:
    def __init__(self, n=60):
        self.n = n

    def sample(self, rng):
        idx = rng.permutation(self.n)
        return SimpleNamespace(classnames=["a", "b", "c"], support_idx=idx[:6], support_labels=[0, 1, 2] * 2,
                               query_idx=idx[6:12], query_labels=[0, 1, 2] * 2, classnames_shift=["d", "e", "f"],
                               shift_idx=idx[12:18], shift_labels=[2, 1, 0] * 2)


def test_regulator_is_identity_at_init():
    torch.manual_seed(0)
    g = torch.randn(7, 4, 16)
    reg = Regulator(16, rank=8)
    assert torch.allclose(reg(g), g, atol=1e-6)


def test_regulator_preserves_row_norms_and_changes_directions_once_trained():
    torch.manual_seed(0)
    reg = Regulator(16, rank=8, gate_init=0.0)
    nn.init.normal_(reg.up.weight, std=1.0)
    g = torch.randn(5, 16) * torch.rand(5, 1) * 10
    out = reg(g)
    assert torch.allclose(out.norm(dim=-1), g.norm(dim=-1), rtol=1e-5)
    cos = torch.nn.functional.cosine_similarity(out, g, dim=-1)
    assert cos.max() < 0.999


def test_context_conditions_the_regulator():
    torch.manual_seed(0)
    reg = Regulator(8, rank=4, ctx_dim=3, gate_init=0.0)
    nn.init.normal_(reg.up.weight)
    nn.init.normal_(reg.film.weight)
    nn.init.normal_(reg.gate_ctx.weight)
    g = torch.randn(4, 8)
    a, b = reg(g, torch.tensor([1.0, 0.0, 0.0])), reg(g, torch.tensor([0.0, 1.0, -1.0]))
    assert (a - b).abs().max() > 1e-3


def _meta_loss(host, theta, psi, data, task, second_order, lr=0.7, steps=2):
    paths = slot_paths(host)
    ys = torch.as_tensor(task.support_labels)
    yq = torch.as_tensor(task.query_labels)
    adapted = inner_adapt(host, theta, psi, data.batch(task.support_idx), ys, paths, steps, lr, second_order)
    return task_loss(host, adapted, data.batch(task.query_idx), yq, paths)[0]


def test_second_order_meta_gradient_matches_finite_differences():
    torch.manual_seed(0)
    host = ToyHost().double()
    host.class_codes = host.class_codes.double()
    data = CorpusBatches(torch.randn(60, 6).double())
    data.features = data.features.double()
    psi = RegulatorSet({"text": 5}, rank=3).double()
    nn.init.normal_(psi.regs["text"].up.weight, std=0.5)
    with torch.no_grad():
        psi.regs["text"].gate.fill_(0.3)
    task = ToySampler().sample(np.random.default_rng(0))
    theta = {"text_ctx": host.text_ctx.detach().clone().requires_grad_(True)}
    loss = _meta_loss(host, theta, psi, data, task, second_order=True)
    g_theta = torch.autograd.grad(loss, [theta["text_ctx"]], retain_graph=True)[0]
    w = psi.regs["text"].down.weight
    g_phi = torch.autograd.grad(loss, [w])[0]
    eps = 1e-6
    for (i, j) in [(0, 0), (1, 3), (0, 4)]:
        tp = {"text_ctx": theta["text_ctx"].detach().clone()}
        tm = {"text_ctx": theta["text_ctx"].detach().clone()}
        tp["text_ctx"][i, j] += eps
        tm["text_ctx"][i, j] -= eps
        tp["text_ctx"].requires_grad_(True)
        tm["text_ctx"].requires_grad_(True)
        fd = (_meta_loss(host, tp, psi, data, task, True) - _meta_loss(host, tm, psi, data, task, True)) / (2 * eps)
        assert abs(fd.item() - g_theta[i, j].item()) < 1e-6 * max(1.0, abs(fd.item())) + 1e-8
    for (i, j) in [(0, 0), (2, 1)]:
        with torch.no_grad():
            w[i, j] += eps
        lp = _meta_loss(host, theta, psi, data, task, True)
        with torch.no_grad():
            w[i, j] -= 2 * eps
        lm = _meta_loss(host, theta, psi, data, task, True)
        with torch.no_grad():
            w[i, j] += eps
        fd = (lp - lm) / (2 * eps)
        assert abs(fd.item() - g_phi[i, j].item()) < 1e-6 * max(1.0, abs(fd.item())) + 1e-8


def test_first_order_differs_from_second_order_but_phi_still_gets_gradient():
    torch.manual_seed(0)
    host = ToyHost()
    data = CorpusBatches(torch.randn(60, 6))
    psi = RegulatorSet({"text": 5}, rank=3)
    nn.init.normal_(psi.regs["text"].up.weight, std=0.5)
    task = ToySampler().sample(np.random.default_rng(0))
    grads = {}
    for so in (True, False):
        theta = {"text_ctx": host.text_ctx.detach().clone().requires_grad_(True)}
        loss = _meta_loss(host, theta, psi, data, task, so)
        gt, gw = torch.autograd.grad(loss, [theta["text_ctx"], psi.regs["text"].up.weight])
        grads[so] = (gt, gw)
        assert gw.abs().sum() > 0
    assert (grads[True][0] - grads[False][0]).abs().max() > 1e-6


def _artifact(tmp_path, steps=3, **kw):
    host = ToyHost()
    kw.setdefault("theta_norm_cap", 0.0)  # the toy backbone has no token table to scale the cap by
    cfg = MetaConfig(host="toy", steps=steps, meta_batch=2, inner_lr=0.5, **kw)
    out = meta_train(cfg, host, ToySampler(), CorpusBatches(torch.randn(60, 6)), tmp_path / "gram.safetensors",
                     progress=False)
    return host, out


def test_artifact_round_trips_and_records_diagnostics(tmp_path):
    host, out = _artifact(tmp_path)
    theta, psi, meta = load_artifact(out)
    assert meta["backbone"] == "toy-backbone" and meta["slots"] == {"text_ctx": [2, 5]}
    assert meta["steps_done"] == 3 and len(meta["curve"]) == 3
    assert "text.cos_to_identity_mean" in meta["psi_diagnostics"]
    g = torch.randn(2, 5)
    # the artifact's ψ equals the trained one: re-running from the checkpoint gives the same outputs
    _, psi2, _ = load_artifact(out)
    assert torch.allclose(psi.regs["text"](g), psi2.regs["text"](g))
    assert not torch.allclose(theta["text_ctx"], ToyHost().text_ctx.detach())


def test_meta_training_resumes_only_its_own_checkpoint(tmp_path, capsys):
    from gramvl.io import load_tensors, save_tensors

    cfg = MetaConfig(host="toy", steps=4, meta_batch=2, inner_lr=0.5, checkpoint_every=1, theta_norm_cap=0.0)
    for ident, extra, resumes in (("toy-backbone", {"corpus": "world"}, True),
                                  ("other-backbone", {"corpus": "world"}, False),
                                  ("toy-backbone", {"corpus": "other"}, False),
                                  # another machine or thread count, other timings: the same run, resumed
                                  ("toy-backbone", {"corpus": "world", "timing": {"features_s": 9.0},
                                                    "environment": {"threads": 7, "cpu": "another"}}, True)):
        folder = tmp_path / f"{ident}-{extra['corpus']}-{len(extra)}"
        folder.mkdir()
        _, out = _artifact(folder, steps=4, checkpoint_every=1)
        ck = out.with_name(out.stem + ".ckpt.safetensors")
        tensors, meta = load_tensors(ck)
        # make it a run of toy-backbone on "world" stopped after 2 of its 4 steps, and mark it
        meta["fingerprint"] = {"backbone": "toy-backbone", "corpus": "world"}
        meta["step"], meta["history"], meta["seconds"] = 2, meta["history"][:2], 1000.0
        save_tensors(ck, tensors, meta)
        host = ToyHost()
        host.bb = type(host.bb)(ident=ident)
        capsys.readouterr()
        out2 = meta_train(cfg, host, ToySampler(), CorpusBatches(torch.randn(60, 6)), out, extra_meta=extra,
                          progress=False)
        art = load_artifact(out2)[2]
        assert art["steps_done"] == 4
        # resumed: the marked checkpoint's seconds carry over; otherwise the run started over, and said why
        assert (art["seconds"] >= 1000.0) == resumes, (ident, extra)
        assert ("starting over" in capsys.readouterr().out) == (not resumes)
        assert load_tensors(ck)[1]["fingerprint"] == {"backbone": ident, "corpus": extra["corpus"]}


def test_attach_changes_exactly_the_slot_gradients(tmp_path):
    _, out = _artifact(tmp_path)
    theta, psi, _ = load_artifact(out)
    with torch.no_grad():  # make ψ visibly non-identity
        nn.init.normal_(psi.regs["text"].up.weight, std=1.0)
        psi.regs["text"].gate.fill_(-2.0)
    from gramvl.io import load_tensors, save_tensors

    tensors, meta = load_tensors(out)
    tensors.update({f"psi.{k}": v for k, v in psi.state_dict().items()})
    save_tensors(out, tensors, meta)

    x = torch.randn(4, 6)
    y = torch.tensor([0, 1, 2, 0])
    plain = ToyHost()
    with torch.no_grad():
        plain.text_ctx.copy_(theta["text_ctx"])
    torch.nn.functional.cross_entropy(plain.logits({"features": x}), y).backward()
    hosted = ToyHost()
    info = attach(hosted, out)
    assert info["init"] == ["text_ctx"] and info["regulated"] == ["text_ctx"]
    assert torch.allclose(hosted.text_ctx, theta["text_ctx"])
    torch.nn.functional.cross_entropy(hosted.logits({"features": x}), y).backward()
    expected = psi.regs["text"](plain.text_ctx.grad)
    assert torch.allclose(hosted.text_ctx.grad, expected, atol=1e-6)
    assert not torch.allclose(hosted.text_ctx.grad, plain.text_ctx.grad, atol=1e-4)
    assert torch.allclose(hosted.mix.grad, plain.mix.grad)  # host extras untouched
    assert hosted.frozen_weight.grad is None


def test_artifact_keeps_the_host_extras_theta_was_learned_with_and_attach_restores_them(tmp_path):
    # the toy's `mix` (trainable, not a slot) plays MaPLe's coupling maps: a host built with another seed
    # has other values, and θ* only means what it meant in meta-training together with the stored ones
    _, out = _artifact(tmp_path)
    meta = load_artifact(out)[2]
    assert meta["host_extras"] == {"mix": [10, 6]}
    stored = ToyHost().mix.detach().clone()
    other = ToyHost()
    with torch.no_grad():
        other.mix.add_(1.0)
    info = attach(other, out, parts="regulator")
    assert "extras" not in info and not torch.allclose(other.mix, stored)
    info = attach(other, out)
    assert info["extras"] == ["mix"] and torch.equal(other.mix.detach(), stored)
    assert other.mix.requires_grad  # still the host's to train
    with pytest.raises(GramvlError, match="host parameter mix"):
        attach(ToyHost(dim=7), out)


def test_maple_extras_are_its_coupling_maps(small_random_backbone):
    from gramvl.gram.meta import host_extras
    from gramvl.prompts import build_host

    a = host_extras(build_host("maple", small_random_backbone, ["cat", "dog"], {"seed": 1}))
    b = host_extras(build_host("maple", small_random_backbone, ["cat", "dog"], {"seed": 2}))
    assert a and all(n.startswith("coupling.") for n in a)
    assert any(not torch.equal(a[n], b[n]) for n in a)  # per-seed maps: what the artifact must pin
    assert not host_extras(build_host("coop", small_random_backbone, ["cat", "dog"]))


def test_attach_puts_the_regulator_where_the_slots_are(tmp_path):
    # ψ* loads on the CPU; a host on a GPU failed in its first backward (session 5's H100 check). The "meta"
    # device stands in for the GPU here.
    _, out = _artifact(tmp_path)
    h = ToyHost().to("meta")
    info = attach(h, out)
    assert info["regulated"] == ["text_ctx"]
    assert {p.device.type for p in h._gram_regulator.parameters()} == {"meta"}


def test_attach_parts_init_only_and_regulator_only(tmp_path):
    _, out = _artifact(tmp_path)
    theta, _, _ = load_artifact(out)
    h = ToyHost()
    before = h.text_ctx.detach().clone()
    info = attach(h, out, parts="regulator")
    assert info["init"] == [] and torch.equal(h.text_ctx.detach(), before)
    h2 = ToyHost()
    info2 = attach(h2, out, parts="init")
    assert info2["regulated"] == [] and torch.allclose(h2.text_ctx, theta["text_ctx"])


def test_attach_rejects_other_backbone_and_other_slot_shape(tmp_path):
    _, out = _artifact(tmp_path)
    other = ToyHost()
    other.bb = SimpleNamespace(ident="ViT-B-16:abc")
    with pytest.raises(GramvlError, match="checkpoint from another backbone"):
        attach(other, out)
    wrong = ToyHost(n_ctx=3)
    with pytest.raises(GramvlError, match="prompt length mismatch"):
        attach(wrong, out)
    with pytest.raises(GramvlError, match="not a GRAM artifact"):
        bad = tmp_path / "x.safetensors"
        from gramvl.io import save_tensors

        save_tensors(bad, {"a": torch.zeros(1)}, {"format": "something"})
        attach(ToyHost(), bad)


def test_packaged_artifact_is_the_default_recipe_on_the_packaged_clip(small_packaged):
    from dataclasses import asdict

    from gramvl.gram.meta import token_norm

    theta, psi, meta = load_artifact("default")
    assert meta["backbone"] == small_packaged.ident
    assert theta["text_ctx"].shape[-1] == small_packaged.text_width
    # made by `gramvl meta-train --host coop` with today's defaults (docs/method.md), all 600 steps
    expected = json.loads(json.dumps(asdict(MetaConfig(host="coop")), default=str))
    # options added after the artifact was made, and the value its run behaved as: today's default, except that it
    # ran before session 16's task-parallel CPU mode (its 2 threads inside each op)
    added_later = {"theta_anchor": 0.0, "cpu_parallel": "intra-op"}
    missing = {k: added_later[k] for k in expected if k not in meta["config"]}  # a KeyError: an unexplained field
    assert {**meta["config"], **missing} == {**expected, "cpu_parallel": "intra-op"}
    assert meta["steps_done"] == meta["config"]["steps"]
    # the default norm cap held: no row of θ* is longer than 1.5 x a word of this model
    assert theta["text_ctx"].norm(dim=-1).max() <= 1.5 * token_norm(small_packaged) * (1 + 1e-3)
    diag = meta["psi_diagnostics"]
    assert psi is not None and {"text.gate", "text.cos_to_identity_mean", "query_loss_drop_with_psi"} <= set(diag)


def test_theta_norm_cap_projects_the_text_rows_after_every_outer_step(tmp_path, monkeypatch):
    import gramvl.gram.meta as m

    monkeypatch.setattr(m, "token_norm", lambda bb: 0.1)  # cap = 2.0 x 0.1
    _, free = _artifact(tmp_path / "free", outer_lr_theta=0.5, theta_norm_cap=0.0)
    _, capped = _artifact(tmp_path / "capped", outer_lr_theta=0.5, theta_norm_cap=2.0)
    n_free = load_artifact(free)[0]["text_ctx"].norm(dim=-1)
    n_cap = load_artifact(capped)[0]["text_ctx"].norm(dim=-1)
    assert n_free.max() > 0.3  # without the cap Adam's steps inflate the rows
    assert n_cap.max() <= 0.2 + 1e-6 and n_cap.max() > 0.19
    rows = {"text_ctx": torch.tensor([[3.0, 4.0], [0.03, 0.04]]), "vis_ctx": torch.tensor([[3.0, 4.0]])}
    m.cap_text_rows(rows, 1.0)
    assert torch.allclose(rows["text_ctx"], torch.tensor([[0.6, 0.8], [0.03, 0.04]]))  # short rows unchanged
    assert torch.equal(rows["vis_ctx"], torch.tensor([[3.0, 4.0]]))  # visual slots are not capped


def test_theta_anchor_keeps_the_text_rows_near_the_initial_context(tmp_path, monkeypatch):
    import gramvl.gram.meta as m

    monkeypatch.setattr(m, "token_norm", lambda bb: 0.1)  # radius = 0.5 x 0.1
    init = ToyHost().text_ctx.detach()
    _, free = _artifact(tmp_path / "free", outer_lr_theta=0.5)
    _, anchored = _artifact(tmp_path / "anchored", outer_lr_theta=0.5, theta_anchor=0.5)
    d_free = (load_artifact(free)[0]["text_ctx"] - init).norm(dim=-1)
    d_anch = (load_artifact(anchored)[0]["text_ctx"] - init).norm(dim=-1)
    assert d_free.max() > 0.2  # without the anchor θ leaves the initial context
    assert d_anch.max() <= 0.05 + 1e-6 and d_anch.max() > 0.045
    rows = {"text_ctx": torch.tensor([[4.0, 5.0], [1.01, 1.0]])}
    m.anchor_text_rows(rows, {"text_ctx": torch.ones(2, 2)}, 1.0)
    assert torch.allclose(rows["text_ctx"], torch.tensor([[1.6, 1.8], [1.01, 1.0]]))  # near rows unchanged
    with pytest.raises(GramvlError, match="theta_anchor"):
        _artifact(tmp_path / "bad", theta_anchor=-1.0)


def test_descent_guard_keeps_every_regulated_row_within_min_cos_of_the_gradient(tmp_path):
    torch.manual_seed(0)
    free = Regulator(16, rank=8, gate_init=-4.0)
    nn.init.normal_(free.up.weight, std=3.0)
    guarded = Regulator(16, rank=8, gate_init=-4.0, min_cos=0.6)
    guarded.load_state_dict(free.state_dict())
    g = torch.randn(64, 16) * torch.rand(64, 1) * 5
    cos_free = torch.nn.functional.cosine_similarity(free(g), g, dim=-1)
    out = guarded(g)
    cos = torch.nn.functional.cosine_similarity(out, g, dim=-1)
    assert cos_free.min() < 0.3  # the unguarded ψ turns some rows far (the case the guard is for)
    assert cos.min() >= 0.6 - 1e-5
    assert torch.allclose(out.norm(dim=-1), g.norm(dim=-1), rtol=1e-5)  # still norm-preserving
    kept = cos_free >= 0.6  # rows already within the bound are left exactly as they were
    assert kept.any() and torch.allclose(out[kept], free(g)[kept], atol=1e-6)
    turned = ~kept  # the others keep their side: the perpendicular parts point the same way
    pf = free(g)[turned] - (free(g)[turned] * g[turned]).sum(-1, keepdim=True) * g[turned] / g[turned].norm(
        dim=-1, keepdim=True).pow(2)
    pg = out[turned] - (out[turned] * g[turned]).sum(-1, keepdim=True) * g[turned] / g[turned].norm(
        dim=-1, keepdim=True).pow(2)
    assert torch.nn.functional.cosine_similarity(pf, pg, dim=-1).min() > 0.999
    out.sum().backward()  # differentiable, no NaN through the untaken branch
    assert all(torch.isfinite(p.grad).all() for p in guarded.parameters() if p.grad is not None)
    with pytest.raises(GramvlError, match="min_cos"):
        Regulator(16, min_cos=1.0)
    _, art = _artifact(tmp_path, psi_min_cos=0.5)  # the guard travels with the artifact
    psi = load_artifact(art)[1]
    assert psi.regs["text"].min_cos == 0.5 and load_artifact(art)[2]["regulator"]["min_cos"] == 0.5


def test_default_artifact_follows_the_packaged_model():
    from gramvl.backbone import small_model_ident
    from gramvl.gram.attach import resolve_artifact
    from gramvl.paths import assets_dir

    assert json.loads(resolve_artifact("default").with_suffix(".json").read_text())["backbone"] == small_model_ident()
    # the older artifacts stay, each for its own model: sessions 1-6 (small-v1) and session 7 (small-v2)
    for file, name in (("gram_coop.json", "small-v1"), ("gram_coop_v2.json", "small-v2")):
        old = json.loads((assets_dir() / file).read_text())
        assert old["backbone"] == small_model_ident(name) != small_model_ident()


def test_meta_training_gives_the_same_artifact_at_any_thread_count(tmp_path, small_random_backbone):
    """On the CPU the tasks of a meta-batch run at once, one intra-op thread each, each on its own copy of the
    host (a task sets class names and swaps slots), and their gradients are summed in task order: the artifact is
    the same bit for bit at 1 and 2 threads, and the same as one task after another at one thread ('intra-op',
    the loop before session 16)."""
    import threading
    from dataclasses import replace

    from safetensors.torch import load_file

    from gramvl.prompts import build_host

    bb = small_random_backbone
    words = ["cat", "dog", "car", "tree", "boat", "cup", "fish", "star"]

    class Sampler:  # every task has its own class names
        def sample(self, rng):
            idx, names = rng.permutation(60), list(rng.choice(words, 3, replace=False))
            return SimpleNamespace(classnames=names, support_idx=idx[:6], support_labels=[0, 1, 2] * 2,
                                   query_idx=idx[6:12], query_labels=[0, 1, 2] * 2, shift_idx=None)

    seen = set()

    class Batches(CorpusBatches):
        def batch(self, idx):
            seen.add((threading.current_thread().name, torch.get_num_threads()))
            return super().batch(idx)

    feats = torch.nn.functional.normalize(torch.randn(60, bb.embed_dim, generator=torch.Generator().manual_seed(3)),
                                          dim=-1)
    cfg = MetaConfig(host="coop", steps=3, meta_batch=4, checkpoint_every=100, host_cfg={"n_ctx": 2})
    before = torch.get_num_threads()
    arts = {}
    try:
        for mode, threads in (("tasks", 2), ("tasks", 1), ("intra-op", 1)):
            torch.set_num_threads(threads)
            seen.clear()
            host = build_host("coop", bb, words[:3], cfg.host_cfg)
            out = meta_train(replace(cfg, cpu_parallel=mode), host, Sampler(), Batches(feats),
                             tmp_path / f"{mode}_{threads}.safetensors", progress=False)
            arts[mode, threads] = load_file(str(out))
            assert torch.get_num_threads() == threads
            assert {t for _, t in seen} == {1}  # every task on one intra-op thread
            if threads == 2:
                assert len({name for name, _ in seen}) >= 2  # tasks ran in more than one thread
    finally:
        torch.set_num_threads(before)
    ref = arts["tasks", 1]
    assert not torch.equal(ref["theta.text_ctx"], build_host("coop", bb, words[:3], cfg.host_cfg).text_ctx)
    for key, art in arts.items():
        assert art.keys() == ref.keys() and all(torch.equal(art[k], ref[k]) for k in ref), key
    with pytest.raises(GramvlError, match="cpu_parallel must be one of"):
        meta_train(replace(cfg, cpu_parallel="threads"), build_host("coop", bb, words[:3], cfg.host_cfg), Sampler(),
                   Batches(feats), tmp_path / "bad.safetensors", progress=False)
