"""How the embedding geometry sets the logit scale (session 14): the same checkpoints and batches as
scale_optimum.py, with the features' geometry beside s* (the loss's optimum scale), and two transformations of
the same features.

Columns: the image and the text embeddings' common direction (the norm of each modality's mean; 0 for features
spread evenly over the sphere, 1 for all alike: the "cone"), the distance between the two means (the modality
gap), the effective number of dimensions of each modality (participation ratio of the covariance's eigenvalues,
out of embed_dim), and the spread of each row's negative cosines.

- `centred`: each modality's mean (estimated on other batches, seed + 1) subtracted and the features
  re-normalised. This removes the cone; the cosines move apart and s* changes.
- `cone to 100`: one constant unit coordinate appended to every image and text embedding with weight b and the
  old coordinates scaled by a (a^2 + b^2 = 1, a^2 = s*/100). Every cosine becomes a^2 cos + b^2: an affine map, so
  every softmax of (scale x cosine) at scale s/a^2 equals the original one at s, for both loss directions. The
  loss curve is the original one stretched by 1/a^2, its minimum value the same, its s* 100. Such a model
  predicts exactly what the original predicts with a "learned" scale of 100.

Writes docs/results/{name}.{json,md}.
    python benchmarks/scale_geometry.py --models small small-v1 runs/s13_fit/pool1024_noaug/final.safetensors
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scale_optimum import SCALES, refine_minimum  # the same grid and minimum as scale_optimum.py

from gramvl.backbone import load_backbone
from gramvl.engine.results import markdown_table, versions
from gramvl.io import write_json, write_text
from gramvl.pretrain import Corpus, PretrainConfig, contrastive_loss

OUT = Path(__file__).resolve().parents[1] / "docs" / "results"


@torch.no_grad()
def encode(bb, corpus: Corpus, batches: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """L2-normalised image and text embeddings of `batches` training batches (augmented), and their positive masks."""
    imgs_all, txt_all, pos_all = [], [], []
    for b in range(batches):
        imgs, text, pos = corpus.batch(seed * 1_000_003 + b)
        imgs_all.append(F.normalize(bb.model.encode_image(imgs), dim=-1))
        txt_all.append(F.normalize(bb.model.encode_text(text), dim=-1))
        pos_all.append(pos)
    return torch.cat(imgs_all), torch.cat(txt_all), pos_all


def participation_ratio(x: torch.Tensor) -> float:
    """Effective number of dimensions: (sum of covariance eigenvalues)^2 / sum of their squares."""
    ev = torch.linalg.eigvalsh(torch.cov(x.double().T)).clamp(min=0)
    return float(ev.sum() ** 2 / (ev ** 2).sum())


def append_cone(x: torch.Tensor, a2: float) -> torch.Tensor:
    """[a x, b] with a^2 = a2, b^2 = 1 - a2: unit rows whose mutual cosines are a2 cos + (1 - a2)."""
    return torch.cat([math.sqrt(a2) * x, torch.full((len(x), 1), math.sqrt(1.0 - a2), dtype=x.dtype)], 1)


@torch.no_grad()
def measure(img: torch.Tensor, txt: torch.Tensor, pos: list[torch.Tensor], bs: int) -> dict:
    """s* (refined), the loss there, in-batch top-1, and the positive / negative cosines over the batches."""
    curve = np.zeros(len(SCALES))
    hits = rows = 0
    pos_c, neg_c, row_std = [], [], []
    for b, p in enumerate(pos):
        c = img[b * bs:(b + 1) * bs] @ txt[b * bs:(b + 1) * bs].T
        curve += [float(contrastive_loss(float(s) * c, p)) for s in SCALES]
        hits += int((p.gather(1, c.argmax(1, keepdim=True)) > 0).sum())
        rows += len(c)
        pos_c.append(c[p > 0])
        neg_c.append(c[p == 0])
        neg = c.masked_fill(p > 0, float("nan"))
        mu = torch.nanmean(neg, 1, keepdim=True)
        row_std.append(torch.sqrt(torch.nanmean((neg - mu) ** 2, 1)))
    curve /= len(pos)
    neg = torch.cat(neg_c)
    return {"s_star": refine_minimum(curve), "loss_at_s_star": float(curve.min()), "in_batch_top1": hits / rows,
            "pos_cos": float(torch.cat(pos_c).mean()), "neg_cos": float(neg.mean()), "neg_std": float(neg.std()),
            "row_neg_std": float(torch.cat(row_std).mean()), "curve": curve.tolist()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["small", "small-v1"])
    ap.add_argument("--batches", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=777, help="batch seed (the training runs used 0)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--name", default="scale_geometry")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    # the session-8 leg's batches, as scale_optimum.py: 40% icons, 15% photo-style images, shared captions positive
    cfg = PretrainConfig(batch_size=args.batch_size, icons=0.4, photo_aug=0.15, caption_positives=True)
    bb0 = load_backbone(args.models[0])
    corpus = Corpus(cfg, bb0.tokenizer, progress=False)
    results, rows = {}, []
    for model in args.models:
        bb = bb0 if model == args.models[0] else load_backbone(model)
        if bb.model.visual.image_size[0] != cfg.image_size:
            raise SystemExit(f"{model}: image size {bb.model.visual.image_size} is not the recipe's {cfg.image_size}")
        img, txt, pos = encode(bb, corpus, args.batches, args.seed)
        img_o, txt_o, _ = encode(bb, corpus, args.batches, args.seed + 1)  # the means of other batches
        mi, mt = img_o.mean(0), txt_o.mean(0)
        geo = {"embed_dim": img.shape[1], "image_mean_norm": float(img.mean(0).norm()),
               "text_mean_norm": float(txt.mean(0).norm()), "modality_gap": float((img.mean(0) - txt.mean(0)).norm()),
               "image_dims": participation_ratio(img), "text_dims": participation_ratio(txt)}
        raw = measure(img, txt, pos, args.batch_size)
        centred = measure(F.normalize(img - mi, dim=-1), F.normalize(txt - mt, dim=-1), pos, args.batch_size)
        a2 = min(1.0, raw["s_star"] / 100.0)
        cone = measure(append_cone(img, a2), append_cone(txt, a2), pos, args.batch_size)
        r = {"ident": bb.ident, "logit_scale": float(bb.logit_scale), **geo, "raw": raw, "centred": centred,
             "cone_to_100": {"a2": a2, **cone}}
        results[model] = r
        for kind, m in (("as trained", raw), ("centred", centred), (f"cone to 100 (a² = {a2:.3f})", cone)):
            rows.append([f"`{model}`", f"{r['logit_scale']:.1f}", kind,
                         f"{geo['image_mean_norm']:.2f} / {geo['text_mean_norm']:.2f}" if m is raw else "",
                         f"{geo['modality_gap']:.2f}" if m is raw else "",
                         f"{geo['image_dims']:.1f} / {geo['text_dims']:.1f} of {geo['embed_dim']}" if m is raw else "",
                         f"{m['pos_cos']:.3f}", f"{m['neg_cos']:.3f} ± {m['neg_std']:.3f}", f"{m['row_neg_std']:.3f}",
                         f"{m['s_star']:.1f}", f"{m['loss_at_s_star']:.3f}", f"{100 * m['in_batch_top1']:.1f}"])
            print(rows[-1], flush=True)
    cmd = (f"python benchmarks/scale_geometry.py --models {' '.join(args.models)} --batches {args.batches} "
           f"--seed {args.seed}" + (f" --name {args.name}" if args.name != "scale_geometry" else ""))
    record = {"command": cmd, "batch_size": args.batch_size, "batches": args.batches, "seed": args.seed,
              "scales": SCALES.tolist(), "results": results, "versions": versions(), "seconds": time.time() - t0}
    out = Path(args.out)
    write_json(out / f"{args.name}.json", record)
    md = ["# How the embedding geometry sets the logit scale\n\n",
          f"Frozen features of each checkpoint on {args.batches} fresh pre-training batches of {args.batch_size} pairs "
          f"(the session-8 mix and augmentation, batch seed {args.seed}; as `scale_optimum.py`). s*: the scale that "
          "minimises the pre-training loss of these features (refined between grid points), where a learned scale "
          "is pulled. Cone: the norm of the mean image / text embedding (0: spread over the whole sphere; 1: all "
          "alike). Gap: the distance between the two means. Dimensions: participation ratio of each modality's "
          "covariance eigenvalues. Row spread: the standard deviation of one row's negative cosines, averaged over "
          "rows.\n\n"
          "Rows per model: the features as trained; `centred` (each modality's mean, estimated on other batches, "
          "subtracted, the features re-normalised: no cone); `cone to 100` (a constant unit coordinate appended to "
          "every embedding with weight b and the old ones scaled by a, a² + b² = 1, a² = s*/100: every cosine becomes "
          "a² cos + b², an affine map, so the softmax at scale s/a² equals the original at s and every prediction "
          "is unchanged).\n\n",
          markdown_table(["model", "learned scale", "features", "cone (image / text)", "gap", "dimensions (image / text)",
                          "positive cosine", "negative cosine", "row spread of negatives", "s*", "loss at s*",
                          "in-batch top-1 %"], rows),
          f"\nCommand: `{cmd}`; wall time {time.time() - t0:.0f} s on {args.threads} CPU thread(s); gramvl commit "
          f"{record['versions']['git_commit']}.\n"]
    write_text(out / f"{args.name}.md", "".join(md))


if __name__ == "__main__":
    main()
