"""Ablations of test-time GRAM: the structure-induced regulator against the same meta-training without the
structure context, with flat prototypes, and without the complexity-informed construction.

Every ablation artifact (and the full recipe again, with the current code) is meta-trained like the given one (benchmarks/tta.py's recipe: 16 cached views per
corpus image, two kept, ψ's outer lr 1e-2, seed 0) for exactly the full artifact's number of meta-steps (no
time budget decides), with the overrides of `gramvl.tta.meta_tta.ABLATIONS`. Each is then evaluated as
TPT + θ* + ψ* next to plain TPT and the full artifact, on the same test samples and, per seed, the same
views. Writes docs/results/tta_ablations.{json,md}.

    python benchmarks/tta_ablations.py --full runs/bench-tta/meta_tta.safetensors --limit 100
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from gramvl.backbone import load_backbone
from gramvl.data.registry import get_dataset
from gramvl.engine.results import command_line, markdown_table, versions
from gramvl.gram.tasks import TaskConfig
from gramvl.io import write_json, write_text
from gramvl.tta.meta_tta import ABLATIONS, MetaTTAConfig, MetaTTAJob, run_meta_tta
from gramvl.tta.tpt import TPT, TPTConfig, gram_init, hand_init, run_tta_many

ROOT = Path(__file__).resolve().parents[1]
LABELS = {"tpt": "TPT", "given": "full: tta.md's artifact", "full": "full (structure-induced ψ*), re-trained here",
          "no-structure": "no structure context",
          "flat-prototypes": "flat prototypes", "no-complexity": "no complexity-informed construction"}
DEFAULT_SETS = ["emoji-nature", "emoji-activities", "emoji-nature-lineart", "fashion-mnist"]


def ablation_artifact(name: str, full_meta: dict, bb, work: Path, quiet: bool) -> Path:
    """Meta-train (or reuse) the ablation `name` with the full artifact's recipe and step count."""
    out = work / f"meta_tta_{name}.safetensors"
    side = out.with_suffix(".json")
    if out.is_file() and side.is_file() and json.loads(side.read_text()).get("backbone") == bb.ident:
        return out
    cfg = dict(full_meta["config"])
    cfg.update(steps=int(full_meta["steps_done"]), time_budget_s=0.0)
    cfg.setdefault("theta_anchor", 0.0)  # an artifact made before session 12 had no anchor (the default since)
    task_cfg = dict(full_meta["task_config"])
    for key, value in ABLATIONS[name].items():
        where, field = key.split(".", 1)
        (cfg if where == "meta" else task_cfg)[field] = value
    known = {f.name for f in dataclasses.fields(MetaTTAConfig)}
    meta = MetaTTAConfig(**{k: v for k, v in cfg.items() if k in known})
    tasks = TaskConfig(**{k: v for k, v in task_cfg.items() if k in {f.name for f in dataclasses.fields(TaskConfig)}})
    job = MetaTTAJob(model="small", meta=meta, tasks=tasks)
    run_meta_tta(job, out, bb=bb, progress=not quiet)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", default="runs/bench-tta/meta_tta.safetensors", help="the full test-time artifact")
    ap.add_argument("--ablations", nargs="+", default=["full", "no-structure", "flat-prototypes", "no-complexity"],
                    help="names in gramvl.tta.meta_tta.ABLATIONS to meta-train here ('full': the recipe again)")
    ap.add_argument("--datasets", nargs="+", default=DEFAULT_SETS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default="runs/bench-tta-ablations")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results"))
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    bb = load_backbone("small")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    full = Path(args.full)
    full_meta = json.loads(full.with_suffix(".json").read_text())
    arts = {"given": full}
    for name in args.ablations:
        arts[name] = ablation_artifact(name, full_meta, bb, work, args.quiet)
    meta_s = time.time() - t0
    art_info = {}
    for name, path in arts.items():
        m = json.loads(path.with_suffix(".json").read_text())
        art_info[name] = {"path": str(path), "steps_done": m.get("steps_done"), "seconds": m.get("seconds"),
                          "structure": m.get("structure"),
                          "complexity_informed": (m.get("task_config") or {}).get("complexity_informed"),
                          "psi_diagnostics": m.get("psi_diagnostics")}
    results: dict[str, dict] = {}
    for ds_name in args.datasets:
        ds = get_dataset(ds_name, "test")
        per: dict[str, list[float]] = {}
        for seed in args.seeds:
            rec_path = work / "records" / f"{ds_name}_seed{seed}_n{args.limit}.json"
            if rec_path.is_file():
                accs = json.loads(rec_path.read_text())
            else:
                cfg = TPTConfig(steps=1, seed=seed)
                tuners = {"tpt": TPT(bb, ds.classnames, hand_init(bb), cfg)}
                for name, path in arts.items():
                    tuners[name] = TPT(bb, ds.classnames, gram_init(bb, path, "both"), cfg)
                res = run_tta_many(tuners, ds, args.limit, progress=not args.quiet)
                accs = {m: r["metrics"]["accuracy"] for m, r in res.items()}
                write_json(rec_path, accs)
            for m, a in accs.items():
                per.setdefault(m, []).append(a)
        results[ds_name] = {m: {"mean": float(np.mean(v)), "std": float(np.std(v)), "seeds": v}
                            for m, v in per.items()}
        print(ds_name, {m: round(100 * v["mean"], 1) for m, v in results[ds_name].items()}, flush=True)
    methods = ["tpt", *arts]
    mean = {m: float(np.mean([results[d][m]["mean"] for d in args.datasets])) for m in methods}
    record = {"model": bb.ident, "datasets": args.datasets, "seeds": args.seeds, "limit": args.limit,
              "artifacts": art_info, "results": results, "mean": mean, "meta_training_s_here": round(meta_s, 1),
              "seconds": round(time.time() - t0, 1), "versions": versions(), "command": command_line()}
    out = Path(args.out)
    write_json(out / "tta_ablations.json", record)
    rows = [[d, *[f"{100 * results[d][m]['mean']:.1f} ± {100 * results[d][m]['std']:.1f}" for m in methods]]
            for d in args.datasets]
    rows.append(["**mean**", *[f"{100 * mean[m]:.2f}" for m in methods]])
    arows = []
    for name, a in art_info.items():
        diag = a["psi_diagnostics"] or {}
        arows.append([LABELS[name], a["steps_done"], (a["structure"] or {}).get("mode"),
                      (a["structure"] or {}).get("n_prototypes"), a["complexity_informed"],
                      f"{100 * diag.get('pre_acc', float('nan')):.1f}",
                      f"{100 * diag.get('post_acc_raw_step', float('nan')):.1f}",
                      f"{100 * diag.get('post_acc_psi_step', float('nan')):.1f}",
                      f"{diag.get('text.cos_to_identity_mean', float('nan')):.3f}"])
    text = [
        "# Ablations of test-time GRAM (structure-induced regulator)\n\n",
        f"Model `{bb.ident}`. Each dataset: the same {args.limit} test images (fixed random subset) for every "
        f"row; seeds {args.seeds} drive the 64 views, shared by every row within a seed. TPT: 'a photo of a', "
        "10% most confident views, one AdamW step (lr 5e-3). The other rows: TPT from θ* with the step "
        "regulated by ψ* of the named artifact. Accuracy %, mean ± std over seeds.\n\n",
        markdown_table(["dataset", *[LABELS[m] for m in methods]], rows),
        "\nArtifacts (each ablation meta-trained for the full artifact's number of meta-steps, same recipe "
        "and seed; diagnostics on held-out meta-tasks: accuracy before the step, after a raw TPT step, after "
        "the ψ*-regulated step; ψ*'s cosine to the identity):\n\n",
        markdown_table(["artifact", "meta-steps", "prototypes", "n", "complexity-informed tasks",
                        "pre %", "raw step %", "ψ* step %", "cos to identity"], arows),
        f"\nCommand: `{record['command']}`; wall time {record['seconds']:.0f} s (meta-training here "
        f"{record['meta_training_s_here']:.0f} s); gramvl commit {record['versions']['git_commit']}.\n",
    ]
    write_text(out / "tta_ablations.md", "".join(text))


if __name__ == "__main__":
    main()
