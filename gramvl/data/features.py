"""Image-feature cache: frozen image towers are run once per (model, dataset, split, transform, views).

Hosts whose image side is frozen (zero-shot, CoOp, CoCoOp, KgCoOp, ProGrad, linear probe) train on these
cached features, so an epoch costs only text-encoder passes. Augmented views are cached as a fixed number
of feature views per image (deterministic per seed).

Under torchrun, test-transform features are encoded in shards (one per rank) and gathered; augmented views
are encoded by rank 0 (one augmentation stream, as in a single process) and read from its cache by the
others. Only rank 0 writes the cache.
"""

from __future__ import annotations

import hashlib
import json

import torch
from tqdm import tqdm

from gramvl import dist
from gramvl.backbone import Backbone
from gramvl.data.base import ImageDataset
from gramvl.io import load_tensors, save_tensors
from gramvl.paths import cache_dir, cache_fill_map, cache_fill_tag


def _key(bb: Backbone, ds: ImageDataset, transform_desc: str, views: int, seed: int) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([bb.ident, ds.name, ds.split, transform_desc, views, seed,
                         cache_fill_tag(bb.device)]).encode())
    for p, y in ds.samples:
        h.update(f"{p}\t{y}\n".encode())
    return h.hexdigest()[:24]


def _loader(ds: ImageDataset, batch_size: int, workers: int):
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers,
                                       persistent_workers=False)


@torch.no_grad()
def image_features(bb: Backbone, ds: ImageDataset, train_views: int = 0, seed: int = 0, batch_size: int = 256,
                   workers: int = 0, cache: bool = True, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized features [N, D] (test transform) or [N, V, D] (V augmented train views) and labels [N]."""
    progress = progress and dist.is_main()
    if dist.active() and train_views:
        with dist.main_first():  # rank 0 encodes and caches the views; the others then read its cache
            return _image_features(bb, ds, train_views, seed, batch_size, workers, cache, progress)
    return _image_features(bb, ds, train_views, seed, batch_size, workers, cache, progress)


def _image_features(bb, ds, train_views, seed, batch_size, workers, cache, progress):
    desc = f"train-aug-v1:{bb.image_size}" if train_views else f"test:{bb.image_size}"
    key = _key(bb, ds, desc, train_views, seed)
    path = cache_dir("features") / f"{key}.safetensors"
    cached = None
    if cache and path.is_file():
        try:
            t, _ = load_tensors(path)
            cached = t["features"], t["labels"].long()
        except Exception:
            if dist.is_main():
                path.unlink(missing_ok=True)
    sharded = dist.active() and not train_views
    if sharded and not dist.all_true(cached is not None):
        cached = None  # every rank takes part in the sharded encoding below
    if cached is not None:
        return cached
    bb.eval()
    labels = torch.tensor(ds.labels, dtype=torch.long)

    def encode(batch):
        return bb.encode_image_rows(batch[0].to(bb.device)).float().cpu()

    # cache_fill_map: the same bytes whatever thread count the run uses
    if not train_views:
        data = ds.with_transform(bb.transform(False))
        if sharded:
            data = torch.utils.data.Subset(data, range(*dist.shard(len(ds))))
        batches = tqdm(_loader(data, batch_size, workers), desc=f"features {ds.key}", disable=not progress,
                       leave=False)
        feats = list(cache_fill_map(encode, batches, bb.device))
        out = torch.cat(feats) if feats else torch.zeros(0, bb.embed_dim)
        if sharded:
            out = dist.gather_rows(out)
    else:
        views = []
        for v in range(train_views):
            torch.manual_seed(seed * 1000 + v)  # the augmentations are drawn in this thread, in loader order
            tf = bb.transform(True) if v > 0 else bb.transform(False)
            batches = tqdm(_loader(ds.with_transform(tf), batch_size, 0),
                           desc=f"features {ds.key} view {v + 1}/{train_views}", disable=not progress, leave=False)
            views.append(torch.cat(list(cache_fill_map(encode, batches, bb.device))))
        out = torch.stack(views, 1)
    if cache and dist.is_main():
        save_tensors(path, {"features": out, "labels": labels},
                     {"model": bb.ident, "dataset": ds.name, "split": ds.split, "transform": desc,
                      "views": train_views, "seed": seed, "n": len(ds), "fill": cache_fill_tag(bb.device)})
    return out, labels
