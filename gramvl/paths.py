"""Where gramvl keeps its caches: $GRAMVL_HOME (default ~/.cache/gramvl)."""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")
_RUN_THREADS: int | None = None  # the run's thread count while `one_thread` holds torch at one


def gramvl_home() -> Path:
    """The root of every gramvl cache (the embedded world, feature caches, few-shot indices)."""
    return Path(os.environ.get("GRAMVL_HOME", Path.home() / ".cache" / "gramvl")).expanduser()


def world_dir() -> Path:
    """The embedded world built by `gramvl world build`."""
    return gramvl_home() / "world"


def cache_dir(kind: str) -> Path:
    """A sub-cache, e.g. 'features' or 'fewshot'; created on demand."""
    p = gramvl_home() / "cache" / kind
    p.mkdir(parents=True, exist_ok=True)
    return p


def assets_dir() -> Path:
    """Files shipped inside the package (the small pretrained CLIP)."""
    return Path(__file__).resolve().parent / "assets"


def cache_fill_tag(device) -> str:
    """What a cache key records of how its features were encoded: on one intra-op thread per batch
    (`cache_fill_map`) and on at least MIN_ROWS rows (`gramvl.backbone.pad_rows`): 'cpu-threads-1-rows16' on the
    CPU, else the device type and the rows. Caches filled before either rule lack it and are never served."""
    import torch

    from gramvl.backbone import MIN_ROWS

    kind = torch.device(device).type
    return f"cpu-threads-1-rows{MIN_ROWS}" if kind == "cpu" else f"{kind}-rows{MIN_ROWS}"


def cache_fill_map(fn: Callable[[T], R], items: Iterable[T], device) -> Iterator[R]:
    """fn(item) for every item, in order, the way features that a cache keeps are encoded.

    Float sums depend on the thread count in the last bit (the small CLIP's image features of emoji-nature's test
    split differ in 555 of 1,140 rows, by up to 1.2e-7, between 1 and 2 threads), and a cache outlives the run
    that filled it: before session 15 a result depended on which earlier run had filled the cache (the demo's
    GRAM row read 12.07 on a fresh cache and 18.55 on an older one, both at 2 threads). So on the CPU every call
    runs on one intra-op thread, which gives the same bytes whatever thread count the run uses, and the run's
    threads are used by running that many calls at once instead (items are drawn in the calling thread, in
    order; inside `one_thread`, the run's count from before it). It is also faster than one batch after another
    on the run's intra-op threads, which it replaces (`benchmarks/cache_fill.py`, docs/results/cache_fill.md).
    Off the CPU: a plain map. The calls run in the caller's grad mode (thread-local in torch, so it is passed
    on), and the caller's thread count is restored afterwards."""
    import torch

    if torch.device(device).type != "cpu":
        yield from map(fn, items)
        return
    grad = torch.is_grad_enabled()

    def call(item: T) -> R:
        with torch.set_grad_enabled(grad):
            return fn(item)

    workers = run_threads()
    prior = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            pending: deque = deque()
            for item in items:
                pending.append(pool.submit(call, item))
                if len(pending) > workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
    finally:
        torch.set_num_threads(prior)


def run_threads() -> int:
    """The run's CPU thread count: torch's, or inside `one_thread` the count from before it."""
    import torch

    return max(1, _RUN_THREADS or torch.get_num_threads())


@contextmanager
def one_thread():
    """torch on one intra-op thread inside, so that float sums do not depend on the run's thread count (CMHC's
    clustering, which is cached too). The run's count is restored after, and a `cache_fill_map` inside still runs
    that many calls at once."""
    import torch

    global _RUN_THREADS
    outer, n = _RUN_THREADS, torch.get_num_threads()
    _RUN_THREADS = outer or n
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
        _RUN_THREADS = outer
