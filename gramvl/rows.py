"""Row-parallel encoding on the CPU: a batch is cut into a fixed number of parts that run at once, one intra-op
thread each, so that a training run gives the same bytes at any thread count.

On the CPU the image tower's float sums depend on the intra-op thread count: the small CLIP's features of the same
4 images differ between 1 and 2 threads, and so do the prompts that VPT, IVLP and MaPLe learn from them (session 17,
docs/method.md). Inside `row_parallel()` (the trainer and `predict` enter it on the CPU) the encoders cut their rows
(images, class prompts or packed prompt sequences) into `ROW_PARTS` parts of ceil(n / ROW_PARTS) rows, at least
`MIN_PART` rows each (`spans`): a cut that depends only on n. Each part runs forward and backward on one
intra-op thread, the run's threads take parts at once (`gramvl.paths.cache_fill_map`), and the gradients of
tensors shared by all rows (the prompts) are summed in part order, as one process would. The rest of the step runs
on one thread (`gramvl.paths.one_thread`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch

from gramvl.paths import cache_fill_map, one_thread

# the cut: ROW_PARTS parts of ceil(n / ROW_PARTS) rows, at least MIN_PART rows each. It is fixed, so the cut (and every
# float sum) is the same at any thread count; 4 parts of 2 or more rows were among the fastest of the cuts tried at 2
# threads (1.22-1.48 times the intra-op step) and among the cheapest at 1 (0.81-0.85; docs/results/train_threads.md,
# train_threads_cuts.md)
ROW_PARTS = 4
MIN_PART = 2
_LOCAL = threading.local()


def active() -> bool:
    """True inside `row_parallel()` in this thread (worker threads never nest another cut)."""
    return getattr(_LOCAL, "on", False)


@contextmanager
def row_parallel(device="cpu") -> Iterator[None]:
    """Encoders cut their rows into parts (on the CPU; elsewhere a no-op) and the rest runs on one thread."""
    if torch.device(device).type != "cpu" or active():
        yield
        return
    _LOCAL.on = True
    try:
        with one_thread():
            yield
    finally:
        _LOCAL.on = False


def spans(n: int, parts: int | None = None) -> list[tuple[int, int]]:
    """The cut of n rows: `parts` (default ROW_PARTS) runs of ceil(n / parts) rows, at least MIN_PART each (fewer
    runs when n is small)."""
    size = max(MIN_PART, -(-n // (parts or ROW_PARTS)))
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def row_map(fn: Callable[..., torch.Tensor], rows: Sequence[torch.Tensor],
            shared: Sequence[torch.Tensor] = ()) -> torch.Tensor:
    """cat(fn(*row_parts, *shared) for each part of the cut), differentiable in every input.

    `rows` are cut along their first dimension (all of the same length); `shared` tensors go whole to every part.
    fn must be row-wise: its output's rows are those of its row inputs."""
    rows, shared = list(rows), list(shared)
    if rows[0].shape[0] == 0:
        return fn(*rows, *shared)
    cut = spans(rows[0].shape[0])
    if torch.is_grad_enabled() and any(t.requires_grad for t in rows + shared):
        return _RowMap.apply(fn, cut, len(rows), *rows, *shared)

    def part(span: tuple[int, int]) -> torch.Tensor:
        s, e = span
        return fn(*(r[s:e] for r in rows), *shared)

    return torch.cat(list(cache_fill_map(part, cut, rows[0].device)))


class _RowMap(torch.autograd.Function):
    """Forward: each part builds its own graph on detached inputs, in a worker thread. Backward: each part's graph
    runs in a worker thread; row gradients are concatenated, shared ones summed in part order."""

    @staticmethod
    def forward(ctx, fn, cut, n_rows, *tensors):
        need = ctx.needs_input_grad[3:]

        def part(span: tuple[int, int]):
            s, e = span
            with torch.enable_grad():
                ins = [(t[s:e] if i < n_rows else t).detach().requires_grad_(g)
                       for i, (t, g) in enumerate(zip(tensors, need, strict=True))]
                return ins, fn(*ins)

        ctx.parts = list(cache_fill_map(part, cut, tensors[0].device))
        ctx.cut, ctx.n_rows, ctx.need = cut, n_rows, need
        ctx.shapes = [(t.shape, t.dtype, t.device) for t in tensors]
        return torch.cat([out.detach() for _, out in ctx.parts])

    @staticmethod
    def backward(ctx, grad):
        def part(i: int):
            ins, out = ctx.parts[i]
            s, e = ctx.cut[i]
            wrt = [x for x, g in zip(ins, ctx.need, strict=True) if g]
            # the parts' graphs live as long as this node (a second backward, as ProGrad's, runs them again)
            return torch.autograd.grad(out, wrt, grad[s:e], allow_unused=True, retain_graph=True)

        per_part = list(cache_fill_map(part, range(len(ctx.parts)), grad.device))
        grads: list[torch.Tensor | None] = []
        k = 0
        for i, g in enumerate(ctx.need):
            if not g:
                grads.append(None)
                continue
            shape, dtype, device = ctx.shapes[i]
            got = [p[k] for p in per_part]
            k += 1
            if i < ctx.n_rows:
                grads.append(torch.cat([x if x is not None else torch.zeros((e - s, *shape[1:]), dtype=dtype,
                                                                                device=device)
                                        for x, (s, e) in zip(got, ctx.cut, strict=True)]))
            else:
                total = torch.zeros(shape, dtype=dtype, device=device)
                for x in got:  # in part order
                    if x is not None:
                        total = total + x
                grads.append(total)
        return (None, None, None, *grads)


def row_apply(fn: Callable[..., torch.Tensor], args: Sequence[torch.Tensor | None],
              is_row: Sequence[bool]) -> torch.Tensor:
    """fn(*args) through `row_map`: the args flagged in is_row are cut into parts, the others go whole to every
    part; None args pass through as None."""
    idx_rows = [i for i, (a, r) in enumerate(zip(args, is_row, strict=True)) if r and a is not None]
    idx_shared = [i for i, (a, r) in enumerate(zip(args, is_row, strict=True)) if not r and a is not None]

    def call(*ts: torch.Tensor) -> torch.Tensor:
        full = list(args)
        for i, t in zip(idx_rows + idx_shared, ts, strict=True):
            full[i] = t
        return fn(*full)

    return row_map(call, [args[i] for i in idx_rows], [args[i] for i in idx_shared])
