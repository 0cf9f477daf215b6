"""Side-by-side table of the smoke part of benchmarks/device_check.sh run on the CPU and on a GPU.

Each smoke command writes a protocol summary (summary.json) or a run record (JSON); this reads both runs'
outputs and writes docs/results/gpu_smoke.{json,md}: per command, its exit status and wall time on each
machine and the accuracy each got on the same data (a folder:ROOT subset of emoji-nature: 2/1/5 train/val/
test images per class, 76 classes).

    python benchmarks/device_compare.py --cpu runs/device-cpu --gpu runs/device-h100 --out docs/results
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path


def steps(folder: Path) -> dict[str, tuple[int, float]]:
    """name -> (exit status, seconds) from steps.txt (the last line of each name counts)."""
    out = {}
    for line in (folder / "steps.txt").read_text().splitlines():
        m = re.match(r"(\S+) rc=(\d+) ([\d.]+)\s*(ms|s)$", line.strip())
        if m:
            t = float(m.group(3)) / (1000 if m.group(4) == "ms" else 1)
            out[m.group(1)] = (int(m.group(2)), t)
    return out


def metrics(folder: Path, name: str) -> dict | None:
    p = folder / "smoke" / name
    if (p / "summary.json").is_file():
        return json.loads((p / "summary.json").read_text())["average"]
    if p.with_suffix(".json").is_file():
        rec = json.loads(p.with_suffix(".json").read_text())
        m = rec.get("metrics", {})
        return {k: v for k, v in m.items() if k in ("accuracy", "latency_ms_median")}
    return None


def cell(m: dict | None) -> str:
    if not m:
        return "-"
    parts = []
    for k in ("accuracy", "base", "new", "hm"):
        if k in m:
            parts.append(f"{k} {100 * m[k]:.2f}")
    if "latency_ms_median" in m:
        parts.append(f"{m['latency_ms_median']:.0f} ms/image")
    return ", ".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", required=True)
    ap.add_argument("--gpu", required=True)
    ap.add_argument("--out", default="docs/results")
    ap.add_argument("--gpu-name", default=None)
    args = ap.parse_args()
    from gramvl.engine.results import markdown_table
    from gramvl.io import write_json, write_text

    cpu, gpu = Path(args.cpu), Path(args.gpu)
    sc, sg = steps(cpu), steps(gpu)
    gpu_name = args.gpu_name or (gpu / "env.txt").read_text().strip()
    rows, recs = [], []
    for name in sg:
        if name.startswith(("memory", "meta_vpt", "meta_maple", "meta_unigram")):
            continue
        # the run records are named after the step (train_coop writes a folder with no metrics)
        mc, mg = metrics(cpu, name), metrics(gpu, name)
        rc_c, t_c = sc.get(name, (None, None))
        rc_g, t_g = sg[name]
        recs.append({"step": name, "cpu": {"rc": rc_c, "seconds": t_c, "metrics": mc},
                     "gpu": {"rc": rc_g, "seconds": t_g, "metrics": mg}})
        rows.append([name, "ok" if rc_c == 0 else f"rc {rc_c}", cell(mc), "ok" if rc_g == 0 else f"rc {rc_g}",
                     cell(mg)])
    md = ("# Every CLI path on a GPU (smoke run) next to the same commands on the CPU\n\n"
          f"GPU: {gpu_name}. CPU: this project's 2-core machine. Data: a folder:ROOT subset of emoji-nature "
          "(2 / 1 / 5 train / val / test images per class, 76 classes), seed 1, the packaged small CLIP. The "
          "commands are in benchmarks/device_check.sh (part `smoke`). Accuracies in %; the TPT rows also give "
          "the median latency per test image. 'rc' = exit status (124: stopped by the step's time limit).\n\n"
          + markdown_table(["step", "CPU", "CPU result", "GPU", "GPU result"], rows)
          + f"\n\nCommand: `python benchmarks/device_compare.py --cpu {args.cpu} --gpu {args.gpu}`\n")
    out = Path(args.out)
    write_json(out / "gpu_smoke.json", {"gpu": gpu_name, "steps": recs})
    write_text(out / "gpu_smoke.md", md)
    print(md)


if __name__ == "__main__":
    main()
