"""Accuracy benchmark: several methods (with and without GRAM) through one protocol, side by side.

Every cell comes from `gramvl.engine.protocols.run_protocol` (one JSON record per dataset × shots × seed,
resumable); this script only collects the summaries into docs/results/<name>.{json,md}.

    python benchmarks/protocols.py --name hosts_base2new --protocol base2new \
        --methods zeroshot coop cocoop kgcoop prograd --datasets emoji-nature emoji-activities --seeds 1 2 3
    python benchmarks/protocols.py --name gram_base2new --protocol base2new --methods coop \
        --gram runs/gram/coop.safetensors --datasets ... --seeds 1 2 3
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from omegaconf import OmegaConf

from gramvl.backbone import load_backbone
from gramvl.engine.protocols import ProtocolConfig, run_protocol
from gramvl.engine.results import command_line, markdown_table, versions
from gramvl.engine.train import TrainConfig, resolved_recipe
from gramvl.io import write_json, write_text
from gramvl.prompts import HOSTS

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", required=True)
    ap.add_argument("--protocol", required=True, choices=["fewshot", "base2new", "xd", "dg"])
    ap.add_argument("--methods", nargs="+", required=True)
    ap.add_argument("--gram", default=None, help="artifact: every method is also run with GRAM attached")
    ap.add_argument("--gram-only", action="store_true", help="run only the +GRAM variants")
    ap.add_argument("--gram-parts", nargs="*", default=["both"], help="ablations: both init regulator")
    ap.add_argument("--datasets", nargs="+", required=True)
    ap.add_argument("--targets", nargs="*", default=None)
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    ap.add_argument("--shots", nargs="+", type=int, default=[16])
    ap.add_argument("--epochs", type=int, default=None, help="override every host's epochs (small-model budget)")
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--lr-control", type=float, default=None, metavar="X",
                    help="also run each method (no GRAM) with its resolved recipe lr times X (e.g. 0.95)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="host options, e.g. n_ctx=4")
    ap.add_argument("--runs", default=str(ROOT / "runs" / "bench"))
    ap.add_argument("--model", default="small")
    ap.add_argument("--eval-split", default="test", choices=["test", "val"])
    args = ap.parse_args()
    t0 = time.time()
    bb = load_backbone(args.model)
    host_over = OmegaConf.to_container(OmegaConf.from_dotlist(list(args.set)))
    variants = []
    for m in args.methods:
        if not args.gram_only:
            variants.append((m, None, "both", None))
        if args.lr_control:
            cfg = TrainConfig(method=m, dataset=args.datasets[0], shots=args.shots[0], epochs=args.epochs)
            variants.append((m, None, "both", resolved_recipe(HOSTS[m], cfg, bb.ident).lr * args.lr_control))
        if args.gram:
            variants += [(m, args.gram, part, None) for part in args.gram_parts]
    results = {}
    for method, gram, part, lr in variants:
        label = method + ("" if not gram else (" + GRAM" if part == "both" else f" + GRAM ({part} only)"))
        if lr is not None:
            label += f" (lr x{args.lr_control})"
        folder = Path(args.runs) / args.name / label.replace(" ", "").replace("+", "_").replace("(", "").replace(
            ")", "")
        p = ProtocolConfig(protocol=args.protocol, method=method, datasets=args.datasets,
                           targets=args.targets or [], seeds=args.seeds, shots=args.shots, out=str(folder),
                           model=args.model, epochs=args.epochs, lr=lr if lr is not None else args.lr, gram=gram, gram_parts=part, eval_split=args.eval_split,
                           host=dict(host_over))
        ts = time.time()
        s = run_protocol(p, progress=False, bb=bb)
        results[label] = {"summary": s, "folder": str(folder), "seconds": time.time() - ts}
        print(label, json.dumps(s["average"]), f"{time.time() - ts:.0f}s", flush=True)

    rows = []
    shots_list = sorted({int(k) for r in results.values() for k in r["summary"]["by_shots"]})
    if args.protocol == "base2new":
        headers = ["method", "base %", "new %", "HM %"]
        for label, r in results.items():
            a, per = r["summary"]["average"], r["summary"]["per_dataset"]
            hm_std = max(e["hm_std"] for e in per.values())
            rows.append([label, f"{100 * a['base']:.2f}", f"{100 * a['new']:.2f}",
                         f"{100 * a['hm']:.2f} (max per-dataset std {100 * hm_std:.2f})"])
    elif args.protocol == "fewshot":
        headers = ["method"] + [f"{k}-shot %" for k in shots_list]
        for label, r in results.items():
            row = [label]
            for k in shots_list:
                b = r["summary"]["by_shots"].get(str(k))
                if not b:
                    row.append("")
                    continue
                stds = [e["accuracy_std"] for e in b["per_dataset"].values()]
                row.append(f"{100 * b['average']['accuracy']:.2f} (±{100 * max(stds):.2f})")
            rows.append(row)
    else:
        headers = ["method", "source %", "target average %"]
        for label, r in results.items():
            per = r["summary"]["per_dataset"]
            src = sum(e["source"] for e in per.values()) / len(per)
            rows.append([label, f"{100 * src:.2f}", f"{100 * r['summary']['average']['accuracy']:.2f}"])
    per_ds = {}
    for label, r in results.items():
        per_ds[label] = r["summary"]["per_dataset"]
    cmd = command_line()
    record = {"name": args.name, "protocol": args.protocol, "command": cmd, "model": bb.ident,
              "seeds": args.seeds, "datasets": args.datasets, "results": {k: v["summary"] for k, v in results.items()},
              "versions": versions(), "seconds": time.time() - t0}
    out = ROOT / "docs" / "results"
    write_json(out / f"{args.name}.json", record)
    md = [f"# {args.name}\n\n", f"Protocol `{args.protocol}`, datasets {', '.join(args.datasets)}, seeds "
          f"{args.seeds}, model `{bb.ident}`. Accuracy averaged over datasets (mean over seeds; in brackets "
          f"the largest per-dataset std over seeds). HM is computed from the mean base and new accuracies.\n\n",
          markdown_table(headers, rows), "\nPer dataset: see the JSON file and each run folder's summary.md.\n\n",
          f"Command: `{cmd}`\n\nWall time {time.time() - t0:.0f} s on 2 CPU cores; gramvl commit "
          f"{record['versions']['git_commit']}.\n"]
    write_text(out / f"{args.name}.md", "".join(md))


if __name__ == "__main__":
    main()
