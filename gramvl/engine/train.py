"""One training loop for every host: SGD/AdamW with warmup + cosine, checkpoints of trainable parts only,
resume, autocast on GPU, progress bars. Frozen-image hosts train on cached feature views.

Under torchrun (gramvl/dist.py) the loop is data-parallel: every rank draws the same global batches, computes
the loss of its slice, and gradients are summed over ranks inside autograd, weighted by slice size, so the
update is the single-process one; `predict` shards the evaluation set and gathers the logits."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from gramvl import dist
from gramvl.backbone import Backbone
from gramvl.data.base import ImageDataset
from gramvl.data.features import image_features
from gramvl.errors import GramvlError
from gramvl.io import load_tensors, save_tensors
from gramvl.prompts.base import PromptLearner, Recipe
from gramvl.rows import row_parallel

# how a CPU run uses its threads. "rows": the encoders cut every batch into a fixed number of parts that run at once,
# one intra-op thread each, and the rest of the step runs on one thread, so a run gives the same bytes at any thread
# count (gramvl/rows.py, session 17). "intra-op": every op on the run's threads, as before session 17 (the image
# tower's sums, and so the prompts of VPT, IVLP, MaPLe and PromptSRC, then depend on the thread count in the last bits).
CPU_PARALLEL = ("rows", "intra-op")


@dataclass
class TrainConfig:
    """A training run: method, data, recipe overrides (None = the host's paper recipe)."""

    method: str = "coop"
    dataset: str = "emoji-animals"
    shots: int = 16
    seed: int = 1
    subsample: str = "all"  # all | base | new (classes trained on)
    model: str = "small"
    weights: str | None = None
    data_root: str | None = None
    epochs: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    train_views: int | None = None
    eval_split: str = "test"
    device: str = "cpu"
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; GPU only)
    gram: str | None = None  # GRAM artifact to attach
    gram_parts: str = "both"  # both | init | regulator (ablations)
    host: dict[str, Any] = field(default_factory=dict)  # overrides of the method's paper defaults


# Recipe scaling for gramvl's packaged small CLIP, chosen on *val* splits (docs/results/tuning_small.md).
# Its learned logit scale is far below CLIP's 100, so prompt gradients are several times smaller and the
# published learning rates barely move the prompts; epochs are cut to fit the 2-core budget. Empty = paper.
SMALL_MODEL_SCALING: dict[str, dict[str, float]] = {
    # CoOp family: the paper's lr was best on val (x1 > x10 > x50); epochs x0.25 for the CPU budget
    "coop": {"epoch_mult": 0.25}, "kgcoop": {"epoch_mult": 0.25}, "prograd": {"epoch_mult": 0.25},
    "cocoop": {"epoch_mult": 0.5},
    # visual prompts: lr x10 was best on val (x10 > x50 > x1)
    "vpt": {"lr_mult": 10.0}, "vpt-deep": {"lr_mult": 10.0},
}


def resolved_recipe(host_cls, cfg: TrainConfig, backbone_ident: str = "") -> Recipe:
    """The host's paper recipe for cfg.shots, scaled for the small CLIP, then cfg's explicit overrides."""
    base = host_cls.recipe_for(cfg.shots) if hasattr(host_cls, "recipe_for") else host_cls.default_recipe
    scale = SMALL_MODEL_SCALING.get(host_cls.name, {}) if backbone_ident.startswith("gramvl-small") else {}
    if scale:
        base = replace(base, lr=base.lr * scale.get("lr_mult", 1.0),
                       epochs=max(1, round(base.epochs * scale.get("epoch_mult", 1.0))),
                       note=(base.note + "; " if base.note else "") + f"small-model scaling {scale}")
    over = {k: v for k, v in (("epochs", cfg.epochs), ("lr", cfg.lr), ("batch_size", cfg.batch_size),
                              ("train_views", cfg.train_views)) if v is not None}
    return replace(base, **over)


def _optimizer(params: list, r: Recipe) -> torch.optim.Optimizer:
    if r.optimizer == "sgd":
        return torch.optim.SGD(params, lr=r.lr, momentum=r.momentum, weight_decay=r.weight_decay)
    if r.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=r.lr, weight_decay=r.weight_decay)
    raise GramvlError(f"unknown optimizer {r.optimizer!r} (sgd or adamw)")


def lr_at(r: Recipe, epoch_float: float) -> float:
    """CoOp's schedule: constant warmup lr for `warmup_epochs`, then cosine from lr to 0 over all epochs."""
    if epoch_float < r.warmup_epochs and r.warmup_epochs > 0 and r.epochs > r.warmup_epochs:
        return r.warmup_lr
    return 0.5 * r.lr * (1 + math.cos(math.pi * min(1.0, epoch_float / max(1, r.epochs))))


def config_hash(d: dict) -> str:
    """Short, stable digest of a JSON-able config (run identities)."""
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Trainer:
    """Trains `host` on `train_ds`; checkpoint (trainable state + optimizer) at `ckpt` enables resume."""

    def __init__(self, host: PromptLearner, recipe: Recipe, seed: int, ckpt: str | Path | None = None,
                 device: str = "cpu", precision: str = "fp32", progress: bool = True,
                 identity: dict | None = None, cpu_parallel: str = "rows"):
        if cpu_parallel not in CPU_PARALLEL:
            raise GramvlError(f"cpu_parallel must be one of {', '.join(CPU_PARALLEL)}, not {cpu_parallel!r}")
        self.host, self.recipe, self.seed, self.cpu_parallel = host, recipe, seed, cpu_parallel
        self.ckpt = Path(ckpt) if ckpt else None
        self.device, self.precision, self.progress = device, precision, progress
        if precision not in ("fp32", "bf16", "fp16"):
            raise GramvlError(f"unknown precision {precision!r}: use fp32, bf16 or fp16")
        if precision != "fp32" and not str(device).startswith("cuda"):
            warnings.warn(f"--precision {precision} applies on a GPU only; this run on {device} is fp32",
                          stacklevel=2)
        self.identity = identity or {}
        self.history: list[dict] = []
        self._scaler = self._make_scaler()

    def _make_scaler(self):
        """fp16 on a GPU: dynamic loss scaling (gradients that underflow fp16 are kept; a step whose
        gradients overflow is skipped and the scale lowered). bf16 and fp32 need none."""
        if self.device.startswith("cuda") and self.precision == "fp16":
            return torch.amp.GradScaler("cuda")
        return None

    def _step(self, opt: torch.optim.Optimizer) -> None:
        if self._scaler is None:
            opt.step()
        else:
            self._scaler.step(opt)  # unscales, skips the step on inf/nan gradients
            self._scaler.update()

    def _autocast(self):
        if self.device.startswith("cuda") and self.precision in ("bf16", "fp16"):
            dt = torch.bfloat16 if self.precision == "bf16" else torch.float16
            return torch.autocast("cuda", dtype=dt)
        return torch.autocast("cpu", enabled=False)

    def _batches(self, train_ds: ImageDataset, g: torch.Generator):
        """Yields (batch, labels) for one epoch."""
        r, host = self.recipe, self.host
        if host.image_side_frozen:
            feats, labels = self._feats
            n = feats.shape[0]
            perm = torch.randperm(n, generator=g)
            bs = min(r.batch_size, n)
            for s in range(0, n - bs + 1 if n >= bs else 1, bs):
                idx = perm[s:s + bs]
                if feats.dim() == 3:
                    v = torch.randint(0, feats.shape[1], (len(idx),), generator=g)
                    f = feats[idx, v]
                else:
                    f = feats[idx]
                yield {"features": f.to(self.device)}, labels[idx].to(self.device)
        else:
            ds = train_ds.with_transform(host.bb.transform(train=True))
            loader = torch.utils.data.DataLoader(ds, batch_size=min(r.batch_size, len(ds)), shuffle=True,
                                                 generator=g, drop_last=len(ds) >= r.batch_size, num_workers=0)
            for x, y in loader:
                yield {"images": x.to(self.device)}, y.to(self.device)

    def _save(self, epoch: int, opt: torch.optim.Optimizer) -> None:
        if not self.ckpt or not dist.is_main():
            return
        tensors = {f"state.{k}": v for k, v in self.host.trainable_state().items()}
        tensors.update({f"run.{k}": v for k, v in self.host.run_state().items()})
        params = [p for gr in opt.param_groups for p in gr["params"]]
        for i, p in enumerate(params):
            for k, v in opt.state.get(p, {}).items():
                if torch.is_tensor(v):
                    tensors[f"opt.{i}.{k}"] = v.reshape(1) if v.dim() == 0 else v
        save_tensors(self.ckpt, tensors, {"format": "gramvl-train-checkpoint", "epoch": epoch,
                                          "identity": self.identity, "history": self.history})

    def _resume(self, opt: torch.optim.Optimizer) -> int:
        if not self.ckpt or not self.ckpt.is_file():
            return 0
        tensors, meta = load_tensors(self.ckpt)
        if not meta or meta.get("identity") != self.identity:
            raise GramvlError(f"checkpoint {self.ckpt} belongs to another run (different config or backbone); "
                              f"remove it or choose another output folder")
        self.host.load_trainable_state({k[6:]: v for k, v in tensors.items() if k.startswith("state.")})
        self.host.load_run_state({k[4:]: v for k, v in tensors.items() if k.startswith("run.")})
        params = [p for gr in opt.param_groups for p in gr["params"]]
        for i, p in enumerate(params):
            st = {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"opt.{i}.")}
            if st:
                opt.state[p] = {k: (v.reshape(()) if k == "step" else v) for k, v in st.items()}
        self.history = meta.get("history", [])
        return int(meta["epoch"])

    def _backward(self, batch: dict, y: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """host.backward on this rank's slice of the global batch; returns the global batch's loss."""
        if not dist.active():
            return self.host.backward(batch, y, scale)
        n = len(y)
        s, e = dist.shard(n)
        weight = (e - s) / n
        if e == s:  # fewer samples than ranks: take part in the gradient sums with a zero weight
            s, e = 0, 1
        part = {k: v[s:e] for k, v in batch.items()}
        with dist.reducing_gradients(weight):
            loss = self.host.backward(part, y[s:e], scale)
        return dist.all_reduce_sum(loss.detach().float() * weight)

    def fit(self, train_ds: ImageDataset, on_epoch: Callable | None = None) -> dict:
        with row_parallel(self.device) if self.cpu_parallel == "rows" else contextlib.nullcontext():
            return self._fit(train_ds, on_epoch)

    def _fit(self, train_ds: ImageDataset, on_epoch: Callable | None) -> dict:
        host, r = self.host, self.recipe
        torch.manual_seed(self.seed)
        params = host.trainable_parameters()
        if not params:
            return {"epochs": 0, "steps": 0, "seconds": 0.0}
        if host.image_side_frozen:
            self._feats = image_features(host.bb, train_ds, train_views=r.train_views, seed=self.seed,
                                         progress=self.progress)
        opt = _optimizer(params, r)
        start = self._resume(opt)
        if dist.active():
            if len(set(dist.all_gather_object(start))) > 1:
                raise GramvlError(f"ranks resumed {self.ckpt} at different epochs; the output folder must be "
                                  f"on a filesystem that every rank sees")
            dist.broadcast_tensors(params)  # identical start on every rank, as DistributedDataParallel does
            for p in params:
                dist.add_gradient_hook(p)  # gradients are summed over ranks before any other hook sees them
        t0 = time.time()
        steps = 0
        n_batches = None
        bar = tqdm(total=r.epochs, initial=start, desc=f"train {host.name}",
                   disable=not (self.progress and dist.is_main()), leave=False, mininterval=2)
        for epoch in range(start, r.epochs):
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            host.train()
            tot, cnt = 0.0, 0
            batches = list(self._batches(train_ds, g))
            n_batches = len(batches)
            for b, (batch, y) in enumerate(batches):
                lr = lr_at(r, epoch + b / max(1, n_batches))
                for gr in opt.param_groups:
                    gr["lr"] = lr
                opt.zero_grad(set_to_none=True)
                scale = None if self._scaler is None else self._scaler.scale(torch.ones((), device=params[0].device))
                with self._autocast():
                    loss = self._backward(batch, y, scale)
                self._step(opt)
                tot += float(loss)
                cnt += 1
                steps += 1
            self.history.append({"epoch": epoch + 1, "loss": tot / max(1, cnt), "lr": lr})
            host.epoch_end(epoch + 1, r.epochs)
            bar.update(1)
            bar.set_postfix(loss=f"{tot / max(1, cnt):.3f}")
            if on_epoch:
                on_epoch(epoch + 1)
            last = epoch + 1 == r.epochs
            if last or (epoch + 1) % max(1, r.epochs // 10) == 0:
                self._save(epoch + 1, opt)
        bar.close()
        host.eval()
        info = {"epochs": r.epochs, "resumed_from": start, "steps": steps, "seconds": time.time() - t0,
                "steps_per_second": steps / max(1e-9, time.time() - t0), "batches_per_epoch": n_batches,
                "final_loss": self.history[-1]["loss"] if self.history else None}
        if dist.active():
            info["world_size"] = dist.world()
        return info


@torch.no_grad()
def predict(host: PromptLearner, ds: ImageDataset, batch_size: int = 512, progress: bool = False,
            device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [N, C] and labels [N] of `host` on `ds` (cached features when the image side is frozen).
    Under torchrun every rank must call it: each computes a shard and all receive the gathered result."""
    host.eval()
    frozen = host.frozen_text() if hasattr(host, "frozen_text") else contextlib.nullcontext()
    with frozen, row_parallel(device):
        return _predict(host, ds, batch_size, progress, device)


def _predict(host, ds, batch_size, progress, device):
    lo, hi = dist.shard(len(ds))  # this rank's contiguous share of the evaluation set (all of it in one process)
    if host.image_side_frozen:
        feats, labels = image_features(host.bb, ds, progress=progress)
        outs = [host.logits({"features": feats[s:min(s + batch_size, hi)].to(device)}).float().cpu()
                for s in range(lo, hi, batch_size)]
        return _gather(outs, len(host.classnames)), labels
    data = ds.with_transform(host.bb.transform(False))
    if dist.active():
        data = torch.utils.data.Subset(data, range(lo, hi))
    loader = torch.utils.data.DataLoader(data, batch_size=min(batch_size, 256), shuffle=False, num_workers=0)
    outs, labs = [], []
    for x, y in tqdm(loader, desc=f"eval {ds.key}", disable=not (progress and dist.is_main()), leave=False):
        outs.append(host.logits({"images": x.to(device)}).float().cpu())
        labs.append(y)
    return _gather(outs, len(host.classnames)), _gather(labs, None)


def _gather(parts: list[torch.Tensor], width: int | None) -> torch.Tensor:
    """Concatenate this rank's batches, then every rank's shares in rank order (a plain cat in one process)."""
    if not dist.active():
        return torch.cat(parts)
    empty = torch.zeros(0, width) if width is not None else torch.zeros(0, dtype=torch.long)
    return dist.gather_rows(torch.cat(parts) if parts else empty)


def evaluate(host: PromptLearner, ds: ImageDataset, device: str = "cpu") -> dict:
    logits, labels = predict(host, ds, device=device)
    return {"accuracy": float((logits.argmax(1) == labels).float().mean()), "n": int(len(labels)),
            "num_classes": len(ds.classnames)}


def evaluate_sets(host: PromptLearner, sets: dict[str, ImageDataset], device: str = "cpu") -> dict[str, float]:
    """Accuracy of `host` on each named dataset, switching its label space to each one's classes."""
    out = {}
    for name, ds in sets.items():
        host.set_classnames(ds.classnames)
        out[name] = evaluate(host, ds, device)["accuracy"]
    return out


def run_identity(cfg: TrainConfig, bb: Backbone, recipe: Recipe) -> dict:
    """What makes two training runs the same: config (not the device), backbone, recipe, and the content of
    the GRAM artifact (a path can be re-written with another one)."""
    d = asdict(cfg)
    d.pop("device", None)
    ident = {"config": config_hash(d), "backbone": bb.ident, "recipe": config_hash(asdict(recipe))}
    if cfg.gram:
        from gramvl.gram.attach import artifact_digest

        ident["gram"] = artifact_digest(cfg.gram)
    return ident
