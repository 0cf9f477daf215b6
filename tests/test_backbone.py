"""Prompt slots reproduce plain CLIP encoding exactly, for real architectures and the small model."""

import pytest
import torch

from gramvl.backbone import load_backbone
from gramvl.errors import GramvlError

NAMES = ["cat", "golden retriever", "t-shirt", "ankle boot"]


@pytest.fixture(params=["vit_b16", "vit_b32", "small_random_backbone", "small_packaged"])
def bb(request):
    return request.getfixturevalue(request.param)


def test_context_of_a_photo_of_a_reproduces_encode_text(bb):
    with torch.no_grad():
        ref = bb.encode_texts([f"a photo of a {c}." for c in NAMES])
        cp = bb.class_prompts(NAMES, 4)
        out = bb.prompted_text_features(cp, bb.token_embeddings("a photo of a"))
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() < 1e-5


def test_class_token_front_and_middle_positions_match_the_written_prompt(bb):
    ctx = bb.token_embeddings("a photo of a")
    with torch.no_grad():
        front = bb.prompted_text_features(bb.class_prompts(NAMES, 4, "front"), ctx)
        mid = bb.prompted_text_features(bb.class_prompts(NAMES, 4, "middle"), ctx)
        ref_front = bb.encode_texts([f"{c} a photo of a." for c in NAMES])
        ref_mid = bb.encode_texts([f"a photo {c} of a." for c in NAMES])
    assert (front - ref_front).abs().max().item() < 1e-5
    assert (mid - ref_mid).abs().max().item() < 1e-5


def test_empty_visual_prompts_reproduce_encode_image(bb):
    torch.manual_seed(0)
    x = torch.randn(2, 3, bb.image_size, bb.image_size)
    with torch.no_grad():
        ref = torch.nn.functional.normalize(bb.model.encode_image(x), dim=-1)  # open_clip's own forward
        out = bb.encode_image(x, prompts=torch.zeros(0, bb.vision_width))
        plain = bb.encode_image(x)  # gramvl's direct block path for plain ViT towers
    assert bb._direct_vit
    assert (out - ref).abs().max().item() < 1e-5
    assert (plain - ref).abs().max().item() < 1e-5


def test_deep_text_prompts_equal_to_the_hidden_states_change_nothing(small_random_backbone):
    bb = small_random_backbone
    cp = bb.class_prompts(NAMES, 4)
    ctx = torch.randn(4, bb.text_width) * 0.02
    hidden = []
    blocks = bb._text.transformer.resblocks
    hooks = [b.register_forward_pre_hook(lambda m, a, kw: hidden.append(a[0].detach().clone()), with_kwargs=True)
             for b in blocks]
    with torch.no_grad():
        ref = bb.prompted_text_features(cp, ctx)
    for h in hooks:
        h.remove()
    # hidden[i]: input of block i, [C, L, d]; reuse its context rows as class-specific deep prompts
    deep = [hidden[i][:, 1:5] for i in range(1, 3)]
    with torch.no_grad():
        out = bb.prompted_text_features(cp, ctx, deep=deep)
        other = bb.prompted_text_features(cp, ctx, deep=[torch.randn(4, bb.text_width)])
    assert (out - ref).abs().max().item() < 1e-5
    assert (other - ref).abs().max().item() > 1e-3


def test_deep_visual_prompts_change_features_and_get_gradients(vit_b16):
    bb = vit_b16
    x = torch.randn(2, 3, bb.image_size, bb.image_size)
    p = torch.zeros(2, bb.vision_width, requires_grad=True)
    deep = [torch.zeros(2, bb.vision_width, requires_grad=True) for _ in range(bb.vision_layers - 1)]
    f = bb.encode_image(x, prompts=p, deep=deep)
    f.sum().backward()
    assert p.grad is not None and p.grad.abs().sum() > 0
    assert deep[-1].grad is not None and deep[-1].grad.abs().sum() > 0
    assert bb.vision_width == 768 and bb.vision_layers == 12


def test_chunked_and_checkpointed_text_encoding_matches_and_backpropagates(small_random_backbone):
    bb = small_random_backbone
    names = [f"class {i}" for i in range(10)]
    cp = bb.class_prompts(names, 4)
    ctx = torch.randn(4, bb.text_width, requires_grad=True)
    full = bb.prompted_text_features(cp, ctx, chunk_size=None)
    chunked = bb.prompted_text_features(cp, ctx, chunk_size=3, checkpoint=True)
    assert (full - chunked).abs().max().item() < 1e-5
    g1 = torch.autograd.grad(full.sum(), ctx)[0]
    g2 = torch.autograd.grad(chunked.sum(), ctx)[0]
    assert torch.allclose(g1, g2, atol=1e-5)


def test_batched_conditional_context_gives_one_text_set_per_image(small_random_backbone):
    bb = small_random_backbone
    cp = bb.class_prompts(NAMES, 4)
    ctx = torch.randn(3, 1, 4, bb.text_width)
    out = bb.prompted_text_features(cp, ctx)
    assert out.shape == (3, len(NAMES), bb.embed_dim)
    single = bb.prompted_text_features(cp, ctx[1, 0])
    assert (out[1] - single).abs().max().item() < 1e-5


def test_prompt_too_long_for_context_is_a_clear_error(small_random_backbone):
    with pytest.raises(GramvlError, match="prompt length mismatch"):
        small_random_backbone.class_prompts(["word " * 40], 4)


def test_context_of_wrong_width_is_a_clear_error(small_random_backbone):
    bb = small_random_backbone
    with pytest.raises(GramvlError, match="prompt length mismatch"):
        bb.prompted_text_features(bb.class_prompts(NAMES, 4), torch.zeros(4, bb.text_width + 1))


def test_missing_weights_file_says_how_to_obtain_it(tmp_path):
    with pytest.raises(GramvlError, match="never downloads"):
        load_backbone("ViT-B-32", tmp_path / "nope.pt")
    with pytest.raises(GramvlError, match="no weights file"):
        load_backbone("ViT-B-32")


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(GramvlError, match="unknown model"):
        load_backbone("ViT-Q-99", "random")


def test_weights_round_trip_and_wrong_backbone_is_detected(tmp_path, vit_b32):
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in vit_b32.model.state_dict().items() if k != "attn_mask"}
    st = tmp_path / "b32.safetensors"
    save_file(sd, str(st))
    pt = tmp_path / "b32.bin"
    torch.save(sd, pt)
    for f in (st, pt):
        bb = load_backbone("ViT-B-32", f)
        x = torch.randn(1, 3, 224, 224)
        with torch.no_grad():
            assert torch.allclose(bb.encode_image(x), vit_b32.encode_image(x), atol=1e-5)
    with pytest.raises(GramvlError, match="checkpoint from another backbone"):
        load_backbone("ViT-B-16", st)


def test_corrupt_weights_file_is_a_clear_error(tmp_path):
    f = tmp_path / "bad.safetensors"
    f.write_bytes(b"not a safetensors file")
    with pytest.raises(GramvlError, match="not a valid safetensors"):
        load_backbone("ViT-B-32", f)


def test_packaged_small_clip_is_a_trained_vit_with_its_sidecar(small_packaged):
    bb = small_packaged
    assert bb.ident.startswith("gramvl-small:")
    assert bb.is_vit and bb.vision_layers == 6 and bb.context_length == 32
    hist = bb.meta["pretrain"]["state"]["history"]
    assert hist and bb.meta["pretrain"]["state"]["best_step"] > 0
    assert float(bb.logit_scale) > 14.3  # learned above CLIP's initial 1/0.07


def test_text_encoding_reads_the_models_current_buffers():
    """`.to(device)` replaces buffers (the causal mask) with new tensors, and the encoders must read the new ones:
    a copy of the mask taken at load stayed on the CPU when the model moved to a GPU (session 5's H100 check;
    deep text prompts failed there). Simulated on the CPU: every tensor of the model is replaced by a clone
    and the old mask is poisoned."""
    from gramvl.backbone import Backbone, build_small_clip, small_tokenizer
    from gramvl.pretrain import PretrainConfig, _sidecar

    cfg = _sidecar(PretrainConfig(), {})
    torch.manual_seed(0)
    bb = Backbone(build_small_clip(cfg), small_tokenizer(cfg), "gramvl-small:random", meta=cfg)
    cp = bb.class_prompts(NAMES, 4)
    ctx = bb.token_embeddings("a photo of a")
    deep = [ctx + 0.01, ctx - 0.01]
    with torch.no_grad():
        ref = bb.prompted_text_features(cp, ctx)
        ref_deep = bb.prompted_text_features(cp, ctx, deep=deep)
    old = bb._text.attn_mask
    assert old is not None
    bb.model._apply(lambda t: t.clone())  # what a device move does to buffers
    old.fill_(float("nan"))
    assert bb._text.attn_mask is not old
    with torch.no_grad():
        out = bb.prompted_text_features(cp, ctx)
        out_deep = bb.prompted_text_features(cp, ctx, deep=deep)
    assert torch.allclose(out, ref, atol=1e-6) and torch.allclose(out_deep, ref_deep, atol=1e-6)


@pytest.mark.parametrize("masked", [False, True])
def test_last_block_at_pooled_rows_equals_the_full_block(small_random_backbone, masked):
    from gramvl.backbone import _block_sdpa, _block_sdpa_rows

    block = small_random_backbone._text.transformer.resblocks[-1]
    g = torch.Generator().manual_seed(0)
    N, L, d = 3, 9, small_random_backbone.text_width
    x = torch.randn(N, L, d, generator=g, requires_grad=True)
    mask = None
    if masked:
        mask = torch.full((L, L), float("-inf")).triu(1).view(1, 1, L, L)
    rows = torch.tensor([[8, 2], [0, 0], [5, 7]])
    full = _block_sdpa(block, x, mask)
    want = full.gather(1, rows.unsqueeze(-1).expand(-1, -1, d))
    got = _block_sdpa_rows(block, x, mask, rows)
    assert torch.allclose(got, want, atol=1e-5)
    w = torch.randn(got.shape, generator=g)
    (ga,) = torch.autograd.grad((want * w).sum(), x)
    (gb,) = torch.autograd.grad((got * w).sum(), x)
    assert torch.allclose(ga, gb, atol=1e-5)


def test_class_token_only_last_block_keeps_prompted_image_features(vit_b16):
    bb = vit_b16
    assert bb._cls_pool
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, bb.image_size, bb.image_size, generator=g)
    prompts = (torch.randn(2, bb.vision_width, generator=g) * 0.02).requires_grad_(True)
    deep = [(torch.randn(2, bb.vision_width, generator=g) * 0.02).requires_grad_(True)]
    fast = bb.encode_image(images, prompts=prompts, deep=deep)
    bb._cls_pool = False
    try:
        slow = bb.encode_image(images, prompts=prompts, deep=deep)
    finally:
        bb._cls_pool = True
    assert torch.allclose(fast, slow, atol=1e-5)
    ga = torch.autograd.grad(fast.sum(), [prompts, *deep])
    gb = torch.autograd.grad(slow.sum(), [prompts, *deep])
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(ga, gb, strict=True))


def test_small_with_weights_loads_that_file_not_the_packaged_one(tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from gramvl.backbone import small_model_paths

    src, side = small_model_paths()
    sd = load_file(str(src))
    sd["logit_scale"] = sd["logit_scale"] + 1.0
    other = tmp_path / "other.safetensors"
    save_file(sd, str(other))
    shutil.copy(side, other.with_suffix(".json"))
    bb = load_backbone("small", other)
    assert bb.ident == load_backbone(str(other)).ident != load_backbone("small").ident
    assert float(bb.model.logit_scale) == pytest.approx(float(sd["logit_scale"].float()))
    with pytest.raises(GramvlError, match="small CLIP checkpoint not found"):
        load_backbone("small", tmp_path / "nope.safetensors")
    with pytest.raises(GramvlError, match="must be a gramvl small-CLIP .safetensors"):
        load_backbone("small", tmp_path / "model.pt")


def test_every_packaged_small_clip_loads_by_name():
    from gramvl.backbone import SMALL_MODELS, small_model_ident

    assert set(SMALL_MODELS) == {"small", "small-v1", "small-v2"}
    # small-v1 made every table of sessions 1-6, small-v2 the session-7 `*_v2` tables (docs/results/ name them
    # by these idents)
    assert small_model_ident("small-v1") == "gramvl-small:df9e3fa9681d"
    assert small_model_ident("small-v2") == "gramvl-small:3ec54fee2231"
    assert len({small_model_ident(n) for n in SMALL_MODELS}) == 3
    cfg = load_backbone("small").meta["model_cfg"]
    for name, ident in (("small-v1", "gramvl-small:df9e3fa9681d"), ("small-v2", "gramvl-small:3ec54fee2231")):
        old = load_backbone(name)
        assert old.ident == ident and old.meta["model_cfg"] == cfg


def test_a_rows_features_do_not_depend_on_the_batch_it_falls_in(small_packaged):
    """On the CPU a batch of 1-3 rows goes through other matmul kernels than a larger one (other last bits), so
    the features that caches keep are encoded on at least MIN_ROWS rows: a row's bytes are then the same in a
    batch of 1, in the last short batch of a dataset, or in any torchrun process's share."""
    from gramvl.backbone import MIN_ROWS, pad_rows

    bb = small_packaged
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the way caches are filled (`cache_fill_map`)
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.rand(40, 3, bb.image_size, bb.image_size, generator=g)
        texts = [f"a photo of thing number {i}." for i in range(40)]
        with torch.no_grad():
            full = bb.encode_image_rows(x)
            assert torch.equal(full, bb.encode_image(x))  # a large batch is encoded as it is
            for bs in (1, 2, 3, 5, MIN_ROWS, 23):
                parts = torch.cat([bb.encode_image_rows(x[s:s + bs]) for s in range(0, len(x), bs)])
                assert torch.equal(parts, full), f"image batches of {bs}"
            ref = bb.encode_texts(texts)
            for bs in (1, 2, 3, 7):
                assert torch.equal(bb.encode_texts(texts, chunk_size=bs), ref), f"text chunks of {bs}"
        calls = []
        out = pad_rows(lambda t: calls.append(t.shape[0]) or t * 2, torch.arange(3.0))
        assert calls == [MIN_ROWS] and torch.equal(out, torch.tensor([0.0, 2.0, 4.0]))
        assert pad_rows(lambda t: calls.append(t.shape[0]) or t, torch.zeros(0, 2)).shape == (0, 2)
    finally:
        torch.set_num_threads(before)
