"""The field's few-shot protocol: K images per class by seed, the base/new class split, the harmonic mean."""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from gramvl import dist
from gramvl.data.base import ImageDataset
from gramvl.errors import GramvlError
from gramvl.io import write_json
from gramvl.paths import cache_dir

PARTS = ("base", "new", "all")


def samples_hash(dataset: ImageDataset) -> str:
    """A SHA-1 of the dataset's (path, label) list: the few-shot cache is only reused for the same samples."""
    h = hashlib.sha1()
    for path, label in dataset.samples:
        h.update(f"{path}\t{label}\n".encode())
    return h.hexdigest()


def fewshot_cache_path(dataset: ImageDataset, shots: int, seed: int) -> Path:
    """Where the indices of a (dataset, split, samples, shots, seed) draw are cached, under cache_dir('fewshot')."""
    safe = re.sub(r"[^A-Za-z0-9_.@-]+", "_", dataset.name).strip("_")[:60] or "dataset"
    split = re.sub(r"[^A-Za-z0-9_.-]+", "_", dataset.split)
    fname = f"{safe}-{split}-n{len(dataset)}-{samples_hash(dataset)[:16]}-shots{shots}-seed{seed}.json"
    return cache_dir("fewshot") / fname


def draw_few_shot(labels: list[int], shots: int, seed: int) -> list[int]:
    """Indices of `shots` samples per label (all of a label with fewer), drawn by a generator seeded by `seed`."""
    by_label: dict[int, list[int]] = defaultdict(list)
    for i, y in enumerate(labels):
        by_label[y].append(i)
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for y in sorted(by_label):
        idx = by_label[y]
        if len(idx) <= shots:
            chosen.extend(idx)
        else:
            chosen.extend(idx[j] for j in rng.choice(len(idx), size=shots, replace=False))
    return sorted(chosen)


def _read_cache(path: Path, meta: dict, n: int) -> list[int] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or any(data.get(k) != v for k, v in meta.items()):
        return None
    idx = data.get("indices")
    if not isinstance(idx, list) or not all(isinstance(i, int) and 0 <= i < n for i in idx):
        return None
    return idx


def sample_few_shot(dataset: ImageDataset, shots: int, seed: int, cache: bool = True) -> ImageDataset:
    """K = `shots` images per class drawn with `seed` (shots <= 0: all data); indices cached under $GRAMVL_HOME."""
    if shots <= 0:
        return dataset
    if seed < 0:
        raise GramvlError(f"few-shot seed must be a non-negative integer, got {seed}")
    meta = {"name": dataset.name, "split": dataset.split, "num_samples": len(dataset),
            "samples_sha1": samples_hash(dataset), "shots": shots, "seed": seed}
    path = fewshot_cache_path(dataset, shots, seed) if cache else None
    indices = _read_cache(path, meta, len(dataset)) if path is not None and path.is_file() else None
    if indices is None:
        indices = draw_few_shot(dataset.labels, shots, seed)
        if path is not None and dist.is_main():  # under torchrun every rank draws the same; rank 0 caches
            write_json(path, {**meta, "indices": indices})
    out = dataset.subset(indices, suffix=f"@{shots}shot-seed{seed}")
    out.extra["fewshot"] = {"shots": shots, "seed": seed, "parent": dataset.name, "indices": indices}
    return out


def base_new_classes(num_classes: int, part: str) -> list[int]:
    """Original labels of `part`: sorted labels, the first ceil(n/2) are base, the rest new, 'all' is every one."""
    if part not in PARTS:
        raise GramvlError(f"unknown class part {part!r}; expected one of {', '.join(PARTS)}")
    m = math.ceil(num_classes / 2)
    labels = list(range(num_classes))
    return labels if part == "all" else labels[:m] if part == "base" else labels[m:]


def split_base_new(dataset: ImageDataset, part: str) -> ImageDataset:
    """The `part` ('base', 'new' or 'all') classes of `dataset`, relabelled 0..m-1, name suffixed '@base'/'@new'."""
    selected = base_new_classes(dataset.num_classes, part)
    if part == "all":
        return dataset
    if not selected:
        raise GramvlError(f"{dataset.name} has {dataset.num_classes} class(es): too few for a {part!r} part "
                          f"(the base/new split needs at least 2 classes)")
    relabel = {y: i for i, y in enumerate(selected)}
    indices = [i for i, (_, y) in enumerate(dataset.samples) if y in relabel]
    out = dataset.subset(indices, relabel=relabel, classnames=[dataset.classnames[y] for y in selected],
                         suffix=f"@{part}")
    out.extra["base_new"] = {"part": part, "labels": selected}
    return out


def harmonic_mean(base: float, new: float) -> float:
    """Harmonic mean of base and new accuracy, 2*b*n/(b+n); 0 when both are 0."""
    if base + new == 0:
        return 0.0
    return 2.0 * base * new / (base + new)
