"""TPT's step size on the *val* splits (never test): zero-shot and TPT at several AdamW learning rates, on the same
images and the same views (encoded once per seed). TPT's paper lr (5e-3) was set for CLIP ViT-B/16; this checks
what the small CLIP needs. Writes docs/results/<name>.{json,md}.

    python benchmarks/tpt_lr.py --datasets emoji-nature emoji-nature-lineart fashion-mnist --lrs 0.005 0.05 0.5
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from gramvl.backbone import load_backbone
from gramvl.data.registry import get_dataset
from gramvl.engine.results import command_line, markdown_table, versions
from gramvl.io import write_json, write_text
from gramvl.tta.tpt import TPT, TPTConfig, hand_init, run_tta_many

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["emoji-nature", "emoji-nature-lineart", "fashion-mnist"])
    ap.add_argument("--lrs", nargs="+", type=float, default=[0.005, 0.05, 0.5])
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--split", default="val", help="val to choose the lr; test only to report the chosen one")
    ap.add_argument("--name", default="tpt_lr_val")
    args = ap.parse_args()
    t0 = time.time()
    bb = load_backbone("small")
    methods = ["zeroshot", *[f"tpt@{lr:g}" for lr in args.lrs]]
    results: dict[str, dict] = {}
    for name in args.datasets:
        ds = get_dataset(name, args.split)
        accs: dict[str, list[float]] = {m: [] for m in methods}
        changed: dict[str, list[float]] = {m: [] for m in methods[1:]}
        for seed in args.seeds:
            tuners = {"zeroshot": TPT(bb, ds.classnames, hand_init(bb), TPTConfig(steps=0))}
            for lr in args.lrs:
                tuners[f"tpt@{lr:g}"] = TPT(bb, ds.classnames, hand_init(bb), TPTConfig(steps=1, lr=lr, seed=seed))
            res = run_tta_many(tuners, ds, args.limit, progress=False)
            zs = np.asarray(res["zeroshot"]["per_sample"]["pred"])
            for m in methods:
                accs[m].append(res[m]["metrics"]["accuracy"])
                if m != "zeroshot":
                    changed[m].append(float((np.asarray(res[m]["per_sample"]["pred"]) != zs).mean()))
        results[name] = {m: {"accuracy_mean": float(np.mean(a)), "accuracy_std": float(np.std(a)),
                             "changed_vs_zeroshot": float(np.mean(changed[m])) if m in changed else 0.0}
                         for m, a in accs.items()}
        print(name, {m: round(100 * v["accuracy_mean"], 1) for m, v in results[name].items()}, flush=True)
    rows = [[n, *[f"{100 * r[m]['accuracy_mean']:.1f} ± {100 * r[m]['accuracy_std']:.1f}"
                  + (f" ({100 * r[m]['changed_vs_zeroshot']:.0f}% changed)" if m != "zeroshot" else "")
                  for m in methods]] for n, r in results.items()]
    rows.append(["**mean**", *[f"**{100 * np.mean([r[m]['accuracy_mean'] for r in results.values()]):.1f}**"
                               for m in methods]])
    write_json(ROOT / "docs" / "results" / f"{args.name}.json",
               {"results": results, "seeds": args.seeds, "limit": args.limit, "split": args.split, "model": bb.ident,
                "versions": versions(), "seconds": round(time.time() - t0, 1)})
    md = [f"# TPT's learning rate on the small CLIP ({args.split} splits)\n\n",
          f"Model `{bb.ident}`. Per dataset the same {args.limit} **{args.split}** images; seeds {args.seeds} drive the 64 "
          "views; one AdamW step on the 'a photo of a' context, 10% most confident views. Accuracy %, mean ± std "
          "over seeds; in brackets the share of images whose prediction differs from zero-shot.\n\n",
          markdown_table(["dataset", "zero-shot", *[f"TPT lr {lr:g}" for lr in args.lrs]], rows),
          f"\nCommand: `{command_line()}`; {time.time() - t0:.0f} s.\n"]
    write_text(ROOT / "docs" / "results" / f"{args.name}.md", "".join(md))


if __name__ == "__main__":
    main()
