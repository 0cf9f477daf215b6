"""Recipe tuning for the packaged small CLIP on *val* splits (never test): learning-rate multipliers.

Runs `gramvl protocol fewshot --eval-split val` for each (method, lr multiplier) and writes
docs/results/tuning_small.{json,md}. The chosen multipliers go into SMALL_MODEL_SCALING
(gramvl/engine/train.py).

    python benchmarks/tune_small.py --methods coop vpt --mults 1 10 50 --dataset emoji-nature
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from gramvl.backbone import load_backbone
from gramvl.engine.protocols import ProtocolConfig, run_protocol
from gramvl.engine.results import command_line, markdown_table, versions
from gramvl.engine.train import SMALL_MODEL_SCALING, TrainConfig, resolved_recipe
from gramvl.io import write_json, write_text
from gramvl.prompts import HOSTS

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", nargs="+", default=["coop", "vpt"])
    ap.add_argument("--mults", nargs="+", type=float, default=[1, 10, 50])
    ap.add_argument("--dataset", default="emoji-nature")
    ap.add_argument("--shots", nargs="+", type=int, default=[16])
    ap.add_argument("--epoch-mult", type=float, default=None,
                    help="epochs = paper epochs x this (default: each host's shipped small-model epoch scaling)")
    ap.add_argument("--model", default="small")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--name", default="tuning_small", help="result file stem in docs/results/")
    args = ap.parse_args()
    t0 = time.time()
    bb = load_backbone(args.model)
    rows, results = [], {}
    for m in args.methods:
        for shots in args.shots:
            base = resolved_recipe(HOSTS[m], TrainConfig(method=m, shots=shots))  # the paper recipe
            # the shipped scaling applies to the gramvl small CLIPs only (as in resolved_recipe)
            scale = SMALL_MODEL_SCALING.get(m, {}) if bb.ident.startswith("gramvl-small") else {}
            em = args.epoch_mult if args.epoch_mult is not None else scale.get("epoch_mult", 1.0)
            shipped = scale.get("lr_mult", 1.0)
            epochs = max(1, round(base.epochs * em))
            for mult in args.mults:
                out = ROOT / "runs" / "tune" / f"{m}_lr{mult:g}_ep{epochs}"
                p = ProtocolConfig(protocol="fewshot", method=m, datasets=[args.dataset], seeds=[args.seed],
                                   shots=[shots], out=str(out), lr=base.lr * mult, epochs=epochs,
                                   eval_split="val")
                s = run_protocol(p, progress=False, bb=bb)
                acc = s["average"]["accuracy"]
                results[f"{m}@{mult:g}@{shots}"] = {"method": m, "shots": shots, "lr_mult": mult,
                                                    "lr": base.lr * mult, "epochs": epochs, "val_accuracy": acc,
                                                    "shipped_lr_mult": shipped}
                rows.append([m, shots, f"{mult:g}" + (" (shipped)" if mult == shipped else ""), f"{base.lr * mult:g}",
                             epochs, f"{100 * acc:.2f}"])
                print(rows[-1], flush=True)
    write_json(ROOT / "docs" / "results" / f"{args.name}.json",
               {"results": results, "dataset": args.dataset, "split": "val", "seed": args.seed,
                "shots": args.shots, "model": bb.ident, "versions": versions()})
    md = ["# Recipe tuning for the small CLIP (val split only)\n\n",
          f"Few-shot ({', '.join(map(str, args.shots))} shots, seed {args.seed}) on `{args.dataset}`, accuracy on its **val** split. "
          + ("Epochs = paper epochs x " + (f"{args.epoch_mult}" if args.epoch_mult is not None else
                                         "each host's shipped small-model scaling") + " (2-core budget). ")
          + "lr multiplier: times the paper lr; '(shipped)' marks the one SMALL_MODEL_SCALING uses. "
          f"Model `{bb.ident}`.\n\n",
          markdown_table(["method", "shots", "lr multiplier", "lr", "epochs", "val accuracy %"], rows),
          f"\nCommand: `{command_line()}`; {time.time() - t0:.0f} s.\n"]
    write_text(ROOT / "docs" / "results" / f"{args.name}.md", "".join(md))


if __name__ == "__main__":
    main()
