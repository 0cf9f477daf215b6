"""Collect host / host lr-control / host + GRAM rows from benchmark JSONs (written by benchmarks/protocols.py)
into one side-by-side table: docs/results/<name>.{json,md}. It runs nothing; every number comes from the
named JSON files, which hold the per-seed records' aggregates.

    python benchmarks/gram_table.py --name gram_hosts --base2new docs/results/base2new_hosts_ctrl.json ... \
        --fewshot docs/results/fewshot1_hosts_ctrl.json ... --hosts coop cocoop vpt maple ivlp
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gramvl.engine.results import command_line, markdown_table
from gramvl.io import write_json, write_text

ROOT = Path(__file__).resolve().parents[1]


def _collect(files: list[str]) -> dict[str, dict]:
    """Rows by label. `FILE.json:LABEL,LABEL` takes only those labels from a file; a label found in two files
    is an error (name the one to keep), never a silent choice."""
    out: dict[str, dict] = {}
    for arg in files:
        f, keep = arg.split(".json:", 1) if ".json:" in arg else (arg, "")
        f = f + ".json" if keep else f
        rec = json.loads(Path(f).read_text())
        wanted = keep.split(",") if keep else list(rec["results"])
        missing = [lab for lab in wanted if lab not in rec["results"]]
        if missing:
            raise SystemExit(f"{f} has no rows {missing}; it has {sorted(rec['results'])}")
        for label in wanted:
            if label in out:
                raise SystemExit(f"row {label!r} is in {out[label]['_file']} and {Path(f).name}: "
                                 f"pick one with FILE.json:LABEL")
            out[label] = {**rec["results"][label], "_file": Path(f).name, "_seeds": rec["seeds"]}
    return out


def _b2n(s: dict | None) -> tuple[str, str, str, float | None]:
    if not s:
        return "", "", "", None
    a = s["average"]
    std = max(e["hm_std"] for e in s["per_dataset"].values())
    return f"{100 * a['base']:.2f}", f"{100 * a['new']:.2f}", f"{100 * a['hm']:.2f} ± {100 * std:.2f}", a["hm"]


def _shot(s: dict | None, k: int) -> tuple[str, float | None]:
    if not s or str(k) not in s.get("by_shots", {}):
        return "", None
    b = s["by_shots"][str(k)]
    std = max(e["accuracy_std"] for e in b["per_dataset"].values())
    return f"{100 * b['average']['accuracy']:.2f} ± {100 * std:.2f}", b["average"]["accuracy"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", required=True)
    ap.add_argument("--base2new", nargs="*", default=[])
    ap.add_argument("--fewshot", nargs="*", default=[])
    ap.add_argument("--hosts", nargs="+", required=True)
    ap.add_argument("--shot", type=int, default=1)
    ap.add_argument("--control", default="lr x0.95")
    ap.add_argument("--note", default="")
    args = ap.parse_args()
    b2n, fs = _collect(args.base2new), _collect(args.fewshot)
    rows, verdict = [], {}
    for h in args.hosts:
        labels = [h, f"{h} ({args.control})", f"{h} + GRAM"]
        vals = {}
        for lab in labels:
            base, new, hm, hmv = _b2n(b2n.get(lab))
            shot, shv = _shot(fs.get(lab), args.shot)
            if not (base or shot):
                continue
            vals[lab] = (hmv, shv)
            rows.append([lab, base, new, hm, shot])
        g, ref, ctl = vals.get(f"{h} + GRAM"), vals.get(h), vals.get(f"{h} ({args.control})")
        if g and ref:
            def beats(i, g=g, ref=ref, ctl=ctl):
                if g[i] is None or ref[i] is None:
                    return None
                return g[i] >= ref[i] and (ctl is None or ctl[i] is None or g[i] >= ctl[i])
            verdict[h] = {"hm": beats(0), f"{args.shot}-shot": beats(1)}
    headers = ["method", "base %", "new %", "HM % (± per-dataset std)", f"{args.shot}-shot %"]
    lines = [f"# {args.name}\n\n", "Host, its lr control and host + GRAM side by side (mean over seeds, ± std over "
             "seeds). Collected from: " + ", ".join(Path(f).name for f in args.base2new + args.fewshot)
             + " (FILE:LABEL: only that row of the file).\n\n",
             markdown_table(headers, rows), "\n"]
    if verdict:
        lines.append("GRAM >= host and >= its lr control:\n\n")
        for h, v in verdict.items():
            lines.append(f"- {h}: " + ", ".join(f"{k} {'yes' if x else ('no' if x is False else 'n/a')}"
                                                for k, x in v.items()) + "\n")
    if args.note:
        lines.append("\n" + args.note + "\n")
    cmd = command_line()
    lines.append(f"\nCommand: `{cmd}`\n")
    out = ROOT / "docs" / "results"
    write_json(out / f"{args.name}.json", {"name": args.name, "rows": rows, "headers": headers,
                                           "verdict": verdict, "command": cmd})
    write_text(out / f"{args.name}.md", "".join(lines))
    print("".join(lines))


if __name__ == "__main__":
    main()
