"""Contrastive pre-training of our small CLIP on the embedded world's pre-training corpus.

Everything runs from an in-memory uint8 image tensor with batched torch augmentations (affine, background
recolouring, greyscale, edge maps / line art, inversion, blur, noise) so that 2 CPU cores suffice and the
model meets styles it never saw (colour, line art, grey photos, dark-on-light and light-on-dark).
Deterministic per seed; resumable from `OUT/last.safetensors`; the best checkpoint is chosen on held-out
OpenMoji *val* splits (a style the corpus never contains), never on test sets.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from gramvl.backbone import OPENAI_MEAN, OPENAI_STD, Backbone, _load_into, build_small_clip, small_tokenizer
from gramvl.data.world.sources import sha256_file
from gramvl.errors import GramvlError
from gramvl.io import load_tensors, save_tensors, write_json

CAPTION_TEMPLATES = (
    "{}", "a {}.", "a photo of a {}.", "an emoji of a {}.", "a drawing of a {}.", "an icon of a {}.",
    "a picture of the {}.", "a sketch of a {}.", "a black and white photo of a {}.", "a small {}.",
    "a cartoon {}.", "a photo of the {}.",
)


@dataclass
class PretrainConfig:
    """Architecture and recipe of the small CLIP (an open_clip CLIP config plus the training recipe)."""

    image_size: int = 32
    patch_size: int = 4
    vision_width: int = 128
    vision_layers: int = 6
    vision_head_width: int = 32
    text_width: int = 128
    text_layers: int = 4
    text_heads: int = 4
    context_length: int = 32
    embed_dim: int = 128
    steps: int = 3000
    batch_size: int = 256
    lr: float = 1e-3
    logit_scale_lr: float = 1e-2
    weight_decay: float = 0.1
    warmup: int = 150
    # options tried in session 3 (docs/pretraining.md); off by default = the packaged model's recipe
    ema: float = 0.0  # decay of a weight average that is evaluated and exported (0 = raw weights)
    caption_positives: bool = False  # a caption shared by several emoji is a positive for all of them
    # session 7 (docs/pretraining.md): the optional icon corpus and continuing from a checkpoint
    icons: float = 0.0  # share of each batch drawn from the icon corpus (0 = emoji only)
    photo_aug: float = 0.0  # share of images drawn as grey objects on a dark background (augment's `photo`)
    val_limit: int = 600  # at most this many val images per set for checkpoint choice
    init: str = ""  # a small-CLIP .safetensors to start from (its architecture must match)
    # session 9: start the learned logit scale here (0 = keep the model's: CLIP's 1/0.07, or --init's)
    logit_scale_init: float = 0.0
    # session 13, a diagnostic of the logit scale (docs/pretraining.md): train on a fixed random subset of this many
    # pairs (0 = the whole corpus), and with augment=False on the images only resized (no style or geometry
    # augmentation), so that the model can fit (memorise) its training batches
    pool: int = 0
    augment: bool = True
    eval_every: int = 250
    seed: int = 0
    threads: int = 2
    store_size: int = 40
    mean: tuple = OPENAI_MEAN
    std: tuple = OPENAI_STD
    val_sets: list[str] = field(default_factory=list)

    def model_cfg(self) -> dict:
        return {
            "embed_dim": self.embed_dim,
            "vision_cfg": {"image_size": self.image_size, "patch_size": self.patch_size,
                           "width": self.vision_width, "layers": self.vision_layers,
                           "head_width": self.vision_head_width, "mlp_ratio": 4.0},
            "text_cfg": {"context_length": self.context_length, "vocab_size": 49408, "width": self.text_width,
                         "heads": self.text_heads, "layers": self.text_layers},
        }


# ----------------------------------------------------------------------------------------- data
def caption_variants(pair: dict) -> list[str]:
    """All captions of one corpus pair: names and short names in templates, plus keyword captions."""
    names = [pair.get("cldr_name") or pair["name"], pair["name"]]
    names = [n.lower() for n in names] + [s.replace("_", " ").lower() for s in pair.get("short_names", [])]
    names = list(dict.fromkeys(n.strip() for n in names if n and n.strip()))
    kws = [k.lower() for k in pair.get("keywords", []) if k]
    caps = [t.format(n) for n in names for t in CAPTION_TEMPLATES]
    if kws:
        caps.append(f"{names[0]}, " + ", ".join(kws[:4]))
        caps.extend(f"a {k}." for k in kws[:6])
        caps.append(" ".join(kws[:3]))
    return caps


def load_corpus_images(pairs: list[dict], size: int) -> torch.Tensor:
    """uint8 [N, 3, size, size] images (antialiased resize of the corpus PNGs)."""
    from PIL import Image

    out = np.zeros((len(pairs), size, size, 3), dtype=np.uint8)
    for i, p in enumerate(tqdm(pairs, desc="load corpus", leave=False, mininterval=2)):
        with Image.open(p["image"]) as im:
            out[i] = np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC))
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def augment(x: torch.Tensor, out_size: int, g: torch.Generator, photo: float = 0.0) -> torch.Tensor:
    """Batched style and geometry augmentation of uint8 images -> float images in [0, 1].

    `photo`: share of images drawn as grey objects on a dark background, their own tones kept (a product
    photo on black; a dark drawing is inverted first so that it stays visible). 0 = the packaged model's
    recipe, which reached light-on-dark only by inverting whole images."""
    B = x.shape[0]
    x = x.float() / 255.0

    def r(*shape):
        return torch.rand(*shape, generator=g)

    # geometry: zoom, rotation, translation, flip; outside the artwork stays white
    scale = 0.75 + 0.5 * r(B)
    ang = (r(B) - 0.5) * math.radians(40)
    flip = torch.where(r(B) < 0.5, -1.0, 1.0)
    tx, ty = (r(B) - 0.5) * 0.3, (r(B) - 0.5) * 0.3
    cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
    theta = torch.stack([torch.stack([cos * flip, -sin, tx], 1), torch.stack([sin * flip, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, (B, 3, out_size, out_size), align_corners=False)
    x = 1.0 - F.grid_sample(1.0 - x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    bg = (x.min(1, keepdim=True).values > 0.93).float()

    def pick(p):
        return (r(B) < p).view(B, 1, 1, 1).float()

    grey = x.mul(torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    # line art: edge magnitude of the grey image, dark lines on white
    kx = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]]).view(1, 1, 3, 3)
    ex = F.conv2d(grey, kx, padding=1)
    ey = F.conv2d(grey, kx.transpose(2, 3), padding=1)
    edge = (ex.pow(2) + ey.pow(2)).sqrt()
    thick = pick(0.5)
    edge = thick * F.max_pool2d(edge, 3, 1, 1) + (1 - thick) * edge
    lines = (1.0 - (edge * (2.0 + 4.0 * r(B).view(B, 1, 1, 1))).clamp(0, 1)).expand(B, 3, -1, -1)
    m_line = pick(0.2)
    x = m_line * lines + (1 - m_line) * x
    # silhouettes (filled shapes), a rarer style
    m_sil = pick(0.05) * (1 - m_line)
    x = m_sil * (bg.expand(B, 3, -1, -1)) + (1 - m_sil) * x
    # background recolouring (solid or gradient) for the non-line-art images
    m_bg = pick(0.4) * (1 - m_line)
    c1, c2 = r(B, 3, 1, 1), r(B, 3, 1, 1)
    ramp = torch.linspace(0, 1, out_size).view(1, 1, 1, out_size)
    ramp = torch.where(r(B).view(B, 1, 1, 1) < 0.5, ramp, ramp.transpose(2, 3))
    grad_bg = c1 + (c2 - c1) * ramp * pick(0.5)
    x = x * (1 - m_bg * bg) + grad_bg * m_bg * bg
    # greyscale and colour jitter
    gx = x.mul(torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True).expand(B, 3, -1, -1)
    m_grey = pick(0.3)
    x = m_grey * gx + (1 - m_grey) * x
    bright = 0.75 + 0.5 * r(B, 1, 1, 1)
    contrast = 0.6 + 0.8 * r(B, 1, 1, 1)
    mean = x.mean((1, 2, 3), keepdim=True)
    x = ((x - mean) * contrast + mean) * bright
    # low resolution / blur (grey photos are 28 px)
    m_low = pick(0.25)
    low = F.interpolate(F.interpolate(x, size=out_size // 2, mode="bilinear", antialias=True,
                                      align_corners=False), size=out_size, mode="bilinear", align_corners=False)
    x = m_low * low + (1 - m_low) * x
    # inversion: light-on-dark
    m_inv = pick(0.3)
    x = m_inv * (1 - x) + (1 - m_inv) * x
    if photo > 0:  # grey object on a near-black background, soft (no crisp outlines)
        m_ph = pick(photo) * (1 - m_line)
        obj = 1.0 - bg
        lum = gx[:, :1]
        dark_obj = ((lum * obj).sum((2, 3), keepdim=True) / obj.sum((2, 3), keepdim=True).clamp(min=1)) < 0.4
        lum = torch.where(dark_obj, 1.0 - lum, lum)
        lum = F.avg_pool2d(lum, 3, 1, 1) * 0.5 + lum * 0.5
        ph = (lum * obj + 0.12 * r(B, 1, 1, 1) * bg).expand(B, 3, -1, -1)
        x = m_ph * ph + (1 - m_ph) * x
    x = x + 0.03 * r(B, 1, 1, 1) * torch.randn(x.shape, generator=g)
    return x.clamp(0, 1)


def caption_positive_table(caps: list[str], owner: list[int], concept_of_pair: list[int]):
    """Distinct caption ids per caption row, and for each distinct caption the concepts it describes.

    Returns (caption_id [n_captions], members: list of LongTensor of concept ids per distinct caption).
    Keyword captions such as "a flag." belong to hundreds of emoji; counting them as negatives for all but one
    emoji is label noise that keeps the contrastive loss (and the learned logit scale) low.
    """
    index: dict[str, int] = {}
    members: list[set[int]] = []
    cap_id = []
    for c, o in zip(caps, owner, strict=True):
        k = index.setdefault(c, len(index))
        if k == len(members):
            members.append(set())
        members[k].add(concept_of_pair[o])
        cap_id.append(k)
    return torch.tensor(cap_id), [torch.tensor(sorted(m)) for m in members]


def positive_matrix(concepts: torch.Tensor, cap_ids: torch.Tensor | None,
                    members: list[torch.Tensor] | None) -> torch.Tensor:
    """pos[i, j] = 1 when text j describes image i: the same concept, or a caption that concept i also has."""
    pos = concepts[:, None] == concepts[None, :]
    if members is not None:
        for j, k in enumerate(cap_ids.tolist()):
            if len(members[k]) > 1:
                pos[:, j] |= torch.isin(concepts, members[k])
    return pos.float()


def contrastive_loss(logits: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Symmetric multi-positive InfoNCE: each row's target spreads evenly over its positives."""
    return 0.5 * (torch.sum(-(pos / pos.sum(1, keepdim=True)) * F.log_softmax(logits, 1), 1).mean()
                  + torch.sum(-(pos.T / pos.T.sum(1, keepdim=True)) * F.log_softmax(logits.T, 1), 1).mean())


class Corpus:
    """The pre-training pairs in memory (images at `store_size`, every caption variant tokenized) and the
    batches drawn from them: `batch(seed)` is a pure function of the seed, so a resumed run and an
    evaluation of the training loss (benchmarks/scale_optimum.py) see exactly the training batches."""

    def __init__(self, cfg: PretrainConfig, tok, progress: bool = True):
        from gramvl.data.world import load_pretrain_pairs

        pairs = load_pretrain_pairs()
        if not pairs:
            raise GramvlError("the pre-training corpus is empty; run `gramvl world build`")
        if not 0.0 <= cfg.icons < 1.0:
            raise GramvlError(f"--icons is the share of each batch drawn from the icon corpus: 0 <= share < 1, "
                              f"got {cfg.icons}")
        self.cfg, self.n_emoji = cfg, len(pairs)
        if cfg.icons > 0:
            from gramvl.data.world import build_icon_part, load_icon_pairs

            build_icon_part(progress=progress)
            pairs = pairs + load_icon_pairs()
        self.n_pairs = len(pairs)
        self.pairs = pairs  # the corpus rows' metadata, in the order batch_index names them
        self.images = load_corpus_images(pairs, cfg.store_size)
        caps, owner = [], []
        for i, p in enumerate(pairs):
            for c in caption_variants(p):
                caps.append(c)
                owner.append(i)
        self.cap_tokens = tok(caps)
        self.starts = torch.zeros(len(pairs) + 1, dtype=torch.long)
        self.starts[1:] = torch.bincount(torch.tensor(owner), minlength=len(pairs)).cumsum(0)
        concept: dict = {}
        self.concept_id = torch.tensor([concept.setdefault(p.get("hexcode") or p.get("concept") or p["name"],
                                                           len(concept)) for p in pairs])
        self.cap_str_id, self.cap_members = (caption_positive_table(caps, owner, self.concept_id.tolist())
                                             if cfg.caption_positives else (None, None))
        self.pool = draw_pool(cfg, self.n_emoji, self.n_pairs - self.n_emoji) if cfg.pool else None

    def _draw(self, g: torch.Generator) -> torch.Tensor:
        if self.pool is not None:  # batch_size distinct rows of the fixed pool
            return self.pool[torch.randperm(len(self.pool), generator=g)[:self.cfg.batch_size]]
        return sample_pairs(g, self.cfg.batch_size, self.n_emoji, self.n_pairs - self.n_emoji, self.cfg.icons)

    def batch_index(self, seed: int) -> torch.Tensor:
        """The corpus rows (pair indices; emoji pairs first, then icons) of `batch(seed)`, in its order."""
        return self._draw(torch.Generator().manual_seed(seed))

    def batch(self, seed: int, augmented: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(normalized augmented images, caption tokens, positive matrix) of one batch.

        `augmented=False`: the same pairs and captions, the images only resized to the model's input (what the
        style and geometry augmentation adds to the task; benchmarks/scale_optimum.py --images unaugmented)."""
        cfg = self.cfg
        g = torch.Generator().manual_seed(seed)
        idx = self._draw(g)
        lo, hi = self.starts[idx], self.starts[idx + 1]
        cap_idx = lo + (torch.rand(cfg.batch_size, generator=g) * (hi - lo)).long()
        if augmented:
            x = augment(self.images[idx], cfg.image_size, g, cfg.photo_aug)
        else:
            x = F.interpolate(self.images[idx].float() / 255.0, size=cfg.image_size, mode="bilinear",
                              antialias=True, align_corners=False).clamp(0, 1)
        imgs = normalize_images(x, cfg.mean, cfg.std)
        pos = positive_matrix(self.concept_id[idx], None if self.cap_str_id is None else self.cap_str_id[cap_idx],
                              self.cap_members)
        return imgs, self.cap_tokens[cap_idx], pos


def normalize_images(x: torch.Tensor, mean, std) -> torch.Tensor:
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


# ----------------------------------------------------------------------------------------- eval
@torch.no_grad()
def zeroshot_on_val(bb: Backbone, sets: dict[str, tuple[torch.Tensor, torch.Tensor, list[str]]]) -> dict:
    """Zero-shot accuracy ('a photo of a {}.') on preloaded float image sets."""
    out = {}
    for name, (imgs, labels, classes) in sets.items():
        tf = bb.encode_texts([f"a photo of a {c}." for c in classes])
        correct = 0
        for s in range(0, len(imgs), 512):
            f = bb.encode_image(imgs[s:s + 512])
            correct += (f @ tf.T).argmax(1).eq(labels[s:s + 512]).sum().item()
        out[name] = correct / len(imgs)
    return out


def load_val_sets(names: list[str], size: int, mean, std, limit: int = 600) -> dict:
    from gramvl.data.world import load_embedded

    sets = {}
    for n in names:
        ds = load_embedded(n, "val")
        idx = np.random.default_rng(0).permutation(len(ds))[:limit]
        pairs = [{"image": ds.samples[i][0]} for i in idx]
        imgs = load_corpus_images(pairs, size).float() / 255.0
        sets[n] = (normalize_images(imgs, mean, std), torch.tensor([ds.samples[i][1] for i in idx]),
                   ds.classnames)
    return sets


def val_score(acc: dict) -> float:
    """Mean over style groups (colour, line art, photos) of the groups' mean accuracy: every style counts."""
    groups: dict[str, list[float]] = {}
    for k, v in acc.items():
        g = "lineart" if k.endswith("-lineart") else ("photo" if "mnist" in k else "colour")
        groups.setdefault(g, []).append(v)
    return float(np.mean([np.mean(v) for v in groups.values()]))


# ----------------------------------------------------------------------------------------- train
def sample_pairs(g: torch.Generator, batch: int, n_emoji: int, n_icons: int, icon_share: float) -> torch.Tensor:
    """Indices of one batch: emoji pairs are 0..n_emoji-1, icon pairs follow; each row is an icon with
    probability `icon_share` (the corpora differ 1:3 in size, so uniform sampling would let icons dominate)."""
    idx = torch.randint(0, n_emoji, (batch,), generator=g)
    if icon_share > 0 and n_icons > 0:
        is_icon = torch.rand(batch, generator=g) < icon_share
        idx = torch.where(is_icon, n_emoji + torch.randint(0, n_icons, (batch,), generator=g), idx)
    return idx


def draw_pool(cfg: PretrainConfig, n_emoji: int, n_icons: int) -> torch.Tensor:
    """The fixed subset of `cfg.pool` distinct corpus rows that `--pool` trains on: drawn like the batches (the
    same icon share), from a generator of its own seeded by cfg.seed, so a resumed run gets the same pool."""
    if cfg.pool < cfg.batch_size:
        raise GramvlError(f"--pool {cfg.pool}: the pool must hold at least one batch ({cfg.batch_size} pairs)")
    if cfg.pool > n_emoji + n_icons:
        raise GramvlError(f"--pool {cfg.pool}: the corpus has only {n_emoji + n_icons} pairs")
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 424_242)
    rows: dict[int, None] = {}
    while len(rows) < cfg.pool:  # distinct rows in order of first draw
        rows.update(dict.fromkeys(sample_pairs(g, 4 * cfg.pool, n_emoji, n_icons, cfg.icons).tolist()))
    return torch.tensor(list(rows)[:cfg.pool])


def load_init(net: torch.nn.Module, path: str | Path, model_cfg: dict) -> tuple[str, dict]:
    """Load the weights of a small-CLIP checkpoint into `net` (a continued run); return the model's id and its
    sidecar."""
    path = Path(path)
    if not path.is_file():
        raise GramvlError(f"--init checkpoint {path} does not exist")
    tensors, meta = load_tensors(path)
    if not meta or meta.get("model_cfg") != model_cfg:
        raise GramvlError(f"--init checkpoint {path} has another architecture than this run "
                          f"({(meta or {}).get('model_cfg')} vs {model_cfg})")
    _load_into(net, {k[6:] if k.startswith("model.") else k: v.float() for k, v in tensors.items()},
               f"--init checkpoint {path}")

    return f"{path.name}:{sha256_file(path)[:12]}", meta


def repeated_batches(cfg: PretrainConfig, init_meta: dict | None) -> str | None:
    """A warning when a continued run would re-draw its --init checkpoint's own batches: the batch of step t depends
    only on the seed (and the corpus mix and batch size), so a leg with its parent's seed starts on the very pairs and
    augmentation draws its parent trained on first (session 18 measured what that does to the logit scale)."""
    parent = (init_meta or {}).get("pretrain") or {}
    pc, done = parent.get("config") or {}, (parent.get("state") or {}).get("step", 0)
    keys = ("seed", "batch_size", "icons", "photo_aug", "pool", "augment")
    if not done or any(pc.get(k) != getattr(cfg, k) for k in keys):
        return None
    return (f"--init {cfg.init} was trained with the same batch stream (--seed {cfg.seed}): this run's first "
            f"{min(done, cfg.steps)} steps re-draw the batches it trained on (the same pairs and augmentation). "
            "Pass another --seed for fresh batches (docs/pretraining.md, session 18).")


def _sidecar(cfg: PretrainConfig, extra: dict) -> dict:
    return {"format": "gramvl-small-clip", "model_cfg": cfg.model_cfg(), "mean": list(cfg.mean),
            "std": list(cfg.std), "pretrain": {"config": asdict(cfg), **extra}}


def pretrain(cfg: PretrainConfig, out_dir: str | Path, progress: bool = True) -> Path:
    """Train the small CLIP; writes OUT/best.safetensors (the val-best step) and OUT/final.safetensors (the last
    step), each with its .json sidecar, and resumes from OUT/last.* if present."""
    if cfg.logit_scale_init and not 0.0 < cfg.logit_scale_init <= 100.0:
        raise GramvlError(f"--logit-scale-init must be in (0, 100] (CLIP clamps at 100), got {cfg.logit_scale_init}")
    if cfg.logit_scale_lr < 0:
        raise GramvlError(f"--logit-scale-lr must be >= 0 (0 holds the scale), got {cfg.logit_scale_lr}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    config = _sidecar(cfg, {})
    torch.manual_seed(cfg.seed)
    net = build_small_clip(config)
    tok = small_tokenizer(config)
    bb = Backbone(net, tok, "gramvl-small:training", cfg.mean, cfg.std)
    for p in net.parameters():
        p.requires_grad_(True)
    net.train()
    corpus = Corpus(cfg, tok, progress)
    ema = {k: v.detach().clone() for k, v in net.named_parameters()} if cfg.ema > 0 else None

    val_names = cfg.val_sets
    val = load_val_sets(val_names, cfg.image_size, cfg.mean, cfg.std, cfg.val_limit) if val_names else {}

    scale_params = [net.logit_scale]
    decay = [p for n, p in net.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in net.named_parameters()
                if (p.ndim < 2 or "embedding" in n) and n != "logit_scale"]
    opt = torch.optim.AdamW([
        {"params": decay, "weight_decay": cfg.weight_decay, "lr": cfg.lr},
        {"params": no_decay, "weight_decay": 0.0, "lr": cfg.lr},
        {"params": scale_params, "weight_decay": 0.0, "lr": cfg.logit_scale_lr},
    ], betas=(0.9, 0.98), eps=1e-6)
    base_lrs = [gr["lr"] for gr in opt.param_groups]

    state = {"step": 0, "best_score": -1e9, "best_step": -1, "history": [], "seconds": 0.0}
    if cfg.init:
        state["init"], init_meta = load_init(net, cfg.init, config["model_cfg"])
        repeat = repeated_batches(cfg, init_meta)
        if repeat:
            warnings.warn(repeat, stacklevel=2)
    if cfg.logit_scale_init:
        with torch.no_grad():
            net.logit_scale.fill_(math.log(cfg.logit_scale_init))
    last = out / "last.safetensors"
    if last.is_file():
        tensors, meta = load_tensors(last)
        if meta and meta.get("model_cfg") == config["model_cfg"]:
            net.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=False)
            opt_state = opt.state_dict()
            params = [p for gr in opt.param_groups for p in gr["params"]]
            for i, _ in enumerate(params):
                if f"opt.{i}.exp_avg" in tensors:
                    opt_state["state"][i] = {"step": tensors[f"opt.{i}.step"],
                                             "exp_avg": tensors[f"opt.{i}.exp_avg"],
                                             "exp_avg_sq": tensors[f"opt.{i}.exp_avg_sq"]}
            opt.load_state_dict(opt_state)
            if ema is not None:
                for k in ema:
                    if f"ema.{k}" in tensors:
                        ema[k].copy_(tensors[f"ema.{k}"])
            state = meta["pretrain"]["state"]
            print(f"resuming from step {state['step']}")

    def save(path: Path, with_opt: bool, extra: dict) -> None:
        tensors = {f"model.{k}": v for k, v in net.state_dict().items() if not k.endswith("attn_mask")}
        if with_opt:
            params = [p for gr in opt.param_groups for p in gr["params"]]
            for i, _ in enumerate(params):
                st = opt.state.get(params[i])
                if st:
                    tensors[f"opt.{i}.step"] = st["step"].reshape(1) if st["step"].dim() == 0 else st["step"]
                    tensors[f"opt.{i}.exp_avg"] = st["exp_avg"]
                    tensors[f"opt.{i}.exp_avg_sq"] = st["exp_avg_sq"]
            if ema is not None:
                tensors.update({f"ema.{k}": v for k, v in ema.items()})
        save_tensors(path, tensors, _sidecar(cfg, extra))

    class _Swapped:
        """Evaluate and export the weight average: swap it in, swap the live weights back afterwards."""

        def __enter__(self):
            if ema is not None:
                self.live = {k: v.detach().clone() for k, v in net.state_dict().items() if k in ema}
                net.load_state_dict(ema, strict=False)

        def __exit__(self, *exc):
            if ema is not None:
                net.load_state_dict(self.live, strict=False)

    def export(name: str) -> None:
        """A loadable small CLIP (fp16, like the packaged one): best.safetensors (the val-best step) or
        final.safetensors (the last step; what a diagnostic of the training itself reads); with --ema, the
        weight average at that step."""
        tensors = {k: v.half() for k, v in net.state_dict().items() if not k.endswith("attn_mask")}
        extra = {"state": state, "val": state["history"][-1] if state["history"] else {}}
        save_tensors(out / name, tensors, _sidecar(cfg, extra))

    bar = tqdm(total=cfg.steps, initial=state["step"], desc="pretrain", disable=not progress, mininterval=5)
    t0 = time.time() - state["seconds"]
    while state["step"] < cfg.steps:
        step = state["step"]
        imgs, text, pos = corpus.batch(cfg.seed * 1_000_003 + step, augmented=cfg.augment)
        lr_mult = min(1.0, (step + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        for gr, lr0 in zip(opt.param_groups, base_lrs, strict=True):
            gr["lr"] = lr0 * lr_mult
        fi = F.normalize(net.encode_image(imgs), dim=-1)
        ft = F.normalize(net.encode_text(text), dim=-1)
        # no clamp in the forward pass: exp(log 100) rounds to 100.0000076 in float32, and clamp(max=100) would
        # then cut the scale's gradient, freezing it at the ceiling; the in-place clamp below bounds it instead
        logits = net.logit_scale.exp() * fi @ ft.T
        loss = contrastive_loss(logits, pos)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            net.logit_scale.clamp_(0, math.log(100))
            if ema is not None:
                d = min(cfg.ema, (1 + step) / (10 + step))
                for k, v in net.named_parameters():
                    ema[k].lerp_(v.detach(), 1 - d)
        state["step"] = step + 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", scale=f"{net.logit_scale.exp().item():.1f}")
        if state["step"] % cfg.eval_every == 0 or state["step"] == cfg.steps:
            net.eval()
            with _Swapped():
                acc = zeroshot_on_val(bb, val) if val else {}
                scale_now = net.logit_scale.exp().item()
            net.train()
            score = val_score(acc) if acc else -float(loss.item())
            state["seconds"] = time.time() - t0
            # in-batch top-1 of this step's batch (before the step): how well the model fits its training batches
            top1 = float((pos.gather(1, logits.detach().argmax(1, keepdim=True)) > 0).float().mean())
            rec = {"step": state["step"], "loss": float(loss.item()), "score": score, "batch_top1": top1,
                   "logit_scale": scale_now, "val": acc, "seconds": state["seconds"]}
            state["history"].append(rec)
            tqdm.write(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rec.items()
                                   if k != "val"}) + " " + " ".join(f"{k}={v:.3f}" for k, v in acc.items()))
            if score > state["best_score"]:
                state["best_score"], state["best_step"] = score, state["step"]
                with _Swapped():
                    export("best.safetensors")
            save(last, True, {"state": state})
    bar.close()
    with _Swapped():
        export("final.safetensors")
    write_json(out / "history.json", state["history"])
    return out / "best.safetensors"
