"""Test-time prompt tuning (TPT, Shu et al. NeurIPS 2022) for any Backbone, with an optional regulator.

Per test image: the image plus `n_views - 1` random resized crops with flips (AugMix optional); the frozen
image tower encodes them once, without grad; the `selection` fraction of views with the lowest prediction
entropy is kept; the entropy of their mean prediction is minimized w.r.t. the text context only, with
`steps` AdamW steps; the original image is classified with the tuned context; the context is reset.

Several test images are tuned at once, each with its own context: the contexts form one [B, 1, M, d]
tensor, the loss is the sum of the per-image entropies (so each context gets exactly its own gradient) and
AdamW, being elementwise, is applied to the whole tensor; this equals B independent TPT runs. At the first
step every context still equals the initial one, so the class features are computed once and the B
per-image gradients come from batched vector-Jacobian products (about half the text-encoder work).
With a regulator, each image's gradient passes through ψ(g) or ψ(g; e(x)) (structure.py) before AdamW.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from gramvl.backbone import Backbone
from gramvl.errors import GramvlError
from gramvl.gram.regulator import Regulator
from gramvl.tta.structure import StructureContext, StructuredRegulator

HAND_PROMPT = "a photo of a"
ENCODE_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
GRAM_PARTS = ("both", "init", "regulator")


@dataclass
class TPTConfig:
    """TPT's recipe (defaults of the paper and its code); `steps=0` is zero-shot with the initial context."""

    n_views: int = 64  # the image itself + n_views - 1 augmented views
    selection: float = 0.1  # fraction of lowest-entropy views kept (int(n_views * selection), at least 1)
    steps: int = 1
    lr: float = 5e-3
    weight_decay: float = 0.01  # torch.optim.AdamW's default, which TPT uses
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    augmix: bool = False
    crop_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop's default area range, as in TPT
    batch_images: int = 8  # test images tuned at once (independent contexts)
    text_chunk: int = 512  # rows per text-encoder chunk
    checkpoint_text: bool = False  # recompute text activations in backward (less memory)
    pack_text: bool = True  # encode the prompt prefix shared by all classes once per packed sequence (exact)
    encode_precision: str = "fp32"  # fp32 | bf16 | fp16: autocast of the frozen image tower on the views
    seed: int = 0  # drives the random views

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_images < 1:
            raise GramvlError(f"TPT needs steps >= 0 and batch_images >= 1 (got {self.steps}, "
                              f"{self.batch_images})")
        if self.steps and self.n_views < 1:
            raise GramvlError(f"TPT needs at least one view, got n_views={self.n_views}")
        if not 0.0 < self.selection <= 1.0:
            raise GramvlError(f"the confidence selection fraction must be in (0, 1], not {self.selection}")
        if self.encode_precision not in ENCODE_DTYPES:
            raise GramvlError(f"encode precision must be one of {', '.join(ENCODE_DTYPES)}, not "
                              f"{self.encode_precision!r}")
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise GramvlError(f"crop scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")

    @property
    def n_selected(self) -> int:
        return n_confident(self.n_views, self.selection)


# ======================================================================================= the loss
def n_confident(n_views: int, fraction: float) -> int:
    """How many views confidence selection keeps: int(n * fraction) as in TPT, at least one."""
    return max(1, int(n_views * fraction))


def view_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of each view's prediction: logits [..., V, C] -> [..., V]."""
    logp = logits.log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def confident_views(logits: torch.Tensor, fraction: float) -> torch.Tensor:
    """Indices [..., k] of the k = int(V * fraction) lowest-entropy views of logits [..., V, C]."""
    k = n_confident(logits.shape[-2], fraction)
    return torch.argsort(view_entropy(logits), dim=-1, stable=True)[..., :k]


def marginal_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the mean probability over views: logits [..., k, C] -> [...] (TPT's objective)."""
    logp = logits.log_softmax(-1)
    mean_logp = torch.logsumexp(logp, dim=-2) - math.log(logits.shape[-2])
    mean_logp = mean_logp.clamp_min(torch.finfo(mean_logp.dtype).min)
    return -(mean_logp.exp() * mean_logp).sum(-1)


def select_views(logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """logits [B, V, C] at view indices idx [B, k] -> [B, k, C]."""
    return torch.gather(logits, 1, idx.unsqueeze(-1).expand(*idx.shape, logits.shape[-1]))


# ======================================================================================= AdamW
@dataclass
class AdamState:
    """Elementwise AdamW moments of a (batched) context; one per test image when batched."""

    m: torch.Tensor
    v: torch.Tensor
    step: int = 0

    @classmethod
    def zeros_like(cls, p: torch.Tensor) -> AdamState:
        return cls(torch.zeros_like(p), torch.zeros_like(p), 0)


def adamw_step(p: torch.Tensor, g: torch.Tensor, state: AdamState, lr: float, betas=(0.9, 0.999),
               eps: float = 1e-8, weight_decay: float = 0.01,
               surrogate: bool = False) -> tuple[torch.Tensor, AdamState]:
    """One AdamW step, the same arithmetic as torch.optim.AdamW, as a function (differentiable).

    AdamW's first step moves each element by lr * g / (|g| + eps), nearly lr * sign(g), whose derivative
    vanishes. `surrogate=True` keeps this forward value and backpropagates through the scale-free
    m / rms(m) of each sample instead (straight-through), so meta-training sees a usable gradient.
    """
    b1, b2 = betas
    t = state.step + 1
    m = torch.lerp(state.m, g, 1 - b1)
    v = state.v * b2 + (1 - b2) * g * g
    bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
    denom = v.sqrt() / math.sqrt(bc2) + eps
    direction = m / denom / bc1
    if surrogate:
        rms = m.flatten(1).pow(2).mean(1).add(1e-30).sqrt().view(-1, *([1] * (m.dim() - 1)))
        s = m / rms
        direction = direction.detach() + s - s.detach()
    p = p * (1 - lr * weight_decay) - lr * direction
    return p, AdamState(m, v, t)


# ======================================================================================= views
def _level(g: torch.Generator, severity: float = 1.0) -> float:
    return 0.1 + (severity - 0.1) * float(torch.rand((), generator=g))


def _sign(g: torch.Generator) -> int:
    return 1 if float(torch.rand((), generator=g)) < 0.5 else -1


def _affine(img: Image.Image, coeffs: tuple) -> Image.Image:
    return img.transform(img.size, Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR)


def _augmix_ops(img: Image.Image, g: torch.Generator) -> Image.Image:
    """One random AugMix operation at severity 1 (Hendrycks et al. 2020; ops that do not overlap test
    corruptions: autocontrast, equalize, posterize, rotate, solarize, shear, translate)."""
    op = int(torch.randint(9, (), generator=g))
    lv = _level(g)
    if op == 0:
        return ImageOps.autocontrast(img)
    if op == 1:
        return ImageOps.equalize(img)
    if op == 2:
        return ImageOps.posterize(img, 4 - int(lv * 4 / 10))
    if op == 3:
        return img.rotate(_sign(g) * int(lv * 30 / 10), resample=Image.Resampling.BILINEAR)
    if op == 4:
        return ImageOps.solarize(img, 256 - int(lv * 256 / 10))
    if op in (5, 6):
        s = _sign(g) * lv * 0.3 / 10
        return _affine(img, (1, s, 0, 0, 1, 0) if op == 5 else (1, 0, 0, s, 1, 0))
    shift = _sign(g) * int(lv * img.size[0] / 3 / 10)
    return _affine(img, (1, 0, shift, 0, 1, 0) if op == 7 else (1, 0, 0, 0, 1, shift))


def crop_params(width: int, height: int, g: torch.Generator, scale=(0.08, 1.0),
                ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random resized crop: torchvision's algorithm, drawn from generator g."""
    area = width * height
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * (scale[0] + (scale[1] - scale[0]) * float(torch.rand((), generator=g)))
        r = math.exp(log_r[0] + (log_r[1] - log_r[0]) * float(torch.rand((), generator=g)))
        w, h = int(round(math.sqrt(target * r))), int(round(math.sqrt(target / r)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=g))
            left = int(torch.randint(0, width - w + 1, (), generator=g))
            return top, left, h, w
    r_in = width / height
    if r_in < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif r_in > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def sample_generator(seed: int, key: int) -> torch.Generator:
    """The RNG of one test sample's views: a function of (seed, sample key) only, never of batch order."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(key) * 7919 + 17) % (2 ** 63 - 1))


class ViewAugmenter:
    """PIL image -> [n_views, 3, S, S]: view 0 is the test transform, the rest random resized crops + flips
    of the original image (AugMix-mixed when `augmix`), resized to the backbone's resolution."""

    def __init__(self, bb: Backbone, n_views: int, augmix: bool = False, crop_scale=(0.08, 1.0)):
        self.size, self.n_views, self.augmix, self.crop_scale = bb.image_size, n_views, augmix, crop_scale
        self.base = bb.transform(False)
        self.mean = torch.tensor(bb.mean).view(3, 1, 1)
        self.std = torch.tensor(bb.std).view(3, 1, 1)

    def _tensor(self, img: Image.Image) -> torch.Tensor:
        arr = np.asarray(img, dtype=np.float32) / 255.0
        return (torch.from_numpy(arr).permute(2, 0, 1) - self.mean) / self.std

    def _view(self, img: Image.Image, g: torch.Generator) -> torch.Tensor:
        top, left, h, w = crop_params(img.width, img.height, g, self.crop_scale)
        v = img.resize((self.size, self.size), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))
        if float(torch.rand((), generator=g)) < 0.5:
            v = v.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        x = self._tensor(v)
        if not self.augmix:
            return x
        w3 = _dirichlet3(g)
        m = float(torch.rand((), generator=g))  # Beta(1, 1) is uniform
        mix = torch.zeros_like(x)
        for i in range(3):
            a = v
            for _ in range(int(torch.randint(1, 4, (), generator=g))):
                a = _augmix_ops(a, g)
            mix += w3[i] * self._tensor(a)
        return m * x + (1 - m) * mix

    def __call__(self, img: Image.Image, g: torch.Generator) -> torch.Tensor:
        img = img.convert("RGB")
        views = [self.base(img)]
        views += [self._view(img, g) for _ in range(self.n_views - 1)]
        return torch.stack(views)


def _dirichlet3(g: torch.Generator) -> torch.Tensor:
    """Dirichlet(1, 1, 1) from generator g: normalized Exp(1) draws."""
    e = -torch.log(torch.rand(3, generator=g).clamp_min(1e-12))
    return e / e.sum()


# ======================================================================================= initial contexts
@dataclass
class ContextInit:
    """Where a TPT context starts, and the (frozen) regulator its gradients go through, if any."""

    ctx: torch.Tensor  # [M, d_text]
    source: str
    regulator: Regulator | None = None
    structure: StructureContext | None = None
    meta: dict = field(default_factory=dict)

    def describe(self) -> dict:
        return {"source": self.source, "n_ctx": int(self.ctx.shape[0]),
                "regulator": self.regulator is not None,
                "structure_prototypes": int(self.structure.prototypes.shape[0]) if self.structure else 0,
                "structure_tau": self.structure.tau if self.structure else None}


def _check_ctx(bb: Backbone, ctx: torch.Tensor, what: str, n_ctx: int | None = None) -> torch.Tensor:
    if ctx.dim() != 2:
        raise GramvlError(f"{what} holds a text context of shape {tuple(ctx.shape)}; TPT needs one shared "
                          f"context [M, d] (class-specific CoOp contexts cannot be tuned per test image)")
    if ctx.shape[1] != bb.text_width:
        raise GramvlError(f"prompt length mismatch: {what} has context width {ctx.shape[1]}, the model's "
                          f"text width is {bb.text_width} (checkpoint from another backbone?)")
    if n_ctx is not None and ctx.shape[0] != n_ctx:
        raise GramvlError(f"prompt length mismatch: {what} has {ctx.shape[0]} context tokens, --n-ctx asks "
                          f"for {n_ctx}; drop --n-ctx or use a matching prompt")
    return ctx.detach().float().clone()


def hand_init(bb: Backbone, words: str = HAND_PROMPT, n_ctx: int | None = None) -> ContextInit:
    """The hand-written prompt's token embeddings as the context ("a photo of a" -> 4 tokens)."""
    if not words.strip():
        raise GramvlError("the hand-written context init is empty; pass words such as 'a photo of a'")
    ctx = bb.token_embeddings(words.replace("_", " ").strip())
    return ContextInit(_check_ctx(bb, ctx, f"the hand-written prompt {words!r}", n_ctx), f"hand:{words}")


def prompt_file_init(bb: Backbone, path: str | Path, n_ctx: int | None = None) -> ContextInit:
    """The learned context of a gramvl prompt file (written by `gramvl train`, e.g. CoOp)."""
    from gramvl.io import load_tensors

    tensors, meta = load_tensors(path)
    if not meta or meta.get("format") != "gramvl-prompt":
        raise GramvlError(f"{path} is not a gramvl prompt file (written by `gramvl train`); for a GRAM "
                          f"artifact use --gram")
    if meta.get("backbone") != bb.ident:
        raise GramvlError(f"checkpoint from another backbone: {path} was trained on {meta.get('backbone')}, "
                          f"the loaded model is {bb.ident}")
    if "text_ctx" not in tensors:
        raise GramvlError(f"{path} ({meta.get('method')}) has no text context 'text_ctx' to tune; its "
                          f"tensors: {sorted(tensors)}")
    ctx = _check_ctx(bb, tensors["text_ctx"], str(path), n_ctx)
    return ContextInit(ctx, f"prompt:{path}", meta={"method": meta.get("method")})


def gram_init(bb: Backbone, path: str | Path, parts: str = "both", words: str = HAND_PROMPT,
              n_ctx: int | None = None, structure: bool = True) -> ContextInit:
    """θ* (text_ctx) and/or ψ* of a GRAM artifact; a test-time artifact also brings its prototypes."""
    from gramvl.gram.attach import _read_artifact, _theta_psi, resolve_artifact

    if parts not in GRAM_PARTS:
        raise GramvlError(f"--gram-parts must be one of {', '.join(GRAM_PARTS)}, not {parts!r}")
    path = resolve_artifact(path)  # 'default' -> the shipped artifact of the packaged model
    tensors, meta = _read_artifact(path)  # read once: θ*, ψ* and the prototypes come from the same tensors
    theta, psi = _theta_psi(tensors, meta)
    if meta.get("backbone") != bb.ident:
        raise GramvlError(f"checkpoint from another backbone: GRAM artifact {path} was meta-trained on "
                          f"{meta.get('backbone')}, the loaded model is {bb.ident}; re-run "
                          f"`gramvl meta-train`")
    if parts in ("both", "init"):
        if "text_ctx" not in theta:
            raise GramvlError(f"GRAM artifact {path} has no text context (slots {sorted(theta)}); TPT tunes "
                              f"the text context: meta-train a text host (coop) or use --gram-parts "
                              f"regulator")
        init = ContextInit(_check_ctx(bb, theta["text_ctx"], f"GRAM artifact {path}", n_ctx), f"gram:{path}")
    else:
        init = hand_init(bb, words, n_ctx)
        init.source += f"+psi:{path}"
    init.meta = {"artifact": str(path), "parts": parts, "tta_artifact": bool(meta.get("tta"))}
    if parts in ("both", "regulator") and psi is not None:
        if "text" not in psi.regs:
            raise GramvlError(f"GRAM artifact {path} has no text regulator (modalities {sorted(psi.regs)})")
        reg = psi.regs["text"]
        if reg.dim != bb.text_width:
            raise GramvlError(f"the regulator of {path} acts on rows of width {reg.dim}, the text context "
                              f"has width {bb.text_width}")
        init.regulator = reg
        if structure and reg.ctx_dim and "prototypes" in tensors:
            tau = float((meta.get("structure") or {}).get("tau", 0.1))
            init.structure = StructureContext(tensors["prototypes"], tau)
            if init.structure.dim != bb.embed_dim:
                raise GramvlError(f"the prototypes of {path} have width {init.structure.dim}, the model's "
                                  f"image features {bb.embed_dim}: checkpoint from another backbone")
    return init


def resolve_init(bb: Backbone, prompt: str | Path | None = None, gram: str | Path | None = None,
                 gram_parts: str = "both", words: str = HAND_PROMPT, n_ctx: int | None = None,
                 structure: bool = True) -> ContextInit:
    """The CLI's choice: a prompt file (`--init`), a GRAM artifact (`--gram`), or the hand-written prompt."""
    if prompt and gram and gram_parts in ("both", "init"):
        raise GramvlError("--init and --gram both set the initial context; use one (or --gram-parts "
                          "regulator)")
    if gram:
        init = gram_init(bb, gram, gram_parts, words, n_ctx, structure)
        if prompt:
            base = prompt_file_init(bb, prompt, n_ctx)
            init.ctx, init.source = base.ctx, f"{base.source}+psi:{gram}"
        return init
    if prompt:
        return prompt_file_init(bb, prompt, n_ctx)
    return hand_init(bb, words, n_ctx)


# ======================================================================================= the tuner
class TPT:
    """Test-time prompt tuning of one text context per test image, reset before every image."""

    def __init__(self, bb: Backbone, classnames: list[str], init: ContextInit | None = None,
                 cfg: TPTConfig | None = None, regulate: bool = True):
        self.bb, self.cfg = bb, cfg or TPTConfig()
        self.init = init or hand_init(bb)
        self.ctx0 = self.init.ctx.to(bb.device, bb.dtype)
        self.psi = None
        if regulate and self.init.regulator is not None:
            self.psi = StructuredRegulator(self.init.regulator, self.init.structure).to(bb.device)
        self.augment = ViewAugmenter(bb, self.cfg.n_views, self.cfg.augmix, self.cfg.crop_scale)
        self._vjp_ok = True
        self.set_classnames(classnames)

    def set_classnames(self, classnames: list[str]) -> None:
        self.classnames = list(classnames)
        self.cp = self.bb.class_prompts(self.classnames, int(self.ctx0.shape[0]))
        self._text0: torch.Tensor | None = None

    @property
    def tunes(self) -> bool:
        return self.cfg.steps > 0

    # ---------------------------------------------------------------------------------- pieces
    def text_features(self, ctx: torch.Tensor) -> torch.Tensor:
        """[C, D] for a context [M, d], [B, C, D] for contexts [B, 1, M, d]."""
        return self.bb.prompted_text_features(self.cp, ctx, chunk_size=self.cfg.text_chunk,
                                              checkpoint=self.cfg.checkpoint_text, pack=self.cfg.pack_text)

    def initial_text(self) -> torch.Tensor:
        """Class features [C, D] under the initial (untuned) context, cached."""
        if self._text0 is None:
            with torch.no_grad():
                self._text0 = self.text_features(self.ctx0)
        return self._text0

    def views(self, images: list[Image.Image], keys: list[int]) -> torch.Tensor:
        """[B, V, 3, S, S] views (V = 1, the plain image, when not tuning); deterministic per (seed, key)."""
        if not self.tunes:
            return torch.stack([self.augment.base(im.convert("RGB")) for im in images]).unsqueeze(1)
        pairs = zip(images, keys, strict=True)
        return torch.stack([self.augment(im, sample_generator(self.cfg.seed, k)) for im, k in pairs])

    @torch.no_grad()
    def encode_views(self, views: torch.Tensor, chunk: int = 512) -> torch.Tensor:
        """Frozen, normalized image features [B, V, D] of views [B, V, 3, S, S], computed once, no grad.

        `encode_precision` bf16/fp16 runs the image tower under autocast (as TPT's code does on GPUs with
        fp16); the features are returned in the backbone's dtype, normalized again there."""
        flat = views.flatten(0, 1).to(self.bb.device, self.bb.dtype)
        dt = ENCODE_DTYPES[self.cfg.encode_precision]
        with torch.autocast(self.bb.device.type, dtype=dt) if dt else contextlib.nullcontext():
            feats = torch.cat([self.bb.encode_image(flat[s:s + chunk]) for s in range(0, flat.shape[0], chunk)])
        if dt:
            feats = torch.nn.functional.normalize(feats.to(self.bb.dtype), dim=-1)
        return feats.view(*views.shape[:2], -1)

    def tune(self, view_feats: torch.Tensor) -> torch.Tensor:
        """Tuned contexts [B, 1, M, d] from the initial one, for view features [B, V, D] (view 0 = image)."""
        cfg = self.cfg
        B = view_feats.shape[0]
        ctx = self.ctx0.expand(B, 1, *self.ctx0.shape).clone()
        if not self.tunes:
            return ctx
        state = AdamState.zeros_like(ctx)
        selected = None
        for step in range(cfg.steps):
            g = self._shared_first_grad(view_feats) if step == 0 and self._vjp_ok else None
            if g is not None:
                g, selected = g
            else:
                g, selected = self._grad(ctx, view_feats, selected)
            with torch.no_grad():
                if self.psi is not None:
                    g = self.psi(g, view_feats[:, 0])
                ctx, state = adamw_step(ctx, g, state, cfg.lr, cfg.betas, cfg.eps, cfg.weight_decay)
        return ctx.detach()

    def _loss(self, logits: torch.Tensor, selected: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if selected is None:  # confident views are chosen once, under the initial context (as TPT)
            selected = confident_views(logits.detach(), self.cfg.selection)
        return marginal_entropy(select_views(logits, selected)).sum(), selected

    def _grad(self, ctx: torch.Tensor, view_feats: torch.Tensor,
              selected: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image gradients [B, 1, M, d]: the B contexts run through the text encoder as B x C rows."""
        c = ctx.detach().requires_grad_(True)
        with torch.enable_grad():
            text = self.text_features(c)
            logits = self.bb.logit_scale.detach() * torch.einsum("bvd,bcd->bvc", view_feats, text)
            loss, selected = self._loss(logits, selected)
            (g,) = torch.autograd.grad(loss, c)
        return g, selected

    def _shared_first_grad(self, view_feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The first step's per-image gradients from ONE text forward (all contexts still equal the initial
        one): per-image cotangents of the class features, then batched vector-Jacobian products."""
        if self.cfg.checkpoint_text:
            return None
        scale = self.bb.logit_scale.detach()
        c = self.ctx0.detach().requires_grad_(True)
        with torch.enable_grad():
            text = self.text_features(c)  # [C, D]
            logits = (scale * torch.einsum("bvd,cd->bvc", view_feats, text.detach())).requires_grad_(True)
            loss, selected = self._loss(logits, None)
            (dlogits,) = torch.autograd.grad(loss, logits)
            cot = scale * torch.einsum("bvc,bvd->bcd", dlogits, view_feats)  # dH_b / d text, per image
            try:
                (g,) = torch.autograd.grad(text, c, grad_outputs=cot, is_grads_batched=True)
            except RuntimeError:  # an op without a batching rule: fall back to B x C rows from now on
                self._vjp_ok = False
                return None
        return g.unsqueeze(1), selected

    @torch.no_grad()
    def predict(self, view_feats: torch.Tensor, ctx: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, C] of the original images (view 0) under the tuned contexts (tuned if not given)."""
        f0 = view_feats[:, 0]
        scale = self.bb.logit_scale
        if not self.tunes:  # zero-shot: every context is the initial one
            return scale * f0 @ self.initial_text().T
        ctx = self.tune(view_feats) if ctx is None else ctx
        return scale * torch.einsum("bd,bcd->bc", f0, self.text_features(ctx))

    def classify(self, images: list[Image.Image], keys: list[int]) -> tuple[torch.Tensor, dict]:
        """Logits [B, C] of a batch of test images, with the seconds spent per stage."""
        t = [time.perf_counter()]
        views = self.views(images, keys)
        t.append(time.perf_counter())
        feats = self.encode_views(views)
        t.append(time.perf_counter())
        ctx = self.tune(feats) if self.tunes else None
        t.append(time.perf_counter())
        logits = self.predict(feats, ctx)
        t.append(time.perf_counter())
        stages = dict(zip(("views", "encode", "tune", "predict"), np.diff(t).tolist(), strict=True))
        return logits, stages


# ======================================================================================= a dataset run
def subset_indices(n: int, limit: int | None, subset_seed: int = 0) -> list[int]:
    """The test samples a run uses: all, or `limit` of them in a fixed random order (independent of the
    run's seed, so that seeds only change the views)."""
    if limit is None or limit >= n:
        return list(range(n))
    if limit < 1:
        raise GramvlError(f"--limit must be >= 1, not {limit}")
    return sorted(np.random.default_rng(subset_seed).permutation(n)[:limit].tolist())


def run_tta(tpt: TPT, ds, limit: int | None = None, progress: bool = True, subset_seed: int = 0) -> dict:
    """Tune-and-predict over a dataset; accuracy (a fraction), latency per sample and per-sample results."""
    return run_tta_many({"run": tpt}, ds, limit, progress, subset_seed)["run"]


def _view_recipe(tpt: TPT) -> tuple:
    c = tpt.cfg
    views = (c.n_views, c.augmix, tuple(c.crop_scale), c.seed) if tpt.tunes else ("plain",)
    return (*views, c.encode_precision)


def run_tta_many(tuners: dict[str, TPT], ds, limit: int | None = None, progress: bool = True,
                 subset_seed: int = 0) -> dict[str, dict]:
    """Several tuners over the same test samples. Tuners with the same view recipe (views, seed) share one
    computation of the views and their features; each one's latency counts that shared work in full."""
    from tqdm import tqdm

    from gramvl.data.base import load_image

    if not tuners:
        raise GramvlError("no test-time method to run")
    for t in tuners.values():
        if list(ds.classnames) != t.classnames:
            t.set_classnames(ds.classnames)
    idx = subset_indices(len(ds.samples), limit, subset_seed)
    if not idx:
        raise GramvlError(f"dataset {ds.name} ({ds.split}) has no samples")
    groups: dict[tuple, list[str]] = {}
    for name, t in tuners.items():
        groups.setdefault(_view_recipe(t), []).append(name)
    B = min(t.cfg.batch_images for t in tuners.values())
    stage_names = ("load", "views", "encode", "tune", "predict")
    out = {n: {"pred": [], "lat": [], "stages": dict.fromkeys(stage_names, 0.0)} for n in tuners}
    labels: list[int] = []
    t_all = time.perf_counter()
    bar = tqdm(total=len(idx), desc=f"tta {ds.name}", disable=not progress, leave=False, mininterval=2)
    for s in range(0, len(idx), B):
        keys = idx[s:s + B]
        t0 = time.perf_counter()
        images = [load_image(ds.samples[i][0]) for i in keys]
        t_load = time.perf_counter() - t0
        labels += [ds.samples[i][1] for i in keys]
        for names in groups.values():
            first = tuners[names[0]]
            t1 = time.perf_counter()
            views = first.views(images, keys)
            t2 = time.perf_counter()
            feats = first.encode_views(views)
            t3 = time.perf_counter()
            for name in names:
                t = tuners[name]
                t4 = time.perf_counter()
                ctx = t.tune(feats) if t.tunes else None
                t5 = time.perf_counter()
                logits = t.predict(feats, ctx)
                t6 = time.perf_counter()
                rec = out[name]
                rec["pred"] += logits.argmax(-1).cpu().tolist()
                for k, v in zip(rec["stages"], (t_load, t2 - t1, t3 - t2, t5 - t4, t6 - t5), strict=True):
                    rec["stages"][k] += v
                rec["lat"] += [1000.0 * (t_load + t3 - t1 + t6 - t4) / len(keys)] * len(keys)
        bar.update(len(keys))
    bar.close()
    seconds = round(time.perf_counter() - t_all, 3)
    n = len(idx)
    results = {}
    for name, rec in out.items():
        correct = [int(p == y) for p, y in zip(rec["pred"], labels, strict=True)]
        lat = rec["lat"]
        metrics = {"accuracy": float(np.mean(correct)), "n": n, "num_classes": len(ds.classnames),
                   "chance": 1.0 / len(ds.classnames), "latency_ms": float(np.mean(lat)),
                   "latency_ms_median": float(np.median(lat)),
                   "stage_ms": {k: 1000.0 * v / n for k, v in rec["stages"].items()}, "seconds": seconds}
        per_sample = {"index": idx, "label": labels, "pred": rec["pred"], "correct": correct,
                      "latency_ms": [round(x, 3) for x in lat]}
        t = tuners[name]
        results[name] = {"metrics": metrics, "per_sample": per_sample, "config": asdict(t.cfg),
                         "init": t.init.describe(), "regulated": t.psi is not None}
    return results
