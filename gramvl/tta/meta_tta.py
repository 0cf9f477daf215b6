"""Meta-training for test time (SPEC 1.7): learn θ* (the text context TPT starts from) and the
structure-induced regulator ψ*(·; e(x)) on the meta-training corpus, with TPT's own update as inner step.

For every query image x of a meta-task (classes = the task's weakly labeled leaves):
    inner:  g = ∇_c H(mean prediction of x's confident views | c = θ)        unsupervised, as at test time
            θ'_x = AdamW_1(θ, ψ_φ(g; e(x)))                                   one TPT step, per image
    outer:  L = CE(s · cos(f(x), g(θ'_x)), weak label of x)  (+ λ · the same on a shifted-domain task)
            θ ← Adam(∇_θ L),  φ ← Adam(∇_φ L)
Second order: g keeps its graph (create_graph), so θ and φ get the exact gradient through the inner step.
AdamW's first step is ≈ lr · sign(ψ(g)), whose derivative vanishes; the step keeps that exact forward value
and backpropagates through ψ(g) / rms(ψ(g)) (straight-through, `surrogate`), see tpt.adamw_step.
Image features of `views` augmented views per corpus image are computed once and cached on disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from gramvl.backbone import Backbone
from gramvl.errors import GramvlError
from gramvl.gram.cmhc import CMHCConfig
from gramvl.gram.loop import OuterLoop, run_fingerprint, slot_tensors
from gramvl.gram.meta import (
    ARTIFACT_FORMAT,
    add_grads,
    anchor_text_rows,
    cpu_parallelism,
    outer_update,
    token_norm,
)
from gramvl.gram.regulator import RegulatorSet
from gramvl.gram.tasks import TaskConfig
from gramvl.io import save_tensors, write_json
from gramvl.paths import cache_dir, cache_fill_map, cache_fill_tag
from gramvl.tta.structure import PROTOTYPE_MODES, StructureContext, StructuredRegulator
from gramvl.tta.tpt import (
    HAND_PROMPT,
    AdamState,
    ViewAugmenter,
    adamw_step,
    confident_views,
    marginal_entropy,
    sample_generator,
    select_views,
)

STRUCTURES = (*PROTOTYPE_MODES, "none")


@dataclass
class MetaTTAConfig:
    """Recipe of meta-training for test time; the ablations are fields (structure, tasks, regulator)."""

    steps: int = 300
    meta_batch: int = 2  # tasks per outer step
    views: int = 32  # cached augmented views per corpus image (view 0 = the plain image)
    selection: float = 0.1  # confident views kept, as TPT
    crop_min: float = 0.08  # random resized crop area range of the views
    crop_max: float = 1.0
    augmix: bool = False
    inner_lr: float = 5e-3  # TPT's AdamW step
    weight_decay: float = 0.01
    surrogate: bool = True  # straight-through gradient for AdamW's sign-like first step
    second_order: bool = True
    outer_lr_theta: float = 2e-3
    outer_lr_phi: float = 1e-3
    shifted_weight: float = 1.0  # weight of the shifted-domain queries
    use_regulator: bool = True
    rank: int = 32
    # descent guard of ψ (gram/regulator.py): cosine of ψ(g) to g at least this (-1: off). Session 11's ψ* turned
    # TPT's gradient nearly orthogonal (cosine 0.06 to the identity) and its step was worse than no step
    psi_min_cos: float = -1.0
    # keep every row of θ within this multiple of the mean token-embedding norm of its initial context (0: off), as
    # meta.theta_anchor of `gramvl meta-train`. Session 12: the free test-time θ* alone cost 2.5 points of zero-shot
    # accuracy; with 0.25 (supervised CoOp M = 4's radius) the full method gained 3.6 points on the val splits
    # (docs/tta.md). Default since session 12; 0 reproduces the earlier artifacts
    theta_anchor: float = 0.25
    # how a CPU run uses its threads, as meta.cpu_parallel of `gramvl meta-train`: "tasks" (the same artifact at
    # any thread count; session 16) or "intra-op" (the loop before session 16)
    cpu_parallel: str = "tasks"
    structure: str = "complexity"  # prototypes: complexity | flat | leaves; none = ψ without context
    prototype_kind: str = "joint"  # joint | image | text centroids
    tau: float = 0.1  # prototype softmax temperature
    ctx_init: str = HAND_PROMPT
    init_artifact: str = ""  # start θ from a GRAM artifact's text_ctx instead
    grad_clip: float = 1.0
    time_budget_s: float = 0.0
    checkpoint_every: int = 25
    seed: int = 0

    def __post_init__(self) -> None:
        if self.structure not in STRUCTURES:
            raise GramvlError(f"structure must be one of {', '.join(STRUCTURES)}, not {self.structure!r}")
        if self.views < 2:
            raise GramvlError(f"meta-training for test time needs views >= 2, not {self.views}")
        if self.theta_anchor < 0:
            raise GramvlError(f"meta.theta_anchor must be >= 0 (0: off), got {self.theta_anchor}")


ABLATIONS = {  # name -> overrides of MetaTTAConfig / TaskConfig (documented in docs/tta.md)
    "full": {},
    "no-structure": {"meta.structure": "none"},
    "flat-prototypes": {"meta.structure": "flat"},
    "no-complexity": {"meta.structure": "flat", "tasks.complexity_informed": False},
    "no-regulator": {"meta.use_regulator": False},
}


@dataclass
class MetaTTAJob:
    """Everything `gramvl meta-train --tta` needs."""

    corpus: str = "world"
    model: str = "small"
    weights: str | None = None
    device: str = "cpu"
    hierarchy: str = "cmhc"  # cmhc | flat | random
    meta: MetaTTAConfig = field(default_factory=MetaTTAConfig)
    tasks: TaskConfig = field(default_factory=lambda: TaskConfig(shots=1, queries=4))
    cmhc: CMHCConfig = field(default_factory=CMHCConfig)


# ======================================================================================= view features
class ViewFeatureCache:
    """Frozen features [N, V, D] of V augmented views per corpus image, computed on first use and kept in
    `cache_dir('tta-views')/<key>/` (float16 memmap + a done mask), so a restart never re-encodes."""

    def __init__(self, bb: Backbone, paths: list[str], views: int = 32, crop_scale=(0.08, 1.0),
                 augmix: bool = False, seed: int = 0, cache: bool = True, batch_size: int = 512):
        if not paths:
            raise GramvlError("meta-training for test time needs the corpus image paths (none given)")
        self.bb, self.paths, self.views, self.seed, self.batch_size = bb, list(paths), views, seed, batch_size
        self.augment = ViewAugmenter(bb, views, augmix, tuple(crop_scale))
        n, d = len(paths), bb.embed_dim
        recipe = [bb.ident, views, list(crop_scale), augmix, seed, bb.image_size, cache_fill_tag(bb.device)]
        h = hashlib.sha256(json.dumps(recipe).encode())
        for p in self.paths:
            h.update(f"{p}\n".encode())
        self.key = h.hexdigest()[:24]
        self.folder = cache_dir("tta-views") / self.key if cache else None
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            fp, dp = self.folder / "feats.npy", self.folder / "done.npy"
            # what `gramvl cache` reads to tell a current folder from one no run serves any more
            write_json(self.folder / "recipe.json", {"recipe": recipe, "fill": recipe[-1]})
            if fp.is_file() and dp.is_file():
                self.feats = np.load(fp, mmap_mode="r+")
                self.done = np.load(dp)
                if self.feats.shape != (n, views, d) or self.done.shape != (n,):
                    raise GramvlError(f"view cache {self.folder} is stale; delete it")
            else:
                self.feats = np.lib.format.open_memmap(fp, mode="w+", dtype=np.float16, shape=(n, views, d))
                self.done = np.zeros(n, dtype=bool)
        else:
            self.feats = np.zeros((n, views, d), dtype=np.float16)
            self.done = np.zeros(n, dtype=bool)

    def __len__(self) -> int:
        return len(self.paths)

    @torch.no_grad()
    def fill(self, idx=None, progress: bool = False) -> None:
        """Encode the views of the given corpus images (all by default) that are not cached yet."""
        from gramvl.data.base import load_image

        idx = np.arange(len(self)) if idx is None else np.unique(np.asarray(idx, dtype=np.int64))
        todo = idx[~self.done[idx]]
        if not len(todo):
            return
        per = max(1, self.batch_size // self.views)

        def parts():  # augmented in this thread (each image from its own generator)
            for s in tqdm(range(0, len(todo), per), desc="encode corpus views", disable=not progress,
                          leave=False, mininterval=2):
                part = todo[s:s + per]
                yield part, torch.stack([self.augment(load_image(self.paths[i]), sample_generator(self.seed, int(i)))
                                         for i in part])

        def encode(item):
            part, views = item
            flat = views.flatten(0, 1).to(self.bb.device, self.bb.dtype)
            return part, self.bb.encode_image_rows(flat).float().cpu().view(len(part), self.views, -1)

        for part, f in cache_fill_map(encode, parts(), self.bb.device):  # the same bytes at any thread count
            self.feats[part] = f.numpy().astype(np.float16)
            self.done[part] = True
        if len(todo) and self.folder is not None:
            if hasattr(self.feats, "flush"):
                self.feats.flush()
            tmp = self.folder / ".done.tmp.npy"
            np.save(tmp, self.done)
            tmp.replace(self.folder / "done.npy")

    def get(self, idx) -> torch.Tensor:
        """View features [len(idx), V, D] (float32, L2-normalized) of corpus images idx."""
        idx = np.asarray(idx, dtype=np.int64)
        self.fill(idx)
        feats = torch.from_numpy(np.asarray(self.feats[idx], dtype=np.float32)).to(self.bb.device)
        return F.normalize(feats, dim=-1)


# ======================================================================================= the loop
def tta_adapt(bb: Backbone, cp, theta: torch.Tensor, feats: torch.Tensor, cfg: MetaTTAConfig,
              psi: StructuredRegulator | None, create_graph: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image contexts [B, 1, M, d] after one regulated TPT step from θ, and the pre-step logits [B, C]."""
    B = feats.shape[0]
    scale = bb.logit_scale.detach()
    ctx = theta.expand(B, 1, *theta.shape)
    if not create_graph:
        ctx = ctx.detach().requires_grad_(True)
    logits = scale * torch.einsum("bvd,bcd->bvc", feats, bb.prompted_text_features(cp, ctx))
    sel = confident_views(logits.detach(), cfg.selection)
    loss = marginal_entropy(select_views(logits, sel)).sum()
    (g,) = torch.autograd.grad(loss, ctx, create_graph=create_graph)
    if psi is not None:
        g = psi(g, feats[:, 0])
    if not create_graph:
        ctx = theta.expand(B, 1, *theta.shape)
    new, _ = adamw_step(ctx, g, AdamState.zeros_like(ctx), cfg.inner_lr, weight_decay=cfg.weight_decay,
                        surrogate=cfg.surrogate)
    return new, logits[:, 0].detach()


def tta_query_loss(bb: Backbone, classnames: list[str], theta: torch.Tensor, feats: torch.Tensor,
                   labels: torch.Tensor, cfg: MetaTTAConfig, psi: StructuredRegulator | None,
                   create_graph: bool = True) -> tuple[torch.Tensor, float, float]:
    """Outer loss CE(after one TPT step, weak labels) of one query set; accuracies before and after.

    Second order runs attention in its plain (math) form: the fused CPU kernels have no double backward.
    """
    cp = bb.class_prompts(classnames, int(theta.shape[0]))
    labels = labels.to(feats.device)
    with _double_backward_attention(create_graph):
        ctx, pre = tta_adapt(bb, cp, theta, feats, cfg, psi, create_graph)
        post = bb.logit_scale.detach() * torch.einsum("bd,bcd->bc", feats[:, 0],
                                                      bb.prompted_text_features(cp, ctx))
    loss = F.cross_entropy(post, labels)
    return loss, _acc(pre, labels), _acc(post.detach(), labels)


def _double_backward_attention(enabled: bool):
    """Scaled-dot-product attention restricted to the math backend (differentiable twice) when enabled."""
    if not enabled:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def _acc(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(-1) == labels).float().mean())


def _init_theta(bb: Backbone, cfg: MetaTTAConfig) -> torch.Tensor:
    from gramvl.tta.tpt import gram_init, hand_init

    init = gram_init(bb, cfg.init_artifact, "init") if cfg.init_artifact else hand_init(bb, cfg.ctx_init)
    return init.ctx.to(bb.device)


def meta_train_tta(cfg: MetaTTAConfig, bb: Backbone, sampler, views: ViewFeatureCache, out: str | Path,
                   prototypes: torch.Tensor | None = None, extra_meta: dict | None = None,
                   progress: bool = True) -> Path:
    """Meta-train θ* and ψ*(·; e(x)) for test-time tuning; write a GRAM artifact (`tta`: true). Resumable."""
    out = Path(out)
    ckpt = out.with_name(out.stem + ".ckpt.safetensors")
    torch.manual_seed(cfg.seed)
    structured = cfg.use_regulator and cfg.structure != "none"
    if structured and prototypes is None:
        raise GramvlError(f"structure {cfg.structure!r} needs prototypes (from the CMHC hierarchy)")
    context = StructureContext(prototypes, cfg.tau) if structured else None
    theta = torch.nn.Parameter(_init_theta(bb, cfg))
    anchor = theta.detach().clone()  # the initial context (deterministic, so also right on resume)
    radius = cfg.theta_anchor * token_norm(bb) if cfg.theta_anchor > 0 else None
    psi_set = RegulatorSet({"text": bb.text_width}, rank=cfg.rank, ctx_dim=context.dim if context is not None else 0,
                           min_cos=cfg.psi_min_cos) if cfg.use_regulator else None
    psi = StructuredRegulator(psi_set.regs["text"], context).to(bb.device) if psi_set is not None else None
    opt_t = torch.optim.Adam([theta], lr=cfg.outer_lr_theta)
    opt_p = torch.optim.Adam(psi_set.parameters(), lr=cfg.outer_lr_phi) if psi_set is not None else None
    loop = OuterLoop(cfg, ckpt, {"text_ctx": theta}, psi_set, "meta-train tta", progress,
                     run_fingerprint(bb.ident, extra_meta))
    # as `gramvl meta-train` (gram/meta.py): on the CPU the tasks run at once, one intra-op thread each, summed in
    # task order, and the rest on one thread: the same artifact at any thread count
    pinned, at_once = cpu_parallelism(cfg.cpu_parallel, bb.device, cfg.meta_batch, "cpu_parallel")
    parallel = at_once > 1
    outer = [theta, *(psi_set.parameters() if psi_set is not None else [])]
    with pinned:
        for step in loop.steps():
            opt_t.zero_grad(set_to_none=True)
            if opt_p:
                opt_p.zero_grad(set_to_none=True)
            rec = loop.new_record()
            tasks = []
            for _ in range(cfg.meta_batch):  # drawn, and their view features read, in this thread, in order
                task = sampler.sample(loop.rng)
                shifted = cfg.shifted_weight > 0 and getattr(task, "shift_idx", None) is not None
                tasks.append((task, views.get(task.query_idx), views.get(task.shift_idx) if shifted else None))

            def task_loss(item):
                task, fq, fsh = item
                loss, pre, post = tta_query_loss(bb, task.classnames, theta, fq,
                                                 torch.as_tensor(task.query_labels, dtype=torch.long), cfg, psi,
                                                 cfg.second_order)
                terms = {"pre_acc": pre / cfg.meta_batch, "post_acc": post / cfg.meta_batch}
                if fsh is not None:
                    ysh = torch.as_tensor(task.shift_labels, dtype=torch.long)
                    lsh, _, acc_sh = tta_query_loss(bb, task.classnames_shift, theta, fsh, ysh, cfg, psi,
                                                    cfg.second_order)
                    loss = loss + cfg.shifted_weight * lsh
                    terms["shift_acc"] = acc_sh / cfg.meta_batch
                terms["loss"] = float(loss.detach()) / cfg.meta_batch
                return loss, terms

            def task_grads(item):
                loss, terms = task_loss(item)
                return torch.autograd.grad(loss / cfg.meta_batch, outer, allow_unused=True), terms

            if parallel:
                done = cache_fill_map(task_grads, tasks, bb.device)
            else:
                done = (task_loss(item) for item in tasks)
            # the attention kernel is set here, around the tasks only (not the view features, which a cache keeps),
            # because the setting is global and the tasks run in threads
            with _double_backward_attention(cfg.second_order):
                for result, terms in done:
                    if parallel:
                        add_grads(outer, result)
                    else:
                        (result / cfg.meta_batch).backward()
                    for k, v in terms.items():
                        rec[k] += v
            outer_update([theta], opt_t, psi_set, opt_p, cfg.grad_clip)
            if radius is not None:
                anchor_text_rows({"text_ctx": theta}, {"text_ctx": anchor}, radius)
            loop.end_step(step, rec, loss=f"{rec['loss']:.3f}", pre=f"{rec['pre_acc']:.2f}",
                          post=f"{rec['post_acc']:.2f}")
        diag = tta_diagnostics(bb, theta.detach(), psi, sampler, views, cfg, np.random.default_rng(cfg.seed + 1))
    sidecar = {"format": ARTIFACT_FORMAT, "host": "coop", "unigram": False, "tta": True, "backbone": bb.ident,
               "slots": {"text_ctx": list(theta.shape)},
               "regulator": psi_set.config() if psi_set is not None else None,
               "structure": {"mode": cfg.structure if structured else "none", "kind": cfg.prototype_kind,
                             "tau": cfg.tau, "n_prototypes": int(prototypes.shape[0]) if structured else 0},
               "tpt": {"lr": cfg.inner_lr, "weight_decay": cfg.weight_decay, "selection": cfg.selection,
                       "views": cfg.views},
               **loop.summary(), "psi_diagnostics": diag, **(extra_meta or {})}
    tensors = slot_tensors({"text_ctx": theta}, psi_set)
    if structured:
        tensors["prototypes"] = context.prototypes
    save_tensors(out, tensors, sidecar)
    write_json(out.with_name(out.stem + ".history.json"), loop.history)
    return out


def tta_diagnostics(bb: Backbone, theta: torch.Tensor, psi: StructuredRegulator | None, sampler,
                    views: ViewFeatureCache, cfg: MetaTTAConfig, rng: np.random.Generator,
                    tasks: int = 8) -> dict:
    """On fresh tasks: accuracy before, after a raw and after a ψ*-regulated TPT step; ψ* vs the identity."""
    pre, raw, reg, stats = [], [], [], {}
    for _ in range(tasks):
        task = sampler.sample(rng)
        feats = views.get(task.query_idx)
        y = torch.as_tensor(task.query_labels, dtype=torch.long)
        th = theta.detach().requires_grad_(True)
        _, p0, a_raw = tta_query_loss(bb, task.classnames, th, feats, y, cfg, None, False)
        pre.append(p0)
        raw.append(a_raw)
        if psi is not None:
            reg.append(tta_query_loss(bb, task.classnames, th, feats, y, cfg, psi, False)[2])
            cp = bb.class_prompts(task.classnames, int(theta.shape[0]))
            ctx = theta.expand(feats.shape[0], 1, *theta.shape).clone().requires_grad_(True)
            logits = bb.logit_scale.detach() * torch.einsum("bvd,bcd->bvc", feats,
                                                            bb.prompted_text_features(cp, ctx))
            sel = confident_views(logits.detach(), cfg.selection)
            loss = marginal_entropy(select_views(logits, sel)).sum()
            (g,) = torch.autograd.grad(loss, ctx)
            e = psi.context(feats[:, 0]) if psi.structured else None
            for k, v in psi.regulator.diagnostics(g, e).items():
                stats.setdefault(k, []).append(v)
    out = {"pre_acc": float(np.mean(pre)), "post_acc_raw_step": float(np.mean(raw))}
    if reg:
        out["post_acc_psi_step"] = float(np.mean(reg))
    out.update({f"text.{k}": float(np.mean(v)) for k, v in stats.items()})
    return out


# ======================================================================================= end to end
def run_meta_tta(job: MetaTTAJob, out: str | Path, bb: Backbone | None = None, progress: bool = True) -> Path:
    """Corpus -> features -> hierarchy -> tasks -> cached views -> meta-training; returns the artifact."""
    from gramvl.backbone import load_backbone
    from gramvl.gram.pipeline import build_hierarchy, corpus_features, features_digest
    from gramvl.gram.tasks import TaskSampler

    t0 = time.time()
    bb = bb or load_backbone(job.model, job.weights, device=job.device)
    feats = corpus_features(bb, job.corpus, progress)
    hier = build_hierarchy(feats, job.hierarchy, job.cmhc, progress)
    t_clu = time.time() - t0
    sampler = TaskSampler(hier, job.tasks)
    m = job.meta
    protos = None
    if m.use_regulator and m.structure != "none":
        protos = hier.prototypes(m.structure, m.prototype_kind)
    domains = hier.domains
    cache = ViewFeatureCache(bb, feats.paths, m.views, (m.crop_min, m.crop_max), m.augmix, m.seed)
    extra = {"corpus": job.corpus, "pairs": len(feats), "hierarchy": job.hierarchy,
             "corpus_features_sha256": features_digest(feats.zI),
             "hierarchy_summary": {"domains": len(domains() if callable(domains) else domains),
                                   "leaves": len(hier.leaves())},
             "task_config": asdict(job.tasks), "cmhc_config": asdict(job.cmhc),
             "timing": {"features_and_clustering_s": round(t_clu, 1)}}
    return meta_train_tta(m, bb, sampler, cache, out, protos, extra, progress)
