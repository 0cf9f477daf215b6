"""One entry point for every dataset name: embedded world names, `folder:ROOT`, and the standard datasets."""

from __future__ import annotations

import os

from gramvl.data.base import ImageDataset, load_folder
from gramvl.errors import GramvlError


def data_root(explicit: str | None = None) -> str | None:
    """Root of the standard datasets: --data-root, else $GRAMVL_DATA."""
    return explicit or os.environ.get("GRAMVL_DATA")


def get_dataset(name: str, split: str = "test", root: str | None = None) -> ImageDataset:
    """Resolve a dataset name to an ImageDataset of one split."""
    if name.startswith("folder:"):
        path = name[len("folder:"):]
        if not path:
            raise GramvlError("folder: needs a path, e.g. --dataset folder:/data/my_set")
        return load_folder(path, split, name=name)
    from gramvl.data.standard import STANDARD_DATASETS, load_standard

    if name in STANDARD_DATASETS:
        r = data_root(root)
        if not r:
            raise GramvlError(f"{name} is a standard dataset read from disk: pass --data-root DIR (or set "
                              f"GRAMVL_DATA) pointing at the folder that holds it; see docs/datasets.md")
        return load_standard(name, r, split)
    from gramvl.data.world import embedded_dataset_names, load_embedded

    try:
        embedded = embedded_dataset_names()
    except GramvlError:
        embedded = []
    if name in embedded:
        return load_embedded(name, split)
    known = ", ".join(embedded) if embedded else "(embedded world not built: run `gramvl world build`)"
    raise GramvlError(f"unknown dataset {name!r}. Embedded: {known}. Standard: "
                      f"{', '.join(sorted(STANDARD_DATASETS))} (with --data-root). Custom: folder:ROOT")
