"""The steps whose memory the memory benchmarks measure (memory.py: CPU resident memory; memory_gpu.py: GPU
allocations): the peers' unpacked 77-token text encoding, and one GRAM meta-step with CoOp as host. Imported by
their child processes (the benchmarks folder is put on sys.path)."""

from __future__ import annotations

import contextlib

import torch


def use_peer_text_encoding(bb) -> tuple:
    """Make `bb` encode class prompts as the peers do: the full 77-token sequence for every class, one pass
    (no packing, no cut after the end-of-text token). Returns what `restore_text_encoding` needs."""
    from gramvl.backbone import _run_blocks

    plain = (bb._pack_plan, bb._text_forward)

    def full_len(x, eot, pos, deep):
        t = bb._text
        x = x + t.positional_embedding.to(x.dtype)
        x = _run_blocks(t.transformer, x, t.attn_mask, None)
        x = t.ln_final(x)[torch.arange(x.shape[0], device=x.device), eot]
        return x @ t.text_projection

    bb._pack_plan, bb._text_forward = (lambda *a, **k: None), full_len
    return plain


def restore_text_encoding(bb, plain: tuple) -> None:
    bb._pack_plan, bb._text_forward = plain


def gram_meta_step(host, batch, shift_names: list[str], second_order: bool, amp=contextlib.nullcontext):
    """One task of gramvl.gram.meta on `host`'s class names: a regulated inner step on a support batch, then the
    query loss and the shifted-query loss (`shift_names`) through the adapted context, backward to θ and ψ.
    `batch()` draws (inputs, labels). Returns step() -> (θ's gradient, ψ)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from gramvl.gram.meta import inner_adapt, meta_slots, slot_paths, task_loss
    from gramvl.gram.regulator import RegulatorSet

    for p in host.parameters():
        p.requires_grad_(False)
    slots = meta_slots(host, False)
    paths = slot_paths(host, slots)
    theta = {n: torch.nn.Parameter(host.slots()[n].detach().clone()) for n in slots}
    psi = RegulatorSet({"text": host.bb.text_width}, rank=32).to(host.bb.device)
    (sup, ys), (qry, yq), (sh, ysh) = batch(), batch(), batch()
    names = list(host.classnames)

    def step():
        for t in theta.values():
            t.grad = None
        with sdpa_kernel([SDPBackend.MATH]), amp():  # double backward through attention, as meta_train does
            host.set_classnames(names)
            adapted = inner_adapt(host, theta, psi, sup, ys, paths, 1, 1.0, second_order)
            lq, _ = task_loss(host, adapted, qry, yq, paths)
            host.set_classnames(shift_names)
            lsh, _ = task_loss(host, adapted, sh, ysh, paths)
            (lq + lsh).backward()
        return theta["text_ctx"].grad, psi

    return step
