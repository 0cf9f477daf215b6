"""Where gramvl keeps its caches: $GRAMVL_HOME (default ~/.cache/gramvl)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from gramvl.errors import GramvlError


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


def cache_fill_threads() -> int:
    """CPU threads for encoding what a cache keeps: $GRAMVL_CACHE_THREADS, default 1 (0: the run's own count)."""
    raw = os.environ.get("GRAMVL_CACHE_THREADS", "1").strip()
    try:
        n = int(raw)
    except ValueError:
        n = -1
    if n < 0:
        raise GramvlError(f"GRAMVL_CACHE_THREADS must be a whole number >= 0 (0: the run's own thread count), "
                          f"not {raw!r}")
    return n


def cache_fill_tag(device) -> str:
    """What a cache key records of how its features were encoded: the device type, and on the CPU the fill's
    thread count (caches filled before this tag existed, at whatever thread count, are never served)."""
    import torch

    kind = torch.device(device).type
    if kind != "cpu":
        return kind
    return f"cpu-threads-{cache_fill_threads() or torch.get_num_threads()}"


@contextmanager
def cache_fill(device) -> Iterator[None]:
    """Encode features that a cache keeps on a fixed number of CPU threads (`cache_fill_threads`, default 1).

    Float sums depend on the thread count in the last bit (the small CLIP's image features at 1 and 2 threads
    differ in half the rows by up to 1.2e-7), and a cache outlives the run that filled it. Without this a run's
    result would depend on which earlier run filled the cache: the same command on one machine gave the demo's
    GRAM row 12.07 with a cache filled at 2 threads and 18.55 with one filled at 1. With it, the cached bytes
    are the same whatever thread count the runs use, and a result depends only on the run's own thread count.
    The encoders use the same count whether or not the cache is on. No effect off the CPU."""
    import torch

    n = cache_fill_threads()
    if n == 0 or torch.device(device).type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
