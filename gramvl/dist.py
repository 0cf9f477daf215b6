"""Data-parallel runs under torchrun (`torchrun --nproc_per_node N -m gramvl train|protocol|meta-train ...`).

A process group is set up only when torchrun launched the process (RANK / WORLD_SIZE in the environment,
WORLD_SIZE > 1); otherwise every helper here is the identity and a run is exactly the single-process one.
Backend: gloo for CPU tensors, plus nccl for CUDA tensors when the run is on a GPU.

What is shared across ranks is decided by the callers (engine/train.py, gram/meta.py, data/features.py):
the global batch and the sample order stay those of one process; each rank computes a contiguous slice
(`shard`) and gradients are summed over ranks, weighted by slice size, *inside* autograd
(`reducing_gradients`), so that gradient hooks registered with `add_gradient_hook` (GRAM's ψ, which is
nonlinear) and hosts that combine several gradients (ProGrad's projection) see the gradient of the whole
batch, as in a single process. Files are written by rank 0 only (`is_main`).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator

import torch
import torch.distributed as torch_dist

from gramvl.errors import GramvlError

# How long a rank waits in a collective. Rank 0 alone fills caches while the others wait at a barrier
# (corpus encoding and clustering before meta-training), so this is longer than torch's 30-minute default.
DEFAULT_TIMEOUT_S = 4 * 3600


# ----------------------------------------------------------------------------------------- set-up
def launched() -> bool:
    """True when torchrun started this process as one of several ranks."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    """True inside an initialized process group of more than one rank."""
    return torch_dist.is_available() and torch_dist.is_initialized() and torch_dist.get_world_size() > 1


def rank() -> int:
    return torch_dist.get_rank() if active() else 0


def world() -> int:
    return torch_dist.get_world_size() if active() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if active() else 0


def is_main() -> bool:
    """Rank 0 (or a single process): the one that writes files, prints and shows progress bars."""
    return rank() == 0


def init_from_env(device: str = "cpu") -> bool:
    """Join the process group torchrun describes (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK).

    No-op (False) when not launched by torchrun or already initialized; True when this call set it up."""
    if not launched() or (torch_dist.is_available() and torch_dist.is_initialized()):
        return False
    if not torch_dist.is_available():
        raise GramvlError("torchrun launched gramvl but this torch build has no torch.distributed support")
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "LOCAL_RANK") if k not in os.environ]
    if missing:
        raise GramvlError(f"RANK is set but {', '.join(missing)} is not: launch data-parallel runs with "
                          f"`torchrun --nproc_per_node N -m gramvl ...`")
    backend = "gloo"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise GramvlError(f"--device {device} under torchrun, but CUDA is not available on this machine")
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        backend = "cpu:gloo,cuda:nccl"
    try:
        timeout = datetime.timedelta(seconds=float(os.environ.get("GRAMVL_DIST_TIMEOUT_S", DEFAULT_TIMEOUT_S)))
    except ValueError as e:
        raise GramvlError(f"GRAMVL_DIST_TIMEOUT_S must be a number of seconds ({e})") from e
    torch_dist.init_process_group(backend=backend, timeout=timeout)
    return True


def shutdown() -> None:
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def device_for(device: str) -> str:
    """'cuda' means this rank's GPU (cuda:LOCAL_RANK) under torchrun; anything else is kept."""
    return f"cuda:{local_rank()}" if active() and device == "cuda" else device


# ----------------------------------------------------------------------------------------- collectives
def barrier() -> None:
    if active():
        torch_dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. filling a cache); the other ranks run it after rank 0 is done."""
    if not active():
        yield
        return
    if not is_main():
        torch_dist.barrier()
    try:
        yield
    finally:
        if is_main():
            torch_dist.barrier()


def shard(n: int) -> tuple[int, int]:
    """This rank's contiguous slice [start, end) of n items; slice sizes differ by at most one."""
    w, r = world(), rank()
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    return start, start + base + (1 if r < extra else 0)


def _comm_device(t: torch.Tensor) -> torch.Tensor:
    return t if t.device.type in ("cpu", "cuda") else t.cpu()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of `t` over ranks (a new tensor; `t` itself is left alone)."""
    if not active():
        return t
    out = _comm_device(t.detach().clone())
    torch_dist.all_reduce(out)
    return out.to(t.device)


def broadcast_object(obj):
    """Rank 0's value of a picklable object, on every rank."""
    if not active():
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj) -> list:
    """Every rank's value of a picklable object, in rank order."""
    if not active():
        return [obj]
    out: list = [None] * world()
    torch_dist.all_gather_object(out, obj)
    return out


def all_true(flag: bool) -> bool:
    """True when `flag` holds on every rank."""
    if not active():
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int64)
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MIN)
    return bool(t.item())


def gather_rows(local: torch.Tensor) -> torch.Tensor:
    """Concatenate each rank's rows (dim 0, sizes may differ) in rank order, on every rank."""
    if not active():
        return local
    dev = local.device
    t = _comm_device(local.detach().contiguous())
    sizes = torch.zeros(world(), dtype=torch.int64, device=t.device)
    sizes[rank()] = t.shape[0]
    torch_dist.all_reduce(sizes)
    most = int(sizes.max())
    padded = torch.zeros((most, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[:t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(world())]
    torch_dist.all_gather(parts, padded)
    return torch.cat([p[:int(n)] for p, n in zip(parts, sizes.tolist(), strict=True)]).to(dev)


def gather_round_robin(local: list[torch.Tensor], total: int, width: int,
                       dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    """The `total` items of a round-robin split (item i computed on rank i % world), in item order, on every
    rank. `local` holds this rank's items in order, each a 1-D tensor of `width` values."""
    if not active():
        return list(local)
    w = world()
    buf = torch.zeros(-(-total // w), width, dtype=dtype)
    for j, t in enumerate(local):
        buf[j] = t.detach().to("cpu", dtype)
    parts = [torch.empty_like(buf) for _ in range(w)]
    torch_dist.all_gather(parts, buf)
    return [parts[i % w][i // w] for i in range(total)]


def broadcast_tensors(tensors: list[torch.Tensor]) -> None:
    """Overwrite every rank's tensors with rank 0's (in place)."""
    if not active():
        return
    with torch.no_grad():
        for t in tensors:
            c = _comm_device(t.detach().clone())
            torch_dist.broadcast(c, src=0)
            t.copy_(c.to(t.device))


# ----------------------------------------------------------------------------------------- gradients
class _Reduction:
    """The weight of this rank's slice during `reducing_gradients` (None outside: hooks do not communicate).
    Module-level, not thread-local: autograd runs CUDA hooks on its own device threads."""

    weight: float | None = None


_REDUCTION = _Reduction()


def _chain(param: torch.Tensor) -> Callable:
    def run(g: torch.Tensor) -> torch.Tensor:
        if _REDUCTION.weight is not None:
            g = _comm_device(g * _REDUCTION.weight)
            torch_dist.all_reduce(g)
            g = g.to(param.device)
        for fn in param._gramvl_grad_hooks:
            g = fn(g)
        return g

    return run


def add_gradient_hook(param: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
    """Like `param.register_hook(fn)`, except that inside `reducing_gradients` fn receives the gradient of
    the whole batch (summed over ranks) instead of this rank's share. fn=None only installs the reduction."""
    if not hasattr(param, "_gramvl_grad_hooks"):
        param._gramvl_grad_hooks = []
        param.register_hook(_chain(param))
    if fn is not None:
        param._gramvl_grad_hooks.append(fn)


@contextlib.contextmanager
def reducing_gradients(weight: float) -> Iterator[None]:
    """Backward passes in this block sum gradients over ranks as they are computed: each rank's gradient
    (of the mean loss of its slice) is scaled by `weight` (slice size / global batch) before the sum.
    Covers `.backward()` and `torch.autograd.grad` on parameters passed to `add_gradient_hook`; every
    rank must run the same backward passes (same graph), as the sums are collectives."""
    if not active():
        yield
        return
    _REDUCTION.weight = float(weight)
    try:
        yield
    finally:
        _REDUCTION.weight = None
