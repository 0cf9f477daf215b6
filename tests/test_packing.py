"""Packed text encoding (shared prompt prefix encoded once per sequence of several classes) is exact."""

import pytest
import torch

from gramvl.backbone import pack_plan

NAMES = ["rose", "cloud with lightning and rain", "sun", "waxing gibbous moon", "four leaf clover", "fire",
         "shooting star", "snowman without snow", "leaf fluttering in wind", "tulip"]


def _both(bb, cp, ctx, **kw):
    a = bb.prompted_text_features(cp, ctx)
    b = bb.prompted_text_features(cp, ctx, pack=True, pack_tokens=24, **kw)
    return a, b


@pytest.mark.parametrize("shape", [(16,), (3, 1, 16)])
def test_packed_features_and_gradients_equal_the_padded_ones(small_random_backbone, shape):
    bb = small_random_backbone
    cp = bb.class_prompts(NAMES, 16)
    ctx = (torch.randn(*shape, bb.text_width, generator=torch.Generator().manual_seed(0)) * 0.02)
    ctx.requires_grad_(True)
    for kw in ({}, {"chunk_size": 3, "checkpoint": True}):
        a, b = _both(bb, cp, ctx, **kw)
        assert cp._pack_plans[24] is not None and cp._pack_plans[24].pos.shape[0] > 1  # really packed
        assert torch.allclose(a, b, atol=1e-5)
        w = torch.randn_like(a)
        (ga,) = torch.autograd.grad((a * w).sum(), ctx)
        (gb,) = torch.autograd.grad((b * w).sum(), ctx)
        assert torch.allclose(ga, gb, atol=1e-5, rtol=1e-4)


def test_plain_prompts_and_unshareable_contexts_fall_back_or_match(small_random_backbone):
    bb = small_random_backbone
    cp = bb.class_prompts(NAMES, 4)
    a, b = _both(bb, cp, None)  # no context: the [SOT] prefix is shared
    assert torch.allclose(a, b, atol=1e-5)
    csc = torch.randn(len(NAMES), 4, bb.text_width) * 0.02  # class-specific context: padded path
    a, b = _both(bb, cp, csc)
    assert torch.equal(a, b)
    mid = bb.class_prompts(NAMES, 4, "middle")  # context after the class name: not packed
    ctx = torch.randn(4, bb.text_width) * 0.02
    a, b = _both(bb, mid, ctx)
    assert mid._pack_plans[24] is None and torch.equal(a, b)


def test_pack_plan_masks_other_classes_and_keeps_every_token_once():
    tokens = torch.tensor([[1, 7, 7, 5, 2, 0], [1, 7, 7, 6, 6, 2], [1, 7, 7, 9, 2, 0]])
    eot = torch.tensor([4, 5, 4])
    plan = pack_plan(tokens, eot, pack_tokens=6)
    assert plan.prefix == 3
    src = plan.src.flatten().tolist()
    for c in range(3):  # each class's own tokens after the prefix appear exactly once
        for p in range(3, int(eot[c]) + 1):
            assert src.count(c * 6 + p) == 1
    flat_mask = plan.mask.reshape(-1, plan.mask.shape[-1])
    G, P = plan.pos.shape
    R = plan.rows.shape[1]
    for c in range(3):
        g, r = divmod(int(plan.eot_row[c]), R)
        o = int(plan.rows[g, r])
        seen = {int(plan.src[g, j]) // 6 for j in range(P) if flat_mask[g * P + o, j] == 0 and j >= plan.prefix}
        assert seen == {c}  # the end-of-text token of class c sees the prefix and class c only


def test_pack_plan_rows_point_at_each_classes_end_of_text():
    tokens = torch.tensor([[1, 7, 7, 5, 2, 0], [1, 7, 7, 6, 6, 2], [1, 7, 7, 9, 2, 0], [1, 7, 7, 8, 2, 0]])
    eot = torch.tensor([4, 5, 4, 4])
    plan = pack_plan(tokens, eot, pack_tokens=6)
    G, P = plan.pos.shape
    R = plan.rows.shape[1]
    assert G > 1 and R > 1
    for c in range(4):  # the row read for class c holds class c's end-of-text token
        g, r = divmod(int(plan.eot_row[c]), R)
        assert int(plan.src[g, plan.rows[g, r]]) == c * tokens.shape[1] + int(eot[c])
