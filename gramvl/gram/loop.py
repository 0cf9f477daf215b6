"""The outer-loop scaffold shared by meta-training (gram/meta.py) and meta-training for test time
(tta/meta_tta.py): resume from a checkpoint written with the same config and fingerprint (backbone and
meta-training data), a task RNG that depends only on
the seed and the step resumed at, the progress bar and per-step history, checkpoints every
`checkpoint_every` steps and at the end, an optional wall-clock budget, and the sidecar fields every
artifact carries (config, steps done, seconds, training curve).

The loops themselves (what a step computes) stay in their modules; a loop reads

    loop = OuterLoop(cfg, ckpt, theta, psi, "meta-train coop", progress)
    for step in loop.steps():
        rec = loop.new_record()
        ...                                  # tasks, backward, outer update
        loop.end_step(step, rec, loss=..., post=...)
    sidecar = {**loop.summary(), ...}
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from gramvl.io import load_tensors, save_tensors

RECORD_TERMS = ("loss", "pre_acc", "post_acc", "shift_acc")


def jsonable(d):
    """d as it reads back from JSON (tuples become lists, paths strings): the form configs are compared in."""
    return json.loads(json.dumps(d, default=str))


def curve(history: list[dict], points: int = 50) -> list[dict]:
    """The training curve, averaged into at most `points` windows (kept in the artifact sidecar)."""
    if not history:
        return []
    w = max(1, math.ceil(len(history) / points))
    out = []
    for s in range(0, len(history), w):
        chunk = history[s:s + w]
        out.append({"step": chunk[-1]["step"], **{k: float(np.mean([h[k] for h in chunk])) for k in RECORD_TERMS}})
    return out


def slot_tensors(theta: dict[str, torch.Tensor], psi: torch.nn.Module | None) -> dict[str, torch.Tensor]:
    """θ and ψ as the flat tensor dict of checkpoints and artifacts (theta.<slot>, psi.<param>)."""
    tensors = {f"theta.{n}": p.detach() for n, p in theta.items()}
    if psi is not None:
        tensors.update({f"psi.{k}": v for k, v in psi.state_dict().items()})
    return tensors


def resume_checkpoint(ckpt: Path, cfg, theta: dict[str, torch.Tensor], psi,
                      fingerprint: dict | None = None) -> tuple[int, float, list] | None:
    """Load θ and ψ from a meta-training checkpoint written with the same config and the same fingerprint (the
    backbone and the meta-training data); (step, seconds, history). Any other checkpoint is ignored (the run
    starts over and overwrites it): a run must never continue from another model's or another corpus's θ."""
    if not ckpt.is_file():
        return None
    tensors, meta = load_tensors(ckpt)
    if not meta or meta.get("config") != jsonable(asdict(cfg)):
        return None
    if meta.get("fingerprint") != jsonable(fingerprint or {}):
        print(f"note: {ckpt} was written for another backbone or meta-training data; starting over")
        return None
    for n, p in theta.items():
        p.data.copy_(tensors[f"theta.{n}"])
    if psi is not None:
        psi.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("psi.")})
    return meta["step"], meta["seconds"], meta["history"]


def run_fingerprint(backbone_ident: str, extra_meta: dict | None) -> dict:
    """What a checkpoint must share with a run to be resumed by it: the backbone and the artifact's data
    metadata (corpus, its feature digest, hierarchy, task and CMHC settings), not the timings or the
    environment (a run may resume on another thread count or machine)."""
    return {"backbone": backbone_ident,
            **{k: v for k, v in (extra_meta or {}).items() if k not in ("timing", "environment")}}


def save_checkpoint(path: Path, theta: dict[str, torch.Tensor], psi, cfg, step: int, seconds: float,
                    history: list, fingerprint: dict | None = None) -> None:
    save_tensors(path, slot_tensors(theta, psi), {"config": jsonable(asdict(cfg)), "step": step,
                                                  "seconds": seconds, "history": history,
                                                  "fingerprint": jsonable(fingerprint or {})})


class OuterLoop:
    """Resume, step, record, checkpoint and stop a meta-training loop (see the module docstring).

    cfg needs `steps`, `seed`, `time_budget_s` and `checkpoint_every`. `theta` maps slot names to the
    meta-learned parameters, `psi` is the regulator module (or None); both are restored on resume.
    """

    def __init__(self, cfg, ckpt: Path, theta: dict[str, torch.Tensor], psi: torch.nn.Module | None, desc: str,
                 progress: bool = True, fingerprint: dict | None = None):
        self.cfg, self.ckpt, self.theta, self.psi = cfg, Path(ckpt), theta, psi
        self.desc, self.progress, self.fingerprint = desc, progress, fingerprint
        self.history: list[dict] = []
        self.start, elapsed = 0, 0.0
        resumed = resume_checkpoint(self.ckpt, cfg, theta, psi, fingerprint)
        if resumed:
            self.start, elapsed, self.history = resumed
        self.resumed = bool(resumed)
        self.rng = np.random.default_rng(cfg.seed + 7919 * self.start)
        self._elapsed = elapsed
        self.t0 = 0.0  # set when the steps start: seconds already spent count
        self.seconds = elapsed
        self._stop = False
        self._bar = None

    def steps(self) -> Iterator[int]:
        """The remaining step indices; stops early when the time budget is spent (after its checkpoint)."""
        if self.resumed and self.progress:
            print(f"resuming {self.desc} at step {self.start}")
        self.t0 = time.time() - self._elapsed
        self._bar = tqdm(total=self.cfg.steps, initial=self.start, desc=self.desc, disable=not self.progress,
                         mininterval=2)
        try:
            for step in range(self.start, self.cfg.steps):
                yield step
                if self._stop:
                    break
        finally:
            self._bar.close()
            self.seconds = time.time() - self.t0

    @staticmethod
    def new_record() -> dict:
        return {k: 0.0 for k in RECORD_TERMS}

    def end_step(self, step: int, rec: dict, save: bool = True, sync: Callable[[bool], bool] | None = None,
                 **postfix: str) -> None:
        """Record step `step`'s terms; checkpoint every `checkpoint_every` steps, at the last step and when the
        time budget is spent (`save`: this process writes checkpoints; `sync`: makes every rank agree on
        stopping, e.g. rank 0's clock decides)."""
        rec["step"] = step + 1
        self.history.append(rec)
        self._bar.update(1)
        if postfix:
            self._bar.set_postfix(**postfix)
        budget = self.cfg.time_budget_s
        over = bool(budget) and time.time() - self.t0 > budget
        if budget and sync is not None:
            over = sync(over)
        done = step + 1 == self.cfg.steps
        if save and ((step + 1) % self.cfg.checkpoint_every == 0 or done or over):
            save_checkpoint(self.ckpt, self.theta, self.psi, self.cfg, step + 1, time.time() - self.t0,
                            self.history, self.fingerprint)
        self._stop = over

    def summary(self) -> dict:
        """Sidecar fields every artifact carries: config, steps done, seconds, the training curve."""
        return {"config": jsonable(asdict(self.cfg)), "steps_done": len(self.history),
                "seconds": round(self.seconds, 1), "curve": curve(self.history)}
