"""Frozen features of the meta-training corpus: one image and one caption embedding per pair.

`encode_corpus` runs the frozen CLIP once over the pairs and caches the result under
`cache_dir('corpus')/<key>/` as `zI.npy`, `zT.npy` (float32, L2-normalized, opened memory-mapped) and
`corpus.json` (captions, image paths, model ident). Each file is written to a temp file and renamed into
place, and `corpus.json` is written last, so a crash never leaves a cache that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from gramvl.errors import GramvlError
from gramvl.io import write_json
from gramvl.paths import cache_dir, cache_fill_map, cache_fill_tag

if TYPE_CHECKING:
    from gramvl.backbone import Backbone

CORPUS_FORMAT = "gramvl.corpus/1"


def _normalize_np(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(n, 1e-12)


@dataclass
class CorpusFeatures:
    """Image features zI [N, D] and caption features zT [N, D] (L2-normalized; arrays, memmaps or
    `ShardedArray`s over feature shards, float32 or float16: readers cast rows to float32)."""

    zI: np.ndarray
    zT: np.ndarray
    captions: list[str]
    paths: list[str] = field(default_factory=list)
    ident: str = ""  # the backbone that produced the features
    key: str = ""  # cache key (model + pair list); "" for in-memory corpora

    def __post_init__(self) -> None:
        if self.zI.ndim != 2 or self.zI.shape != self.zT.shape:
            raise GramvlError(f"corpus features must be two [N, D] arrays of one shape, got "
                              f"{tuple(self.zI.shape)} and {tuple(self.zT.shape)}")
        if len(self.captions) != self.zI.shape[0]:
            raise GramvlError(f"corpus has {self.zI.shape[0]} feature rows but {len(self.captions)} captions")
        if self.paths and len(self.paths) != self.zI.shape[0]:
            raise GramvlError(f"corpus has {self.zI.shape[0]} feature rows but {len(self.paths)} image paths")

    def __len__(self) -> int:
        return int(self.zI.shape[0])

    @property
    def dim(self) -> int:
        return int(self.zI.shape[1])

    @classmethod
    def from_arrays(cls, zI: np.ndarray | torch.Tensor, zT: np.ndarray | torch.Tensor,
                    captions: Sequence[str], paths: Sequence[str] | None = None, normalize: bool = True,
                    ident: str = "", key: str = "") -> CorpusFeatures:
        """Wrap in-memory features (numpy or torch), L2-normalizing them unless normalize=False."""
        zI = zI.detach().cpu().numpy() if isinstance(zI, torch.Tensor) else zI
        zT = zT.detach().cpu().numpy() if isinstance(zT, torch.Tensor) else zT
        if normalize:
            zI, zT = _normalize_np(zI), _normalize_np(zT)
        else:
            zI, zT = np.asarray(zI, dtype=np.float32), np.asarray(zT, dtype=np.float32)
        return cls(zI, zT, list(captions), list(paths) if paths is not None else [], ident, key)

    def image(self, idx: np.ndarray | torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Image features of the given corpus indices as a float32 tensor [len(idx), D]."""
        return torch.from_numpy(np.ascontiguousarray(self.zI[_as_index(idx)], dtype=np.float32))

    def text(self, idx: np.ndarray | torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Caption features of the given corpus indices as a float32 tensor [len(idx), D]."""
        return torch.from_numpy(np.ascontiguousarray(self.zT[_as_index(idx)], dtype=np.float32))

    # ------------------------------------------------------------------------------- on disk
    def save(self, folder: str | Path, chunk: int = 65536) -> Path:
        """Write zI.npy, zT.npy and corpus.json into `folder` (each atomically; corpus.json last)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        n, d = self.zI.shape
        for name, arr in (("zI", self.zI), ("zT", self.zT)):
            with _atomic_npy(folder / f"{name}.npy", (n, d)) as out:
                for s in range(0, n, chunk):
                    out[s:s + chunk] = arr[s:s + chunk]
        write_json(folder / "corpus.json", {"format": CORPUS_FORMAT, "n": n, "dim": d, "ident": self.ident,
                                            "key": self.key, "captions": self.captions, "paths": self.paths})
        return folder

    @classmethod
    def load(cls, folder: str | Path, mmap: bool = True) -> CorpusFeatures:
        """Open a saved corpus (one zI/zT pair, or a folder of feature shards with a manifest.json); the
        feature arrays are memory-mapped (read-only) unless mmap=False."""
        folder = Path(folder)
        if (folder / "manifest.json").is_file():
            from gramvl.gram.shards import load_feature_shards

            return load_feature_shards(folder, mmap=mmap)
        meta_path = folder / "corpus.json"
        if not meta_path.is_file():
            raise GramvlError(f"no corpus features in {folder} (corpus.json missing)")
        try:
            meta = json.loads(meta_path.read_text())
            mode = "r" if mmap else None
            zI = np.load(folder / "zI.npy", mmap_mode=mode)
            zT = np.load(folder / "zT.npy", mmap_mode=mode)
        except (OSError, ValueError) as e:
            raise GramvlError(f"corpus cache {folder} is unreadable ({e}); delete it and re-encode") from e
        if meta.get("format") != CORPUS_FORMAT or tuple(zI.shape) != (meta["n"], meta["dim"]):
            raise GramvlError(f"corpus cache {folder} is stale or incomplete; delete it and re-encode")
        return cls(zI, zT, meta["captions"], meta.get("paths") or [], meta.get("ident", ""),
                   meta.get("key", ""))


def _as_index(idx) -> np.ndarray:
    if isinstance(idx, torch.Tensor):
        idx = idx.cpu().numpy()
    return np.asarray(idx, dtype=np.int64)


class _atomic_npy:
    """Context manager: a float32 .npy memmap in a temp file, renamed into place on success."""

    def __init__(self, path: Path, shape: tuple[int, int]):
        self.path, self.shape = Path(path), shape

    def __enter__(self) -> np.ndarray:
        fd, self.tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        os.close(fd)
        self.arr = np.lib.format.open_memmap(self.tmp, mode="w+", dtype=np.float32, shape=self.shape)
        return self.arr

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.arr.flush()
                del self.arr
                os.replace(self.tmp, self.path)
        finally:
            if os.path.exists(self.tmp):
                os.unlink(self.tmp)


def corpus_key(ident: str, pairs: Sequence[dict], fill: str) -> str:
    """Cache key of a corpus: the backbone ident, how it is encoded (`cache_fill_tag`) and a hash of every
    (image path, caption)."""
    h = hashlib.sha256()
    h.update(f"{CORPUS_FORMAT}\n{ident}\n{len(pairs)}\n{fill}\n".encode())
    for p in pairs:
        h.update(f"{p['image']}\t{p['caption']}\n".encode())
    return h.hexdigest()[:24]


class _PairImages(torch.utils.data.Dataset):
    def __init__(self, paths: list[str], transform):
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from gramvl.data.base import load_image

        return self.transform(load_image(self.paths[i]))


@torch.no_grad()
def encode_corpus(bb: Backbone, pairs: Sequence[dict], batch_size: int = 256, cache: bool = True,
                  progress: bool = True, workers: int = 2) -> CorpusFeatures:
    """Encode image-caption pairs ({"image", "caption"}) with the frozen backbone; cached, memory-mapped."""
    from tqdm import tqdm

    if not pairs:
        raise GramvlError("the corpus is empty: no image-caption pairs to encode")
    bad = [p for p in pairs[:1000] if "image" not in p or "caption" not in p]
    if bad:
        raise GramvlError(f"corpus pairs need 'image' and 'caption' keys; got {sorted(bad[0])}")
    key = corpus_key(bb.ident, pairs, cache_fill_tag(bb.device))
    folder = cache_dir("corpus") / key
    if cache and (folder / "corpus.json").is_file():
        try:
            return CorpusFeatures.load(folder)
        except GramvlError:
            pass  # stale or broken: re-encode below
    paths = [os.fspath(p["image"]) for p in pairs]
    captions = [str(p["caption"]) for p in pairs]
    n, d = len(pairs), int(bb.embed_dim)
    bb.eval()
    target = folder if cache else Path(tempfile.mkdtemp(prefix="gramvl-corpus-"))
    target.mkdir(parents=True, exist_ok=True)
    loader = torch.utils.data.DataLoader(_PairImages(paths, bb.transform(False)), batch_size=batch_size,
                                         shuffle=False, num_workers=workers)

    def batches():
        s = 0
        for x in tqdm(loader, desc="encode corpus", disable=not progress, leave=False, mininterval=2):
            yield s, x
            s += x.shape[0]

    def encode(batch):
        s, x = batch
        e = s + x.shape[0]
        return (s, e, bb.encode_image_rows(x.to(bb.device)).float().cpu().numpy(),
                bb.encode_texts(captions[s:e]).float().cpu().numpy())

    with _atomic_npy(target / "zI.npy", (n, d)) as zI, _atomic_npy(target / "zT.npy", (n, d)) as zT:
        for s, e, zi, zt in cache_fill_map(encode, batches(), bb.device):  # the same bytes at any thread count
            zI[s:e], zT[s:e] = zi, zt
    write_json(target / "corpus.json", {"format": CORPUS_FORMAT, "n": n, "dim": d, "ident": bb.ident,
                                        "key": key, "fill": cache_fill_tag(bb.device), "captions": captions,
                                        "paths": paths})
    return CorpusFeatures.load(target)
