"""Where the training loss wants the logit scale: for each small-CLIP checkpoint, the contrastive loss of
its frozen features on fresh pre-training batches (the session-8 recipe's corpus mix and augmentation) as a
function of the logit scale s, and the s* that minimizes it.

For fixed features the loss is convex in s, so s* is the value the learned scale moves toward. s* above
100 means training pushes the scale against CLIP's clamp of 100 (where real CLIP sits). The batches are
drawn with seeds the training runs never used.

Writes docs/results/scale_optimum.{json,md}.
    python benchmarks/scale_optimum.py --models small small-v2 small-v1 runs/x/best.safetensors
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gramvl.backbone import load_backbone
from gramvl.engine.results import markdown_table, versions
from gramvl.io import write_json, write_text
from gramvl.pretrain import Corpus, PretrainConfig, contrastive_loss

OUT = Path(__file__).resolve().parents[1] / "docs" / "results"
SCALES = np.exp(np.linspace(math.log(5.0), math.log(1000.0), 107))  # 5 .. 1000, log-spaced


@torch.no_grad()
def losses_by_scale(bb, corpus: Corpus, batches: int, seed: int) -> np.ndarray:
    """Mean loss over `batches` batches for every grid scale: [len(SCALES)]."""
    net = bb.model
    total = np.zeros(len(SCALES))
    for b in range(batches):
        imgs, text, pos = corpus.batch(seed * 1_000_003 + b)
        cos = F.normalize(net.encode_image(imgs), dim=-1) @ F.normalize(net.encode_text(text), dim=-1).T
        total += [float(contrastive_loss(float(s) * cos, pos)) for s in SCALES]
    return total / batches


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["small", "small-v2", "small-v1"])
    ap.add_argument("--batches", type=int, default=16)
    ap.add_argument("--seed", type=int, default=777, help="batch seed (the training runs used 0)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--name", default="scale_optimum")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    # the session-8 leg's batches: 128 pairs, 40% icons, 15% photo-style images, shared captions as positives
    cfg = PretrainConfig(batch_size=128, icons=0.4, photo_aug=0.15, caption_positives=True)
    bb0 = load_backbone(args.models[0])
    corpus = Corpus(cfg, bb0.tokenizer, progress=False)
    results, rows = {}, []
    for model in args.models:
        bb = bb0 if model == args.models[0] else load_backbone(model)
        if bb.model.visual.image_size[0] != cfg.image_size:
            raise SystemExit(f"{model}: image size {bb.model.visual.image_size} is not the recipe's {cfg.image_size}")
        scale = float(bb.logit_scale)
        curve = losses_by_scale(bb, corpus, args.batches, args.seed)
        i = int(np.argmin(curve))
        at = {s: float(np.interp(math.log(s), np.log(SCALES), curve)) for s in (scale, 100.0)}
        r = {"ident": bb.ident, "logit_scale": scale, "best_scale": float(SCALES[i]), "loss_at_best": float(curve[i]),
             "loss_at_model_scale": at[scale], "loss_at_100": at[100.0],
             "best_at_grid_edge": i in (0, len(SCALES) - 1), "curve": curve.tolist()}
        results[model] = r
        rows.append([f"`{model}`", r["ident"], f"{scale:.1f}", f"{r['best_scale']:.1f}" + (" (grid edge)" if r["best_at_grid_edge"] else ""),
                     f"{r['loss_at_model_scale']:.3f}", f"{r['loss_at_100']:.3f}", f"{r['loss_at_best']:.3f}"])
        print(rows[-1], flush=True)
    record = {"models": args.models, "batches": args.batches, "seed": args.seed, "scales": SCALES.tolist(),
              "results": results, "versions": versions(), "seconds": time.time() - t0,
              "command": f"python benchmarks/scale_optimum.py --batches {args.batches} --seed {args.seed} --models "
                         + " ".join(args.models)}
    out = Path(args.out)
    write_json(out / f"{args.name}.json", record)
    md = ["# Where the training loss wants the logit scale\n\n",
          f"Contrastive loss (symmetric, multi-positive; the pre-training loss) of each checkpoint's frozen features "
          f"on {args.batches} fresh pre-training batches of 128 pairs (40% icons, 15% photo-style images, shared "
          f"captions as positives; batch seed {args.seed}, not a training seed), as a function of the logit scale s "
          f"(grid of {len(SCALES)} log-spaced values in 5..1000). For fixed features the loss is convex in s, so s* "
          "is where the learned scale is pulled. CLIP clamps the scale at 100; s* > 100 means training holds it "
          "there.\n\n",
          markdown_table(["model", "ident", "learned scale", "s* (loss minimum)", "loss at learned scale",
                          "loss at 100", "loss at s*"], rows),
          f"\nCommand: `{record['command']}`; wall time {time.time() - t0:.0f} s on {args.threads} CPU thread(s); "
          f"gramvl commit {record['versions']['git_commit']}.\n"]
    write_text(out / f"{args.name}.md", "".join(md))


if __name__ == "__main__":
    main()
