"""Bi-level meta-training of a prompt initialization θ and a gradient regulator ψ_φ (SPEC 1.4).

    inner (T_in steps, lr α):  θ' = θ − α · ψ_φ(∇_θ L_support(θ))
    outer:  L = L_query(θ') + λ_x · L_shifted_query(θ')
            θ ← Adam(∇_θ L),  φ ← Adam(∇_φ L)

Everything runs through `torch.func.functional_call` over the host's slot dict only: the CLIP weights are
never cloned. Second order (exact) or first order (the inner gradient is treated as a constant; φ still
receives its exact gradient through ψ). Frozen-image hosts read cached corpus features; visual-prompt hosts
read preprocessed corpus images.

On the CPU in one process the meta-batch is task-parallel too (`MetaConfig.cpu_parallel`, default "tasks"): its
tasks run at once in threads, one intra-op thread and one copy of the host each, and their outer gradients are
summed in task order, so the artifact is the same bit for bit at any thread count (and the same as the serial loop
at one thread).

Under torchrun the meta-batch is task-parallel: every rank draws the same task sequence and computes the
outer gradients (θ and φ) of its share of the meta_batch tasks; the per-task gradients are gathered and
summed in task order before clipping and Adam, exactly as one process accumulates them, so every rank takes
the single-process step bit for bit (given the same per-task arithmetic, i.e. the same thread count). The
bi-level loop is sensitive to float rounding, which is why the order matters. Rank 0 writes checkpoints and
the artifact.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call

from gramvl import dist
from gramvl.errors import GramvlError
from gramvl.gram.loop import OuterLoop, run_fingerprint, slot_tensors
from gramvl.gram.regulator import RegulatorSet, modality_of
from gramvl.io import save_tensors, write_json
from gramvl.paths import cache_fill_map, one_thread, run_threads
from gramvl.prompts.base import PromptLearner

ARTIFACT_FORMAT = "gramvl-gram-artifact"
CPU_PARALLEL = ("tasks", "intra-op")


@dataclass
class MetaConfig:
    """Meta-training recipe; every [ours] default from SPEC 1.4 is a field here."""

    host: str = "coop"
    unigram: bool = False  # meta-learn text and visual slots jointly (host must have both)
    steps: int = 600
    meta_batch: int = 4
    inner_steps: int = 1
    inner_lr: float = 0.25  # session 4: 1.0 before (chosen on val; docs/method.md)
    outer_lr_theta: float = 2e-3
    outer_lr_phi: float = 1e-3  # session 4: 1e-2 before
    second_order: bool = True
    shifted_weight: float = 1.0
    pre_weight: float = 1.0  # weight of the query loss *before* adaptation (keeps θ* a usable prompt)
    use_regulator: bool = True
    rank: int = 32
    # descent guard of ψ (regulator.py): cosine of ψ(g) to g at least this (-1: off). A ψ* meta-trained for one
    # inner step can turn gradients almost orthogonal; a host applies it for hundreds of steps
    psi_min_cos: float = -1.0
    grad_clip: float = 1.0
    # project every row of the text slots of θ onto norm <= this multiple of the backbone's mean token-embedding
    # norm after each outer step (0: off). Adam's outer steps otherwise inflate θ* (rows 4.5x a word's norm
    # after 600 steps), and CoOp's SGD at lr 2e-3 can then barely move away from it. Default since session 4.
    theta_norm_cap: float = 1.5
    # keep every row of θ's text slots within this multiple of the mean token-embedding norm of the host's initial
    # context (0: off). For word-initialised hosts ("a photo of a": CoOp M=4, CoCoOp, MaPLe, IVLP) θ* then stays a
    # usable hand-written prompt while it learns; session 5, see docs/method.md
    theta_anchor: float = 0.0
    time_budget_s: float = 0.0  # 0: no limit; otherwise stop (and save) after this many seconds
    checkpoint_every: int = 50
    seed: int = 0
    host_cfg: dict[str, Any] = field(default_factory=dict)  # overrides of the host's paper defaults
    # how a CPU run uses its threads. "tasks": the meta-batch's tasks run at once, one intra-op thread each, and
    # their gradients are summed in task order, so the artifact is the same bit for bit at any thread count
    # (session 16; for the demo's recipe 1.76 times faster than "intra-op" at 2 threads, and as fast at 1,
    # docs/results/meta_threads.md)
    # "intra-op": one task after another, each op on the run's threads, as before session 16 (the artifact's last
    # bits, which meta-training amplifies, depend on the thread count; it may be faster with many cores and
    # few tasks per meta-batch). Off the CPU, and under torchrun, tasks run one after another in each process.
    cpu_parallel: str = "tasks"


# ----------------------------------------------------------------------------------------- data access
class CorpusBatches:
    """Turns corpus indices into host batches: cached features, or preprocessed images for visual hosts."""

    def __init__(self, image_features: torch.Tensor, paths: list[str] | None = None, bb=None,
                 need_images: bool = False):
        if isinstance(image_features, torch.Tensor):
            self.features = image_features.detach().to(torch.float32).clone()
        else:
            self.features = torch.from_numpy(np.array(image_features, dtype=np.float32, copy=True))
        self.paths, self.bb, self.need_images = paths, bb, need_images
        self._images: dict[int, torch.Tensor] = {}

    def _image(self, i: int) -> torch.Tensor:
        if i not in self._images:
            from gramvl.data.base import load_image

            if self.paths is None or self.bb is None:
                raise GramvlError("visual-prompt hosts need the corpus images for meta-training")
            self._images[i] = self.bb.transform(False)(load_image(self.paths[i]))
        return self._images[i]

    def batch(self, idx) -> dict:
        idx = [int(i) for i in idx]
        device = getattr(self.bb, "device", "cpu")
        if self.need_images:
            return {"images": torch.stack([self._image(i) for i in idx]).to(device)}
        return {"features": self.features[idx].to(device)}


def slot_paths(host: PromptLearner, names: list[str] | None = None) -> dict[str, str]:
    """Map slot name -> parameter path inside the host (what functional_call replaces)."""
    by_id = {id(p): n for n, p in host.named_parameters()}
    out = {}
    for name, p in host.slots().items():
        if names is not None and name not in names:
            continue
        if id(p) not in by_id:
            raise GramvlError(f"slot {name} of host {host.name} is not a registered parameter")
        out[name] = by_id[id(p)]
    return out


def meta_slots(host: PromptLearner, unigram: bool) -> list[str]:
    """Slots GRAM meta-learns: text slots, visual slots, or both (UNIGRAM)."""
    names = list(host.slots())
    text = [n for n in names if modality_of(n) == "text"]
    vis = [n for n in names if modality_of(n) == "vision"]
    if unigram:
        if not text or not vis:
            raise GramvlError(f"--unigram needs a host with text and visual slots (ivlp, promptsrc, maple); "
                              f"{host.name} has {names}")
        return text + vis
    return text or vis


def host_extras(host: PromptLearner) -> dict[str, torch.Tensor]:
    """The host's own trainable parameters that are not prompt slots (MaPLe's coupling maps, CoCoOp's
    meta-net), by parameter path. Meta-training keeps them fixed at the meta-training host's initial values,
    so θ* was learned with exactly these: the artifact stores them and `attach` restores them (a host built
    with another seed would otherwise pair θ* with different, random maps)."""
    slot_ids = {id(p) for p in host.slots().values()}
    return {n: p.detach().clone() for n, p in host.named_parameters() if p.requires_grad and id(p) not in slot_ids}


# ----------------------------------------------------------------------------------------- the loop
def task_loss(host: PromptLearner, params: dict[str, torch.Tensor], batch: dict, labels: torch.Tensor,
              paths: dict[str, str]) -> tuple[torch.Tensor, torch.Tensor]:
    logits = functional_call(host, {paths[k]: v for k, v in params.items()}, (batch,))
    return F.cross_entropy(logits, labels), logits


def inner_adapt(host: PromptLearner, theta: dict[str, torch.Tensor], psi: RegulatorSet | None, batch: dict,
                labels: torch.Tensor, paths: dict[str, str], steps: int, lr: float, second_order: bool,
                ctx: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """θ' after `steps` regulated gradient steps on the support loss (differentiable in θ and φ)."""
    params = dict(theta)
    for _ in range(steps):
        loss, _ = task_loss(host, params, batch, labels, paths)
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=second_order)
        new = {}
        for (name, p), g in zip(params.items(), grads, strict=True):
            if not second_order:
                g = g.detach()
            new[name] = p - lr * (psi(name, g, ctx) if psi is not None else g)
        params = new
    return params


def outer_update(theta: list[torch.Tensor], opt_t: torch.optim.Optimizer, psi: torch.nn.Module | None,
                 opt_p: torch.optim.Optimizer | None, clip: float) -> None:
    """The outer step of the bi-level loop: clip and apply θ's gradient, then φ's (if there is a ψ)."""
    torch.nn.utils.clip_grad_norm_(theta, clip)
    opt_t.step()
    if opt_p is not None and psi is not None:
        torch.nn.utils.clip_grad_norm_(list(psi.parameters()), clip)
        opt_p.step()


def token_norm(bb) -> float:
    """Mean L2 norm of the rows of the text tower's token-embedding table (the scale of a word)."""
    return float(bb._text.token_embedding.weight.norm(dim=-1).mean())


@torch.no_grad()
def anchor_text_rows(theta: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor], radius: float) -> None:
    """Project each row of θ's text slots onto the ball of `radius` around the same row of `anchor`."""
    for name, a in anchor.items():
        d = theta[name] - a
        theta[name].copy_(a + d * (radius / d.norm(dim=-1, keepdim=True).clamp_min(1e-12)).clamp(max=1.0))


@torch.no_grad()
def cap_text_rows(theta: dict[str, torch.Tensor], cap: float) -> None:
    """Rescale rows of θ's text slots whose norm exceeds `cap` onto norm `cap` (a projection)."""
    for name, p in theta.items():
        if modality_of(name) == "text":
            p.mul_((cap / p.norm(dim=-1, keepdim=True).clamp_min(1e-12)).clamp(max=1.0))


def _device(host: PromptLearner):
    """Where the host's backbone (and so the slots, ψ and every batch) lives."""
    return getattr(getattr(host, "bb", None), "device", "cpu")


def _widths(host: PromptLearner, names: list[str]) -> dict[str, int]:
    slots = host.slots()
    return {modality_of(n): int(slots[n].shape[-1]) for n in names}


def _acc(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(-1) == labels).float().mean())


def meta_train(cfg: MetaConfig, host: PromptLearner, sampler, data: CorpusBatches, out: str | Path,
               extra_meta: dict | None = None, progress: bool = True) -> Path:
    """Run the bi-level loop; write the artifact (θ*, ψ*) to `out` (safetensors + JSON). Resumable."""
    # second-order gradients need double backward through attention: only the math SDPA kernel has it
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # on the CPU every task runs on one intra-op thread (several tasks at once on the run's threads) and the rest
    # of the loop on one thread too: the artifact is then the same, bit for bit, at any thread count
    pinned, at_once = cpu_parallelism(cfg.cpu_parallel, _device(host), cfg.meta_batch)
    with sdpa_kernel([SDPBackend.MATH]), pinned:
        return _meta_train(cfg, host, sampler, data, out, extra_meta, progress, at_once)


def _meta_train(cfg: MetaConfig, host: PromptLearner, sampler, data: CorpusBatches, out: str | Path,
                extra_meta: dict | None, progress: bool, at_once: int) -> Path:
    if cfg.theta_anchor < 0:
        raise GramvlError(f"meta.theta_anchor must be >= 0 (0: off), got {cfg.theta_anchor}")
    out = Path(out)
    ckpt = out.with_name(out.stem + ".ckpt.safetensors")
    torch.manual_seed(cfg.seed)
    names = meta_slots(host, cfg.unigram)
    paths = slot_paths(host, names)
    slots = host.slots()
    theta = {n: torch.nn.Parameter(slots[n].detach().clone()) for n in names}
    device = _device(host)
    psi = None
    if cfg.use_regulator:
        psi = RegulatorSet(_widths(host, names), rank=cfg.rank, min_cos=cfg.psi_min_cos).to(device)
    opt_t = torch.optim.Adam(theta.values(), lr=cfg.outer_lr_theta)
    opt_p = torch.optim.Adam(psi.parameters(), lr=cfg.outer_lr_phi) if psi is not None else None
    extras = host_extras(host)
    for p in host.parameters():
        p.requires_grad_(False)
    loop = OuterLoop(cfg, ckpt, theta, psi, f"meta-train {host.name}", progress and dist.is_main(),
                     run_fingerprint(host.bb.ident, extra_meta))
    if dist.active() and len(set(dist.all_gather_object(loop.start))) > 1:
        raise GramvlError(f"ranks resumed {ckpt} at different steps; the artifact folder must be on a "
                          f"filesystem that every rank sees")
    dist.broadcast_tensors(list(theta.values()) + (list(psi.parameters()) if psi is not None else []))
    cap = cfg.theta_norm_cap * token_norm(host.bb) if cfg.theta_norm_cap > 0 else None
    if cap is not None and loop.start == 0:
        cap_text_rows(theta, cap)
    # the anchor is the host's initial context (also on resume: host.slots() are never trained here)
    anchor = {n: slots[n].detach().clone() for n in names if modality_of(n) == "text"}
    radius = cfg.theta_anchor * token_norm(host.bb) if cfg.theta_anchor > 0 else None
    pool = _HostPool(host, at_once)
    for step in loop.steps():
        opt_t.zero_grad(set_to_none=True)
        if opt_p:
            opt_p.zero_grad(set_to_none=True)
        rec = loop.new_record()
        # every rank draws every task: the same sequence on all ranks
        tasks = [sampler.sample(loop.rng) for _ in range(cfg.meta_batch)]

        def task(item):
            i, t = item
            with pool.host() as h:
                loss, terms = _task_loss(h, theta, psi, t, data, cfg, paths, device)
                return torch.autograd.grad(loss / cfg.meta_batch, _outer(theta, psi), allow_unused=True), terms

        if dist.active():  # this rank's share of the tasks, summed over the ranks in task order
            mine = [task(it) for it in enumerate(tasks) if it[0] % dist.world() == dist.rank()]
            _accumulate_in_task_order(_outer(theta, psi), mine, cfg.meta_batch, rec)
        elif pool.parallel:  # tasks at once on the run's threads, one intra-op thread each, summed in task order
            for grads, terms in cache_fill_map(task, enumerate(tasks), device):
                add_grads(_outer(theta, psi), grads)
                for k, v in terms.items():
                    rec[k] += v
        else:
            for t in tasks:
                loss, terms = _task_loss(host, theta, psi, t, data, cfg, paths, device)
                (loss / cfg.meta_batch).backward()
                for k, v in terms.items():
                    rec[k] += v
        outer_update(list(theta.values()), opt_t, psi, opt_p, cfg.grad_clip)
        if cap is not None:
            cap_text_rows(theta, cap)
        if radius is not None:
            anchor_text_rows(theta, anchor, radius)
        # rank 0's clock decides when the time budget is spent, so all ranks stop together
        loop.end_step(step, rec, save=dist.is_main(), sync=dist.broadcast_object if dist.active() else None,
                      loss=f"{rec['loss']:.3f}", post=f"{rec['post_acc']:.2f}")
    if not dist.is_main():
        dist.barrier()  # returns once rank 0 has written the artifact
        return out
    diag = regulator_diagnostics(host, theta, psi, sampler, data, paths, np.random.default_rng(cfg.seed + 1),
                                 lr=cfg.inner_lr)
    sidecar = {"format": ARTIFACT_FORMAT, "host": cfg.host, "unigram": cfg.unigram,
               "backbone": host.bb.ident, "slots": {n: list(theta[n].shape) for n in names},
               "regulator": psi.config() if psi is not None else None, **loop.summary(),
               "psi_diagnostics": diag, **(extra_meta or {})}
    tensors = slot_tensors(theta, psi)
    if extras:
        sidecar["host_extras"] = {n: list(v.shape) for n, v in extras.items()}
        tensors.update({f"host.{n}": v for n, v in extras.items()})
    save_tensors(out, tensors, sidecar)
    write_json(out.with_name(out.stem + ".history.json"), loop.history)
    dist.barrier()
    return out


def _task_loss(host: PromptLearner, theta: dict, psi, task, data: CorpusBatches, cfg: MetaConfig,
               paths: dict[str, str], device) -> tuple[torch.Tensor, dict]:
    """One meta-task: adapt θ on its support set, and return its outer loss and record terms."""
    sup = data.batch(task.support_idx)
    qry = data.batch(task.query_idx)
    ys = torch.as_tensor(task.support_labels, dtype=torch.long, device=device)
    yq = torch.as_tensor(task.query_labels, dtype=torch.long, device=device)
    host.set_classnames(task.classnames)
    adapted = inner_adapt(host, theta, psi, sup, ys, paths, cfg.inner_steps, cfg.inner_lr, cfg.second_order)
    lq, lg = task_loss(host, adapted, qry, yq, paths)
    with torch.set_grad_enabled(cfg.pre_weight > 0):
        lpre, pre = task_loss(host, theta, qry, yq, paths)
    terms = {"pre_acc": _acc(pre, yq) / cfg.meta_batch, "post_acc": _acc(lg, yq) / cfg.meta_batch}
    loss = lq + cfg.pre_weight * lpre if cfg.pre_weight > 0 else lq
    if cfg.shifted_weight > 0 and getattr(task, "shift_idx", None) is not None:
        host.set_classnames(task.classnames_shift)
        ysh = torch.as_tensor(task.shift_labels, dtype=torch.long, device=device)
        lsh, lgs = task_loss(host, adapted, data.batch(task.shift_idx), ysh, paths)
        loss = loss + cfg.shifted_weight * lsh
        terms["shift_acc"] = _acc(lgs, ysh) / cfg.meta_batch
    terms["loss"] = loss.item() / cfg.meta_batch
    return loss, terms


def cpu_parallelism(mode: str, device, meta_batch: int, field: str = "meta.cpu_parallel"):
    """How a meta-training loop uses the CPU (`cpu_parallel`): the context it runs in (torch on one intra-op thread
    for "tasks" on the CPU; nothing otherwise) and how many of its tasks run at once, in threads (for "tasks" on the
    CPU in one process, the run's thread count or the meta-batch, whichever is smaller; otherwise 1)."""
    if mode not in CPU_PARALLEL:
        raise GramvlError(f"{field} must be one of {', '.join(CPU_PARALLEL)}, not {mode!r}")
    if mode != "tasks" or torch.device(device).type != "cpu":
        return nullcontext(), 1
    return one_thread(), 1 if dist.active() else max(1, min(run_threads(), meta_batch))


class _HostPool:
    """Copies of the host (sharing its backbone) for meta-tasks run at once in threads: a task sets the host's
    class names and swaps its slots (`functional_call`), so concurrent tasks need a host each. Parallel only on
    the CPU, in one process, with more than one task per meta-batch and more than one thread to run them on."""

    def __init__(self, host: PromptLearner, at_once: int):
        import queue

        self.parallel = at_once > 1
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        self._free.put(host)
        for _ in range(at_once - 1):
            self._free.put(_host_copy(host))

    @contextmanager
    def host(self):
        h = self._free.get()  # never waits: there are as many hosts as tasks that run at once
        try:
            yield h
        finally:
            self._free.put(h)


def _host_copy(host: PromptLearner) -> PromptLearner:
    """A deep copy of the host that shares the backbone (and its weights) with it."""
    bb = host.bb
    shared = [bb, *bb.parameters(), *bb.buffers(), *bb.modules()] if isinstance(bb, torch.nn.Module) else [bb]
    return copy.deepcopy(host, {id(t): t for t in shared})


def add_grads(params: list[torch.Tensor], grads) -> None:
    """Add one task's outer gradients into .grad, as backward() accumulates them."""
    for p, g in zip(params, grads, strict=True):
        if g is None:
            continue
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad += g


def _outer(theta: dict, psi) -> list[torch.Tensor]:
    return list(theta.values()) + (list(psi.parameters()) if psi is not None else [])


_TERMS = ("pre_acc", "post_acc", "shift_acc", "loss")


def _accumulate_in_task_order(params: list[torch.Tensor], mine: list[tuple[tuple, dict]], total: int,
                              rec: dict) -> None:
    """Gather every rank's per-task gradients and record terms, then add them into .grad and `rec` in task
    order: the sums a single process accumulates with one backward() per task, bit for bit."""
    sizes = [p.numel() for p in params]
    width = len(params) + sum(sizes) + len(_TERMS)
    packed = []
    for grads, terms in mine:  # [has-gradient flags | gradients | record terms], float64 holds float32 exactly
        flat = [torch.zeros(n, dtype=torch.float64) if g is None else g.reshape(-1).double()
                for g, n in zip(grads, sizes, strict=True)]
        flags = torch.tensor([g is not None for g in grads], dtype=torch.float64)
        packed.append(torch.cat([flags, *flat, torch.tensor([terms.get(k, 0.0) for k in _TERMS],
                                                            dtype=torch.float64)]))
    for item in dist.gather_round_robin(packed, total, width):
        flags, rest = item[:len(params)], item[len(params):]
        for p, has, g in zip(params, flags.tolist(), rest[:sum(sizes)].split(sizes), strict=True):
            if has:
                g = g.to(p.dtype).reshape(p.shape)
                if p.grad is None:
                    p.grad = g.clone()
                else:
                    p.grad += g
        for k, v in zip(_TERMS, rest[sum(sizes):].tolist(), strict=True):
            rec[k] += v


def regulator_diagnostics(host, theta, psi, sampler, data, paths, rng, tasks: int = 16, lr: float = 1.0) -> dict:
    """ψ* on real support gradients: cosine to identity, norm ratio, gate; plus inner-step gains with/without ψ."""
    if psi is None:
        return {}
    stats: dict[str, list] = {}
    gain_psi, gain_raw = [], []
    device = _device(host)
    for _ in range(tasks):
        task = sampler.sample(rng)
        host.set_classnames(task.classnames)
        sup, qry = data.batch(task.support_idx), data.batch(task.query_idx)
        ys = torch.as_tensor(task.support_labels, dtype=torch.long, device=device)
        yq = torch.as_tensor(task.query_labels, dtype=torch.long, device=device)
        th = {k: v.detach().requires_grad_(True) for k, v in theta.items()}
        loss, _ = task_loss(host, th, sup, ys, paths)
        grads = torch.autograd.grad(loss, list(th.values()))
        for (name, _), g in zip(th.items(), grads, strict=True):
            for k, v in psi.regs[modality_of(name)].diagnostics(g).items():
                stats.setdefault(f"{modality_of(name)}.{k}", []).append(v)
        with torch.no_grad():
            base, _ = task_loss(host, th, qry, yq, paths)
        a = inner_adapt(host, theta, psi, sup, ys, paths, 1, lr, False)
        b = inner_adapt(host, theta, None, sup, ys, paths, 1, lr, False)
        with torch.no_grad():
            gain_psi.append(float(base - task_loss(host, a, qry, yq, paths)[0]))
            gain_raw.append(float(base - task_loss(host, b, qry, yq, paths)[0]))
    out = {k: float(np.mean(v)) for k, v in stats.items()}
    out["query_loss_drop_with_psi"] = float(np.mean(gain_psi))
    out["query_loss_drop_raw_gradient"] = float(np.mean(gain_raw))
    return out
