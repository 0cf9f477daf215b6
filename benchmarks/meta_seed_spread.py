"""How much does GRAM's result depend on the meta-training run itself? Every GRAM table in docs/results/
evaluates one artifact (one meta-training run) over 3 downstream seeds, so its ± covers the few-shot draw and
the prompt tuning, not the meta-training. This benchmark meta-trains the same recipe with several meta-seeds
(`meta.seed`: the meta-task draws and ψ's init) and evaluates each artifact with base-to-new CoOp on
emoji-nature, beside plain CoOp with the same seeds.

Session 13 found why `make demo`'s GRAM row differs between machines (12.07 in sessions 8-10, 18.55 in
sessions 11-12): the same seed run with 1 or 2 CPU threads, or on corpus features cached by a run with another
thread count (they differ in the last float bit), gives another artifact. `--threads 2 1` repeats each
meta-seed with both thread counts to measure that effect beside the seed's.

Writes docs/results/{name}.{json,md}; artifacts and protocol folders go under --work (reused when present: an
artifact is retrained only when missing, and a protocol folder is named by its artifact's sha256).
    # the demo's recipe (300 meta-steps, torch k-means as in a clean clone, CoOp 40 epochs, seed 1)
    python benchmarks/meta_seed_spread.py --meta-seeds 0 1 2 3 4 --threads 2 1 --steps 300 --epochs 40 \
        --seeds 1 --kmeans torch --name meta_seed_spread_demo
    # the shipped artifact's recipe (600 meta-steps, faiss k-means, full CoOp schedule, seeds 1-3)
    python benchmarks/meta_seed_spread.py --meta-seeds 0 1 2 3 4 --steps 600 --seeds 1 2 3 --kmeans faiss \
        --with-shipped --name meta_seed_spread_v3
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from gramvl.backbone import load_backbone
from gramvl.engine.protocols import ProtocolConfig, record_path, run_protocol
from gramvl.engine.results import markdown_table, versions
from gramvl.gram.cmhc import CMHCConfig
from gramvl.gram.meta import MetaConfig
from gramvl.gram.pipeline import MetaTrainJob, run_meta_train
from gramvl.io import write_json, write_text

OUT = Path(__file__).resolve().parents[1] / "docs" / "results"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def b2n(bb, work: Path, label: str, gram: str | None, seeds: list[int], epochs: int | None) -> dict:
    p = ProtocolConfig(protocol="base2new", method="coop", datasets=["emoji-nature"], seeds=seeds, shots=[16],
                       out=str(work / label), epochs=epochs, gram=gram)
    summary = run_protocol(p, progress=False, bb=bb)
    per_seed = []
    for s in seeds:
        rec = json.loads(record_path(work / label, "emoji-nature", 16, s).read_text())
        per_seed.append(100 * rec["metrics"]["hm"])
    a = summary["average"]
    return {"base": 100 * a["base"], "new": 100 * a["new"], "hm": 100 * a["hm"], "hm_per_seed": per_seed}


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--meta-seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, nargs="+", default=[2],
                    help="CPU thread counts; every meta-seed is meta-trained and evaluated with each")
    ap.add_argument("--steps", type=int, default=600, help="meta-steps")
    ap.add_argument("--epochs", type=int, default=None, help="CoOp epochs (default: the host's schedule)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="downstream (few-shot) seeds")
    ap.add_argument("--kmeans", choices=["torch", "faiss"], default="faiss",
                    help="CMHC's k-means (a clean clone without gramvl[scale] uses torch)")
    ap.add_argument("--with-shipped", action="store_true",
                    help="add a reference row: the shipped artifact (--gram default), outside the spread")
    ap.add_argument("--work", default="runs/meta_seed_spread")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--name", default="meta_seed_spread")
    args = ap.parse_args()
    t0 = time.time()
    work = Path(args.work) / args.name
    bb = load_backbone("small")
    torch.set_num_threads(args.threads[0])
    base = b2n(bb, work, "coop", None, args.seeds, args.epochs)
    print(f"CoOp: {base}", flush=True)
    arts, rows = [], []
    for ms in args.meta_seeds:
        for th in args.threads:
            torch.set_num_threads(th)
            art = work / f"gram_ms{ms}_t{th}.safetensors"
            if not art.is_file():
                job = MetaTrainJob(meta=MetaConfig(host="coop", steps=args.steps, seed=ms),
                                   cmhc=replace(CMHCConfig(), use_faiss=args.kmeans == "faiss"))
                run_meta_train(job, art, bb=bb, progress=False)
            side = json.loads(art.with_suffix(".json").read_text())
            digest = sha256(art)
            r = b2n(bb, work, f"gram_{digest[:12]}", str(art), args.seeds, args.epochs)
            r.update({"meta_seed": ms, "threads": th, "artifact": str(art), "sha256": digest,
                      "steps_done": side["steps_done"], "kmeans_backend": side["kmeans_backend"],
                      "corpus_features_sha256": side.get("corpus_features_sha256")})
            arts.append(r)
            print(f"meta-seed {ms}, {th} thread(s): {r}", flush=True)
            rows.append([str(ms), str(th), digest[:12], f"{r['base']:.2f}", f"{r['new']:.2f}", f"{r['hm']:.2f}",
                         " / ".join(f"{h:.2f}" for h in r["hm_per_seed"]), f"{r['hm'] - base['hm']:+.2f}"])
    shipped = None
    if args.with_shipped:
        torch.set_num_threads(args.threads[0])
        from gramvl.gram.attach import resolve_artifact

        path = resolve_artifact("default")
        shipped = b2n(bb, work, "gram_shipped", "default", args.seeds, args.epochs)
        shipped.update({"artifact": str(path.name), "sha256": sha256(path)})
        print(f"shipped artifact: {shipped}", flush=True)
    hms = [r["hm"] for r in arts]
    m, s = mean_std(hms)
    # the downstream seeds' spread of one artifact, averaged over the artifacts (what the tables' ± measure)
    within = statistics.fmean(mean_std(r["hm_per_seed"])[1] for r in arts) if len(args.seeds) > 1 else None
    summary = {"hm_mean": m, "hm_std_over_artifacts": s, "hm_min": min(hms), "hm_max": max(hms),
               "coop_hm": base["hm"], "gain_mean": m - base["hm"],
               "artifacts_over_coop": sum(h > base["hm"] for h in hms), "artifacts": len(hms),
               "within_artifact_std_over_seeds": within}
    cmd = (f"python benchmarks/meta_seed_spread.py --meta-seeds {' '.join(map(str, args.meta_seeds))} --threads "
           f"{' '.join(map(str, args.threads))} --steps {args.steps}"
           + (f" --epochs {args.epochs}" if args.epochs else "")
           + f" --seeds {' '.join(map(str, args.seeds))} --kmeans {args.kmeans} --name {args.name}")
    if shipped:
        cmd += " --with-shipped"
    record = {"command": cmd, "coop": base, "gram": arts, "shipped": shipped, "summary": summary, "versions": versions(),
              "seconds": time.time() - t0}
    out = Path(args.out)
    write_json(out / f"{args.name}.json", record)
    rows.append(["**all**", "", f"{len(hms)} artifacts", "", "", f"**{m:.2f} ± {s:.2f}**",
                 f"min {min(hms):.2f}, max {max(hms):.2f}", f"{m - base['hm']:+.2f}"])
    if shipped:
        rows.append([f"shipped `{shipped['artifact']}`", "", shipped["sha256"][:12], f"{shipped['base']:.2f}",
                     f"{shipped['new']:.2f}", f"{shipped['hm']:.2f}",
                     " / ".join(f"{h:.2f}" for h in shipped["hm_per_seed"]), f"{shipped['hm'] - base['hm']:+.2f}"])
    md = ["# GRAM's spread over meta-training runs\n\n",
          f"Base-to-new CoOp (M = 16) + GRAM on emoji-nature, 16 shots, downstream seeds "
          f"{', '.join(map(str, args.seeds))}, CoOp {'for ' + str(args.epochs) + ' epochs' if args.epochs else 'with its schedule'}"
          f"; each row is one artifact meta-trained for {args.steps} steps ({args.kmeans} k-means) with the meta-seed "
          f"and CPU thread count of its row. Plain CoOp with the same seeds: base {base['base']:.2f}, new "
          f"{base['new']:.2f}, **HM {base['hm']:.2f}** (per seed: "
          + " / ".join(f"{h:.2f}" for h in base["hm_per_seed"]) + ").\n\n",
          markdown_table(["meta-seed", "threads", "artifact sha256", "base", "new", "HM", "HM per seed",
                          "HM - CoOp"], rows),
          f"\n{summary['artifacts_over_coop']} of {len(hms)} artifacts beat plain CoOp's HM. "
          + (f"The spread over the downstream seeds of one artifact (the ± of the other tables), averaged over "
             f"the artifacts: {within:.2f}.\n" if within is not None else "\n"),
          f"\nCommand: `{cmd}`; wall time {time.time() - t0:.0f} s; gramvl commit {record['versions']['git_commit']}.\n"]
    write_text(out / f"{args.name}.md", "".join(md))


if __name__ == "__main__":
    main()
