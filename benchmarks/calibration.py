"""Where prompt tuning starts: the zero-shot loss of each packaged small CLIP against the uniform guess.

For every embedded test set and model: accuracy, the cross-entropy of the model's own scaled logits
(logit_scale * cosine; what a prompt-tuning run starts from), log C (the uniform guess), and the scale s*
that minimizes the cross-entropy on the val split, with the test cross-entropy at s*. A loss above log C at
the model's scale and below it at s* means the model is over-confident on that data, not under-confident.

Writes docs/results/zeroshot_calibration.{json,md}.
    python benchmarks/calibration.py [--models small small-v2 small-v1]
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
from gramvl.data.features import image_features
from gramvl.data.registry import get_dataset
from gramvl.data.world import embedded_dataset_names
from gramvl.engine.evaluate import DEFAULT_TEMPLATE, zeroshot_weights
from gramvl.engine.results import markdown_table, versions
from gramvl.io import write_json, write_text

OUT = Path(__file__).resolve().parents[1] / "docs" / "results"
SCALES = np.exp(np.linspace(0.0, math.log(100.0), 61))  # 1 .. 100, log-spaced


def best_scale(cos: torch.Tensor, labels: torch.Tensor) -> float:
    losses = [float(F.cross_entropy(float(s) * cos, labels)) for s in SCALES]
    return float(SCALES[int(np.argmin(losses))])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["small", "small-v2", "small-v1"])
    ap.add_argument("--datasets", nargs="*", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    names = args.datasets or embedded_dataset_names()
    results: dict = {}
    rows = []
    for model in args.models:
        bb = load_backbone(model)
        scale = float(bb.logit_scale)
        per = {}
        for name in names:
            test, val = get_dataset(name, "test"), get_dataset(name, "val")
            w = zeroshot_weights(bb, test.classnames, (DEFAULT_TEMPLATE,))
            fte, yte = image_features(bb, test, progress=False)
            fva, yva = image_features(bb, val, progress=False)
            cte, cva = fte.float() @ w.T, fva.float() @ w.T
            s_star = best_scale(cva, yva)
            per[name] = {"accuracy": float((cte.argmax(1) == yte).float().mean()),
                         "loss": float(F.cross_entropy(scale * cte, yte)), "uniform_loss": math.log(len(test.classnames)),
                         "val_best_scale": s_star, "loss_at_val_best_scale": float(F.cross_entropy(s_star * cte, yte))}
            r = per[name]
            rows.append([f"{model} ({bb.ident})", name, f"{100 * r['accuracy']:.2f}", f"{scale:.1f}", f"{r['loss']:.2f}",
                         f"{r['uniform_loss']:.2f}", f"{s_star:.1f}", f"{r['loss_at_val_best_scale']:.2f}"])
            print(rows[-1], flush=True)
        results[model] = {"ident": bb.ident, "logit_scale": scale, "per_dataset": per,
                          "sets_with_loss_under_uniform": sum(v["loss"] < v["uniform_loss"] for v in per.values()),
                          "median_val_best_scale": float(np.median([v["val_best_scale"] for v in per.values()]))}
    record = {"models": args.models, "results": results, "versions": versions(), "seconds": time.time() - t0,
              "command": "python benchmarks/calibration.py --models " + " ".join(args.models)}
    out = Path(args.out)
    write_json(out / "zeroshot_calibration.json", record)
    summary = [f"- `{m}` ({r['ident']}): logit scale {r['logit_scale']:.1f}; zero-shot loss under log C on "
               f"{r['sets_with_loss_under_uniform']} of {len(names)} sets; median val-best scale "
               f"{r['median_val_best_scale']:.1f}" for m, r in results.items()]
    md = ["# Where prompt tuning starts: zero-shot loss against the uniform guess\n\n",
          "Test splits, template 'a photo of a {}.'. Loss: cross-entropy of the model's own scaled logits "
          "(logit scale x cosine), what a prompt-tuning run starts from; log C: the uniform guess. s*: the scale "
          "that minimizes the cross-entropy on the val split (grid of 61 log-spaced values in 1..100), with the "
          "test loss at s*. A loss above log C at the model's scale that falls under it at a smaller s* means "
          "the model is over-confident on that data.\n\n",
          "\n".join(summary) + "\n\n",
          markdown_table(["model", "dataset", "zero-shot %", "logit scale", "loss", "log C", "val-best s*",
                          "loss at s*"], rows),
          f"\nCommand: `{record['command']}`; wall time {time.time() - t0:.0f} s; gramvl commit "
          f"{record['versions']['git_commit']}.\n"]
    write_text(out / "zeroshot_calibration.md", "".join(md))


if __name__ == "__main__":
    main()
