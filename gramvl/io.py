"""Atomic writes: a crash never leaves a half-written checkpoint or result file behind."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


def _atomic_replace(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically (temp file in the same folder, then rename)."""

    def _w(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False, default=str)
            f.write("\n")

    _atomic_replace(Path(path), _w)


def write_text(path: str | Path, text: str) -> None:
    def _w(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    _atomic_replace(Path(path), _w)


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], sidecar: dict | None = None) -> None:
    """Save tensors as safetensors (never pickles) plus an optional JSON sidecar `<path>.json`."""
    path = Path(path)
    clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _atomic_replace(path, lambda tmp: save_file(clean, tmp))
    if sidecar is not None:
        write_json(sidecar_path(path), sidecar)


def sidecar_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_suffix(".json")


def load_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Load a safetensors file and its JSON sidecar (None if absent)."""
    from gramvl.errors import GramvlError

    path = Path(path)
    if not path.is_file():
        raise GramvlError(f"file not found: {path}")
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises several types
        raise GramvlError(f"{path} is not a valid safetensors file ({e})") from e
    side = sidecar_path(path)
    meta = json.loads(side.read_text()) if side.is_file() else None
    return tensors, meta
