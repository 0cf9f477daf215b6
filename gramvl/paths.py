"""Where gramvl keeps its caches: $GRAMVL_HOME (default ~/.cache/gramvl)."""

from __future__ import annotations

import os
from pathlib import Path


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
