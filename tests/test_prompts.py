"""Host methods: slot shapes read from the model, logits, gradients only on trainable tensors, the maths."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from gramvl.errors import GramvlError
from gramvl.prompts import (
    HOSTS,
    CoCoOp,
    CoOp,
    HostConfig,
    KgCoOp,
    LinearProbe,
    ProGrad,
    ZeroShot,
    build_host,
    host_config,
)
from gramvl.prompts.common import scale_depth
from gramvl.prompts.prograd import distill_kl, project_conflicting

NAMES = ["cat", "golden retriever", "t-shirt", "ankle boot", "airliner"]
LABELS = torch.tensor([1, 2])


def make_batch(bb, seed: int = 0, n: int = 2) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"features": F.normalize(torch.randn(n, bb.embed_dim, generator=g), dim=-1),
            "images": torch.randn(n, 3, bb.image_size, bb.image_size, generator=g)}


def expected_slots(name: str, bb) -> dict[str, tuple]:
    """Slot shapes of each host's default config, from the backbone's widths and depths."""
    dt, dv, Lt, Lv = bb.text_width, bb.vision_width, bb.text_layers, bb.vision_layers
    md = scale_depth(min(Lt, Lv))
    return {
        "zeroshot": {}, "linear_probe": {},
        "coop": {"text_ctx": (16, dt)}, "prograd": {"text_ctx": (16, dt)},
        "cocoop": {"text_ctx": (4, dt)}, "kgcoop": {"text_ctx": (4, dt)},
        "vpt": {"vis_ctx": (8, dv)}, "vpt-deep": {"vis_ctx": (8, dv), "vis_deep": (Lv - 1, 8, dv)},
        "ivlp": {"text_ctx": (2, dt), "text_deep": (Lt - 1, 2, dt), "vis_ctx": (2, dv),
                 "vis_deep": (Lv - 1, 2, dv)},
        "maple": {"text_ctx": (2, dt), "text_deep": (md - 1, 2, dt)},
        "promptsrc": {"text_ctx": (4, dt), "text_deep": (scale_depth(Lt) - 1, 4, dt), "vis_ctx": (4, dv),
                      "vis_deep": (scale_depth(Lv) - 1, 4, dv)},
    }[name]


# ---------------------------------------------------------------------------------------------- registry
def test_registry_has_every_method_and_unknown_names_are_a_clear_error(small_random_backbone):
    assert set(HOSTS) == {"zeroshot", "coop", "cocoop", "kgcoop", "prograd", "vpt", "vpt-deep", "ivlp",
                          "maple", "promptsrc", "linear_probe"}
    with pytest.raises(GramvlError, match="unknown method 'cooop'.*coop, cocoop"):
        build_host("cooop", small_random_backbone, NAMES)


def test_every_host_has_a_sourced_recipe_and_coop_epochs_follow_shots():
    for cls in HOSTS.values():
        assert cls.default_recipe.source and cls.recipe_for(16).lr > 0
    assert [CoOp.recipe_for(k).epochs for k in (1, 2, 4, 8, 16)] == [50, 100, 100, 200, 200]
    assert ProGrad.recipe_for(1).epochs == 50 and KgCoOp.recipe_for(1).epochs == 100


# ---------------------------------------------------------------------------------------------- every host
@pytest.mark.parametrize("name", sorted(HOSTS))
def test_vit_b16_slots_logits_and_gradients_only_on_trainable_tensors(vit_b16, name):
    bb = vit_b16
    names = NAMES[:3]  # ViT-B/16 on 2 CPU cores: keep the text batch small
    host = build_host(name, bb, names)
    assert {k: tuple(v.shape) for k, v in host.slots().items()} == expected_slots(name, bb)
    own = dict(host.named_parameters())
    for k, p in host.slots().items():  # slot names are parameter names: functional_call can substitute them
        assert own[k] is p
    n = 2 if host.image_side_frozen else 1  # one 224 px image for hosts that prompt the image tower
    batch = make_batch(bb, n=n)
    logits = host.logits(batch)
    assert logits.shape == (n, len(names)) and torch.isfinite(logits).all()
    trainable = host.trainable_parameters()
    if name == "zeroshot":
        assert trainable == [] and host.image_side_frozen
        return
    host.zero_grad(set_to_none=True)
    loss = host.backward(batch, LABELS[:n])
    assert torch.isfinite(loss)
    ids = {id(p) for p in trainable}
    for n, p in host.named_parameters():
        if id(p) in ids:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n
        else:
            assert n.startswith("bb.") and p.grad is None and not p.requires_grad, n
    assert host.image_side_frozen == (name in ("coop", "cocoop", "kgcoop", "prograd", "linear_probe"))


@pytest.mark.parametrize("name", sorted(HOSTS))
def test_small_model_widths_and_depths_are_read_from_the_backbone(small_random_backbone, name):
    bb = small_random_backbone
    host = build_host(name, bb, NAMES)
    assert {k: tuple(v.shape) for k, v in host.slots().items()} == expected_slots(name, bb)
    with torch.no_grad():
        assert host(make_batch(bb)).shape == (2, len(NAMES))


def test_maple_coupling_maps_text_width_to_each_models_vision_width(vit_b16, small_random_backbone):
    big = build_host("maple", vit_b16, NAMES)
    assert big.depth == 9 and len(big.coupling) == 9
    assert all(f.in_features == 512 and f.out_features == 768 for f in big.coupling)
    small = small_random_backbone
    host = build_host("maple", small, NAMES)
    assert host.depth == scale_depth(min(small.text_layers, small.vision_layers)) == 3
    widths = (small.text_width, small.vision_width)
    assert all((f.in_features, f.out_features) == widths for f in host.coupling)
    assert [tuple(v.shape) for v in host.vision_prompts()] == [(2, small.vision_width)] * 3
    assert host.fixed_words == "of a"  # 'a photo' learned, 'of a' kept as words, as MaPLe's code does


# ---------------------------------------------------------------------------------------------- CoOp family
def test_coop_with_a_photo_of_a_equals_zero_shot(vit_b16):
    bb = vit_b16
    coop = build_host("coop", bb, NAMES, HostConfig(n_ctx=4, ctx_init="a photo of a"))
    zs = build_host("zeroshot", bb, NAMES, HostConfig(templates=["a photo of a {}."]))
    batch = make_batch(bb)
    with torch.no_grad():
        assert (coop.logits(batch) - zs.logits(batch)).abs().max().item() < 1e-4


def test_context_init_with_the_wrong_token_count_is_a_clear_error(small_random_backbone):
    with pytest.raises(GramvlError, match="prompt length mismatch"):
        CoOp(small_random_backbone, NAMES, HostConfig(n_ctx=3, ctx_init="a photo of a"))


def test_random_init_is_seeded_and_leaves_the_global_rng_alone(small_random_backbone):
    bb = small_random_backbone
    cfg = HostConfig(n_ctx=8, ctx_init="", seed=3)
    state = torch.random.get_rng_state()
    a, b = CoOp(bb, NAMES, cfg), CoOp(bb, NAMES, cfg)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a.text_ctx, b.text_ctx) and 0.01 < a.text_ctx.std().item() < 0.03


def test_class_specific_context_cannot_change_classes(small_random_backbone):
    host = CoOp(small_random_backbone, NAMES, HostConfig(n_ctx=4, ctx_init="", csc=True))
    assert host.text_ctx.shape == (len(NAMES), 4, small_random_backbone.text_width)
    host.set_classnames(list(NAMES))  # the same classes are fine
    with pytest.raises(GramvlError, match="class-specific"):
        host.set_classnames(["zebra", "lamp"])


@pytest.mark.parametrize("name", ["coop", "cocoop", "kgcoop", "prograd", "vpt", "ivlp", "maple", "promptsrc"])
def test_base_to_new_keeps_the_slots_and_changes_the_label_space(small_random_backbone, name):
    bb = small_random_backbone
    host = build_host(name, bb, NAMES)
    before = {k: v.detach().clone() for k, v in host.slots().items()}
    host.set_classnames(["zebra", "lamp", "violin"])
    with torch.no_grad():
        assert host.logits(make_batch(bb)).shape == (2, 3)
    assert all(torch.equal(before[k], v) for k, v in host.slots().items())


def test_functional_call_substitutes_slots_without_touching_the_host(small_random_backbone):
    bb = small_random_backbone
    host = build_host("coop", bb, NAMES)
    batch = make_batch(bb)
    new = torch.randn_like(host.text_ctx) * 0.02
    out = torch.func.functional_call(host, {"text_ctx": new}, (batch,))
    ref = CoOp(bb, NAMES, host.cfg)
    with torch.no_grad():
        ref.text_ctx.copy_(new)
        assert torch.allclose(out, ref.logits(batch), atol=1e-5)
        assert not torch.allclose(out, host.logits(batch), atol=1e-3)
    loss = torch.func.functional_call(host, {"text_ctx": new}, (batch, LABELS))
    assert loss.dim() == 0


def test_frozen_text_caches_class_features_for_evaluation(small_random_backbone):
    bb = small_random_backbone
    host = build_host("maple", bb, NAMES)
    batch = make_batch(bb)
    with torch.no_grad():
        ref = host.logits(batch)
        with host.frozen_text():
            a, b = host.logits(batch), host.logits(batch)
            assert host._text_cache is not None
    assert torch.allclose(a, ref, atol=1e-6) and torch.equal(a, b) and host._text_cache is None


def test_cocoop_batched_context_equals_a_loop_over_images(small_random_backbone):
    bb = small_random_backbone
    host = CoCoOp(bb, NAMES)
    batch = make_batch(bb, seed=1)
    with torch.no_grad():
        batched = host.logits(batch)
        img = batch["features"]
        ctx = host.conditional_context(img)
        rows = [bb.logit_scale * img[i] @ host.encode_classes(ctx[i]).t() for i in range(len(img))]
    assert (batched - torch.stack(rows)).abs().max().item() < 1e-5
    first = host.meta_net[0]
    assert (first.in_features, first.out_features) == (bb.embed_dim, bb.embed_dim // 16)
    assert host.meta_net[2].out_features == bb.text_width


def test_cocoop_zero_meta_init_starts_at_the_handwritten_prompt(small_random_backbone):
    bb = small_random_backbone
    batch = make_batch(bb, seed=2)
    coop = CoOp(bb, NAMES, HostConfig(n_ctx=4, ctx_init="a photo of a"))
    zero = CoCoOp(bb, NAMES, dataclasses.replace(CoCoOp.default_config(bb), meta_init="zero"))
    paper = CoCoOp(bb, NAMES)
    with torch.no_grad():
        ref = coop.logits(batch)
        assert torch.allclose(zero.logits(batch), ref, atol=1e-5)
        assert not torch.allclose(paper.logits(batch), ref, atol=1e-3)  # the paper init moves the prompt
    loss = F.cross_entropy(zero.logits(batch), LABELS)
    loss.backward()
    assert zero.meta_net[2].weight.grad.abs().max() > 0  # the meta-net still learns from the first step
    with pytest.raises(GramvlError, match="meta_init"):
        CoCoOp(bb, NAMES, dataclasses.replace(CoCoOp.default_config(bb), meta_init="small"))


def test_kgcoop_loss_is_ce_plus_lambda_distance_and_zero_at_the_handwritten_init(small_random_backbone):
    bb = small_random_backbone
    host = KgCoOp(bb, NAMES, HostConfig(n_ctx=4, ctx_init="a photo of a", templates=["a photo of a {}."]))
    batch = make_batch(bb)
    with torch.no_grad():
        assert host.kg_distance().item() < 1e-8
        host.text_ctx.add_(torch.randn_like(host.text_ctx) * 0.05)
    logits = host.logits(batch)
    loss = host.loss(logits, LABELS, batch)
    dist = host.kg_distance()
    assert dist.item() > 1e-6
    assert torch.allclose(loss, F.cross_entropy(logits, LABELS) + 8.0 * dist, atol=1e-6)


def test_projection_removes_only_the_conflicting_component():
    g_ref = torch.tensor([1.0, 0.0, 0.0])
    g = torch.tensor([-2.0, 1.0, 3.0])
    out = project_conflicting(g, g_ref)
    assert torch.allclose(out, torch.tensor([0.0, 1.0, 3.0]))
    agree = torch.tensor([2.0, 1.0, 0.0])
    assert torch.equal(project_conflicting(agree, g_ref), agree)


def test_prograd_projected_gradient_does_not_oppose_the_zero_shot_direction(small_random_backbone):
    bb = small_random_backbone
    host = ProGrad(bb, NAMES, HostConfig(n_ctx=4, ctx_init=""))  # random context: not the teacher
    batch = make_batch(bb, seed=2)
    teacher = host.zeroshot_logits(batch)
    labels = teacher.argmin(-1)  # the classes zero-shot CLIP likes least: CE and KL should disagree
    logits = host.logits(batch)
    g_ce = torch.autograd.grad(F.cross_entropy(logits, labels), host.text_ctx, retain_graph=True)[0]
    g_kl = torch.autograd.grad(distill_kl(logits, teacher), host.text_ctx)[0]
    dot = torch.dot(g_ce.flatten(), g_kl.flatten())
    assert dot < 0, "test setup should produce a conflict"
    host.zero_grad(set_to_none=True)
    host.backward(batch, labels)
    g = host.text_ctx.grad
    assert torch.dot(g.flatten(), g_kl.flatten()).item() >= -1e-6 * g_kl.norm().item() * g_ce.norm().item()
    assert torch.allclose(g, g_ce - dot / g_kl.pow(2).sum() * g_kl, atol=1e-7)
    assert host.last_stats["conflicts"] == 1


def test_prograd_pads_the_init_words_at_the_end_of_the_context(small_random_backbone):
    bb = small_random_backbone
    host = ProGrad(bb, NAMES)
    assert host.text_ctx.shape == (16, bb.text_width)
    assert torch.equal(host.text_ctx[:12], torch.zeros(12, bb.text_width))
    assert torch.allclose(host.text_ctx[12:], bb.token_embeddings("a photo of a"))


# ---------------------------------------------------------------------------------------------- others
def test_zero_shot_ensemble_averages_templates(small_random_backbone):
    bb = small_random_backbone
    temps = ["a photo of a {}.", "a sketch of a {}."]
    host = ZeroShot(bb, NAMES, HostConfig(templates=temps))
    w = F.normalize(sum(bb.encode_texts([t.format(c) for c in NAMES]) for t in temps), dim=-1)
    assert torch.allclose(host.zeroshot_text(), w, atol=1e-5)
    assert host.zeroshot_text() is host.zeroshot_text()  # cached per class names


def test_vpt_deep_alias_prompts_every_vision_block(small_random_backbone):
    bb = small_random_backbone
    host = build_host("vpt-deep", bb, NAMES, HostConfig(n_vis_ctx=3))
    assert host.depth == bb.vision_layers
    assert host.vis_deep.shape == (bb.vision_layers - 1, 3, bb.vision_width)
    with pytest.raises(GramvlError, match="prompt depth"):
        build_host("vpt", bb, NAMES, HostConfig(depth=bb.vision_layers + 1))


def test_linear_probe_fits_a_separable_problem_and_picks_l2_on_val(small_random_backbone):
    bb = small_random_backbone
    g = torch.Generator().manual_seed(0)
    centers = F.normalize(torch.randn(3, bb.embed_dim, generator=g), dim=-1)

    def sample(n):
        y = torch.arange(3).repeat(n)
        return centers[y] + 0.05 * torch.randn(len(y), bb.embed_dim, generator=g), y

    xt, yt = sample(4)
    xv, yv = sample(3)
    host = LinearProbe(bb, ["a", "b", "c"])
    assert host.slots() == {}
    report = host.fit(xt, yt, xv, yv)
    assert report["train_accuracy"] == 1.0 and report["val_accuracy"] == 1.0
    assert report["l2"] in report["val_by_l2"]
    with torch.no_grad():
        assert (host.logits({"features": xv}).argmax(-1) == yv).all()
    with pytest.raises(GramvlError, match="linear probe"):
        host.set_classnames(["d", "e"])


def test_overrides_apply_on_top_of_the_methods_own_defaults(small_random_backbone):
    bb = small_random_backbone
    host = build_host("maple", bb, NAMES, {"n_ctx": 4, "seed": 2})
    assert host.cfg.n_ctx == 4 and host.depth == 3 and host.cfg.seed == 2 and host.fixed_words == ""
    assert host_config("coop", bb).n_ctx == 16 and host_config("cocoop", bb).n_ctx == 4
    with pytest.raises(GramvlError, match="unknown host option"):
        host_config("coop", bb, {"n_cxt": 4})


def test_host_config_is_not_shared_between_hosts(small_random_backbone):
    a = build_host("coop", small_random_backbone, NAMES)
    b = build_host("coop", small_random_backbone, NAMES)
    assert a.cfg is not b.cfg and dataclasses.asdict(a.cfg) == dataclasses.asdict(b.cfg)


def test_coop_random_init_std_is_configurable(small_random_backbone):
    names = ["cat", "dog"]
    default = build_host("coop", small_random_backbone, names, {"n_ctx": 16}).text_ctx.detach()
    wide = build_host("coop", small_random_backbone, names, {"n_ctx": 16, "init_std": 0.2}).text_ctx.detach()
    assert default.std().item() == pytest.approx(0.02, rel=0.15)
    assert wide.std().item() == pytest.approx(0.2, rel=0.15)
    assert torch.allclose(wide, default * 10, atol=1e-6)  # the same seeded draw, scaled


def test_trainer_precision_is_checked_and_gpu_only_precision_on_the_cpu_warns(small_random_backbone):
    from gramvl.engine.train import Trainer
    from gramvl.prompts import HOSTS, build_host

    host = build_host("coop", small_random_backbone, ["cat", "dog"])
    recipe = HOSTS["coop"].recipe_for(1)
    with pytest.warns(UserWarning, match="GPU only; this run on cpu is fp32"):
        Trainer(host, recipe, seed=1, device="cpu", precision="bf16", progress=False)
    with pytest.raises(GramvlError, match="unknown precision 'bf15'"):
        Trainer(host, recipe, seed=1, precision="bf15", progress=False)


@pytest.mark.parametrize("method", ["coop", "prograd"])
def test_fp16_loss_scaling_gives_the_unscaled_step_and_skips_overflowing_ones(small_random_backbone, tmp_path,
                                                                             method):
    # the GPU fp16 path's GradScaler, exercised on the CPU: a power-of-two scale leaves the fp32 update
    # unchanged, and a scale that overflows the loss skips the step (parameters untouched) and is lowered
    from PIL import Image

    from gramvl.data.base import ImageDataset
    from gramvl.engine.train import Trainer
    from gramvl.prompts.base import Recipe

    paths = []
    for i in range(6):
        p = tmp_path / f"{i}.png"
        Image.new("RGB", (16, 16), (40 * i, 255 - 30 * i, 90)).save(p)
        paths.append((str(p), i % 2))
    ds = ImageDataset("toy", "train", ["cat", "dog"], paths)
    recipe = Recipe(epochs=1, lr=0.5, batch_size=6, train_views=1, warmup_epochs=0)

    def run(scale):
        host = build_host(method, small_random_backbone, ["cat", "dog"], {"n_ctx": 4, "ctx_init": ""})
        start = host.text_ctx.detach().clone()
        tr = Trainer(host, recipe, seed=1, progress=False)
        if scale is not None:
            tr._scaler = torch.amp.GradScaler("cpu", init_scale=scale)
        tr.fit(ds)
        return start, host.text_ctx.detach().clone(), tr

    start, plain, _ = run(None)
    assert not torch.equal(start, plain)
    _, scaled, _ = run(2.0 ** 12)
    assert torch.allclose(scaled, plain, atol=1e-6)
    start, over, tr = run(2.0 ** 127)  # loss x 2^127 overflows fp32: inf gradients
    assert torch.equal(over, start) and tr._scaler.get_scale() < 2.0 ** 127
