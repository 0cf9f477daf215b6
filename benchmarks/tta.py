"""Test-time prompt tuning on the embedded test sets: zero-shot vs TPT vs TPT from a GRAM init vs TPT with the
structure-induced regulator ψ*(·; e(x)) meta-trained for test time. Seeds drive the random views; every
method sees the same test samples (a fixed random subset of --limit per dataset) and, per seed, the same
views. Writes docs/results/tta.json and docs/results/tta.md.

    python benchmarks/tta.py                       # all embedded test sets, seeds 1 2 3 (<= 20 min, 2 cores)
    python benchmarks/tta.py --limit 20 --datasets fashion-mnist --seeds 1 --meta-budget 30   # smoke run

Without --tta-artifact, a test-time GRAM artifact is meta-trained first (`--meta-budget` seconds) and kept
in --work; without --gram, the "GRAM init" row starts from that artifact's θ* (no regulator).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from gramvl.backbone import load_backbone
from gramvl.data.registry import get_dataset
from gramvl.engine.results import command_line, markdown_table, versions
from gramvl.io import write_json, write_text
from gramvl.tta.tpt import TPT, TPTConfig, gram_init, hand_init, run_tta_many

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "results"
LABELS = {"zeroshot": "zero-shot", "tpt": "TPT", "tpt+gram-init": "TPT + GRAM init",
          "zeroshot+tta-theta": "zero-shot from the test-time θ*", "tpt+tta-theta": "TPT from the test-time θ*",
          "tpt+structure-psi-words": "TPT + structure-induced ψ* from the words",
          "tpt+psi": "TPT + ψ* (no structure)", "tpt+structure-psi": "TPT + structure-induced ψ*"}


def default_model() -> str:
    packaged = ROOT / "gramvl" / "assets" / "small_clip.safetensors"
    return "small" if packaged.is_file() else str(ROOT / "runs" / "pretrain" / "best.safetensors")


def default_datasets() -> list[str]:
    from gramvl.data.world import embedded_dataset_names

    return embedded_dataset_names()


RECIPE_KEYS = ("views", "selection", "outer_lr_phi", "psi_min_cos", "theta_anchor")  # what tta_artifact checks


def tta_artifact(args, bb) -> tuple[Path, float]:
    """The test-time GRAM artifact: given, reused from --work, or meta-trained now (time-budgeted)."""
    from gramvl.gram.tasks import TaskConfig
    from gramvl.tta.meta_tta import MetaTTAConfig, MetaTTAJob, run_meta_tta

    if args.tta_artifact:
        return Path(args.tta_artifact), 0.0
    out = Path(args.work) / "meta_tta.safetensors"
    side = out.with_suffix(".json")
    meta = MetaTTAConfig(steps=args.meta_steps, time_budget_s=args.meta_budget, views=args.meta_views,
                         selection=2.0 / args.meta_views,  # two confident views per corpus image
                         outer_lr_phi=args.meta_lr_phi, psi_min_cos=args.meta_min_cos,
                         theta_anchor=args.meta_theta_anchor, seed=0)
    if out.is_file() and side.is_file() and not args.retrain:
        found = json.loads(side.read_text())
        if found.get("backbone") == bb.ident:
            # the recipe options this script sets must match (artifacts before session 12: no guard, no anchor)
            have = {**{"psi_min_cos": -1.0, "theta_anchor": 0.0}, **(found.get("config") or {})}
            differ = [f"{k} {have.get(k)} (asked {getattr(meta, k)})" for k in RECIPE_KEYS
                      if have.get(k) != getattr(meta, k)]
            if differ:
                raise SystemExit(f"the test-time artifact in {args.work} was meta-trained with another recipe: "
                                 f"{', '.join(differ)}; pass --retrain or another --work")
            return out, 0.0
    t0 = time.time()
    job = MetaTTAJob(model=args.model, meta=meta, tasks=TaskConfig(shots=1, queries=2))
    ckpt = out.with_name(out.stem + ".ckpt.safetensors")
    if args.retrain and ckpt.is_file():
        ckpt.unlink()
    run_meta_tta(job, out, bb=bb, progress=not args.quiet)
    return out, time.time() - t0


def tuners(bb, classnames, seed: int, args, tta_path: Path, first_seed: bool) -> dict[str, TPT]:
    cfg = TPTConfig(n_views=args.n_views, steps=1, batch_images=args.batch_images, seed=seed)
    hand = hand_init(bb)
    gram_path = Path(args.gram) if args.gram else tta_path
    out = {}
    if first_seed:  # zero-shot does not depend on the seed
        out["zeroshot"] = TPT(bb, classnames, hand, TPTConfig(steps=0, batch_images=args.batch_images))
    out["tpt"] = TPT(bb, classnames, hand, cfg)
    out["tpt+gram-init"] = TPT(bb, classnames, gram_init(bb, gram_path, "init"), cfg)
    if args.parts:  # the test-time artifact's θ* and ψ* apart
        if first_seed:
            out["zeroshot+tta-theta"] = TPT(bb, classnames, gram_init(bb, tta_path, "init"),
                                            TPTConfig(steps=0, batch_images=args.batch_images))
        out["tpt+tta-theta"] = TPT(bb, classnames, gram_init(bb, tta_path, "init"), cfg)
        out["tpt+structure-psi-words"] = TPT(bb, classnames, gram_init(bb, tta_path, "regulator"), cfg)
    if args.ablations:
        out["tpt+psi"] = TPT(bb, classnames, gram_init(bb, tta_path, "both", structure=False), cfg)
    out["tpt+structure-psi"] = TPT(bb, classnames, gram_init(bb, tta_path, "both"), cfg)
    return out


def unit_key(bb, name: str, seed: int, args, tta_path: Path) -> str:
    """Identity of one (dataset, seed) unit: the model, the samples, the views and both artifacts' bytes."""
    import hashlib

    gram_path = Path(args.gram) if args.gram else tta_path
    h = hashlib.sha256(json.dumps([bb.ident, name, seed, args.limit, args.n_views, args.batch_images,
                                   bool(args.ablations)] + ([True] if args.parts else [])
                                  + ([args.split] if args.split != "test" else [])).encode())
    for p in (tta_path, gram_path):
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def run_unit(bb, ds, name: str, seed: int, args, tta_path: Path, first_seed: bool) -> dict:
    """Per-method metrics of one (dataset, seed) unit; cached in --work/records so an interrupted run resumes."""
    rec_path = Path(args.work) / "records" / f"{name}_seed{seed}_{unit_key(bb, name, seed, args, tta_path)}.json"
    if rec_path.is_file():
        cached = json.loads(rec_path.read_text())
        if first_seed <= ("zeroshot" in cached):
            return cached
    res = run_tta_many(tuners(bb, ds.classnames, seed, args, tta_path, first_seed), ds, args.limit,
                       progress=not args.quiet)
    out = {m: {**r["metrics"], "correct": r["per_sample"]["correct"]} for m, r in res.items()}
    write_json(rec_path, out)
    return out


def mean_accuracy(results: dict, names: list[str], method: str) -> float:
    return float(np.mean([results[n]["methods"][method]["accuracy_mean"] for n in names]))


def group_of(name: str) -> str:
    if name.endswith("-lineart"):
        return "OpenMoji line art"
    if name.startswith("emoji"):
        return "OpenMoji colour"
    return name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default: the packaged small CLIP, else runs/pretrain/best")
    ap.add_argument("--datasets", nargs="*", default=None)
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    ap.add_argument("--limit", type=int, default=20, help="test samples per dataset (fixed random subset)")
    ap.add_argument("--n-views", type=int, default=64)
    ap.add_argument("--batch-images", type=int, default=8)
    ap.add_argument("--gram", default=None, help="supervised GRAM artifact for the 'GRAM init' row")
    ap.add_argument("--tta-artifact", default=None,
                    help="test-time GRAM artifact (`gramvl meta-train --tta`)")
    ap.add_argument("--meta-budget", type=float, default=240.0, help="seconds of test-time meta-training")
    ap.add_argument("--meta-steps", type=int, default=2000, help="meta-steps (the budget stops first)")
    ap.add_argument("--meta-views", type=int, default=16, help="cached views per corpus image (meta)")
    ap.add_argument("--meta-lr-phi", type=float, default=1e-2, help="ψ's outer learning rate (short budget)")
    ap.add_argument("--meta-min-cos", type=float, default=-1.0,
                    help="ψ's descent guard: cosine of ψ(g) to g at least this (-1: off)")
    ap.add_argument("--meta-theta-anchor", type=float, default=0.25,
                    help="θ's anchor radius around the hand-written words, in token norms (0: off, as before "
                         "session 12)")
    ap.add_argument("--retrain", action="store_true", help="meta-train again even if --work has an artifact")
    ap.add_argument("--ablations", action="store_true", help="add the row 'TPT + ψ* without structure'")
    ap.add_argument("--split", default="test", choices=["test", "val"],
                    help="evaluate on this split (val: for choices such as the anchor radius)")
    ap.add_argument("--parts", action="store_true",
                    help="add rows with the test-time artifact's θ* and ψ* apart: zero-shot and TPT from its θ*, "
                         "and its structure-induced ψ* from the hand-written words")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default="runs/bench-tta", help="relative to the repository root")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    args.model = args.model or default_model()
    bb = load_backbone(args.model)
    tta_path, meta_seconds = tta_artifact(args, bb)
    tta_meta = json.loads(tta_path.with_suffix(".json").read_text())
    names = args.datasets or default_datasets()
    results: dict[str, dict] = {}
    for name in names:
        ds = get_dataset(name, args.split)
        runs: dict[str, list[dict]] = {}
        for i, seed in enumerate(args.seeds):
            for method, r in run_unit(bb, ds, name, seed, args, tta_path, i == 0).items():
                runs.setdefault(method, []).append({"seed": seed, **r})
        entry = {"classes": ds.num_classes, "test_images": len(ds.samples), "n": runs["tpt"][0]["n"],
                 "chance": 1.0 / ds.num_classes, "methods": {}}
        for method, rs in runs.items():
            acc = [r["accuracy"] for r in rs]
            entry["methods"][method] = {"accuracy_mean": float(np.mean(acc)),
                                        "accuracy_std": float(np.std(acc)),
                                        "accuracy_seeds": acc,
                                        "latency_ms": float(np.mean([r["latency_ms"] for r in rs])),
                                        "stage_ms": rs[0]["stage_ms"], "runs": rs}
        results[name] = entry
        print(name, {m: round(100 * v["accuracy_mean"], 1) for m, v in entry["methods"].items()},
              f"{time.time() - t0:.0f} s", flush=True)
    methods = [m for m in LABELS if any(m in r["methods"] for r in results.values())]
    summary = {"groups": {}, "latency_ms": {}}
    for group in dict.fromkeys(group_of(n) for n in names):
        members = [n for n in names if group_of(n) == group]
        summary["groups"][group] = {m: mean_accuracy(results, members, m) for m in methods}
    summary["groups"]["all"] = {m: mean_accuracy(results, names, m) for m in methods}
    for m in methods:
        lat = [results[n]["methods"][m]["latency_ms"] for n in names]
        summary["latency_ms"][m] = {"mean": float(np.mean(lat)), "min": float(np.min(lat)),
                                    "max": float(np.max(lat))}
    seconds = time.time() - t0
    cmd = command_line()
    record = {"model": bb.ident, "describe": bb.describe(), "seeds": args.seeds, "limit": args.limit,
              "split": args.split,
              "n_views": args.n_views, "batch_images": args.batch_images, "threads": args.threads,
              "tta_artifact": {"path": str(tta_path), "seconds_here": round(meta_seconds, 1),
                               **{k: tta_meta.get(k) for k in ("steps_done", "seconds", "structure",
                                                                "regulator", "psi_diagnostics", "curve",
                                                                "config")}},
              "gram_init_artifact": args.gram or f"{tta_path} (θ* only)", "results": results,
              "summary": summary,
              "versions": versions(), "seconds": round(seconds, 1), "command": cmd}
    out = Path(args.out)
    write_json(out / "tta.json", record)
    write_text(out / "tta.md", render_markdown(record, names, methods))
    print(json.dumps(summary, indent=1))


def render_markdown(rec: dict, names: list[str], methods: list[str]) -> str:
    def pct(v: dict, m: str) -> str:
        x = v["methods"][m]
        return f"{100 * x['accuracy_mean']:.1f} ± {100 * x['accuracy_std']:.1f}"

    rows = [[n, r["classes"], r["n"], f"{100 * r['chance']:.1f}", *[pct(r, m) for m in methods]]
            for n, r in rec["results"].items()]
    groups = [[f"**mean: {g}**", "", "", "", *[f"{100 * v[m]:.1f}" for m in methods]]
              for g, v in rec["summary"]["groups"].items()]
    lat = [[LABELS[m], f"{v['mean']:.0f}", f"{v['min']:.0f}", f"{v['max']:.0f}"]
           for m, v in rec["summary"]["latency_ms"].items()]
    art = rec["tta_artifact"]
    diag = art.get("psi_diagnostics") or {}
    struct = art.get("structure") or {}
    mcfg = art.get("config") or {}
    lines = [
        "# Test-time prompt tuning with the structure-induced regulator\n\n",
        f"Model `{rec['model']}`. Each dataset: the same {rec['limit']} {rec.get('split', 'test')} images (a fixed "
        "random subset) "
        f"for every method; seeds {rec['seeds']} drive the {rec['n_views']} random views (the image + "
        f"{rec['n_views'] - 1} random resized crops with flips); TPT = 10% most confident views, one AdamW "
        f"step (lr 5e-3) on the text context, reset per image. Accuracy % on the {rec.get('split', 'test')} split, "
        "mean ± std over "
        "seeds (zero-shot has no randomness).\n\n",
        "Rows: zero-shot = hand-written 'a photo of a {}.'; TPT from the same words; TPT + GRAM init = TPT "
        f"from θ* of `{rec['gram_init_artifact']}`; TPT + structure-induced ψ* = θ* and ψ*(g; e(x)) of the "
        "test-time artifact, e(x) over its prototypes.\n\n",
        markdown_table(["dataset", "classes", "n", "chance %", *[LABELS[m] for m in methods]], rows + groups),
        "\nPer-sample latency (ms; views + image encoding + tuning + prediction, batches of "
        f"{rec['batch_images']} images, {rec['threads']} CPU thread(s)), mean / min / max over datasets:\n\n",
        markdown_table(["method", "mean", "min", "max"], lat),
        f"\nTest-time artifact `{art['path']}`: {art.get('steps_done')} meta-steps in "
        f"{art.get('seconds')} s, prototypes: {struct.get('mode')} ({struct.get('n_prototypes')}, "
        f"τ = {struct.get('tau')}). On held-out meta-tasks: accuracy before the step "
        f"{100 * diag.get('pre_acc', float('nan')):.1f}%, after a raw TPT "
        f"step {100 * diag.get('post_acc_raw_step', float('nan')):.1f}%, after a ψ*-regulated step "
        f"{100 * diag.get('post_acc_psi_step', float('nan')):.1f}%; ψ* cosine to the identity "
        f"{diag.get('text.cos_to_identity_mean', float('nan')):.3f}. Recipe: {mcfg.get('views')} "
        "cached views "
        f"per corpus image, {mcfg.get('selection')} of them kept, inner AdamW lr {mcfg.get('inner_lr')}, "
        f"ψ's outer lr {mcfg.get('outer_lr_phi')}, ψ's descent guard (min cosine) {mcfg.get('psi_min_cos', -1.0)}, "
        f"θ's anchor radius {mcfg.get('theta_anchor', 0.0)}, second order {mcfg.get('second_order')}, time budget "
        f"{mcfg.get('time_budget_s')} s.\n\n",
        f"Command: `{rec['command']}`; wall time {rec['seconds']:.0f} s; gramvl commit "
        f"{rec['versions']['git_commit']}.\n",
    ]
    return "".join(lines)


if __name__ == "__main__":
    main()
