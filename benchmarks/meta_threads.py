"""How meta-training uses a CPU's threads: the same artifact at any thread count, and how fast.

Before session 16 each meta-task ran after the other, every op on the run's intra-op threads, so the artifact's
last bits (which the bi-level loop amplifies) depended on the thread count: the demo's GRAM row read 18.55 at 2
threads and 17.91 at 1. `meta.cpu_parallel="tasks"` (the default since) runs the meta-batch's tasks at once, one
intra-op thread each, and sums their gradients in task order. This benchmark meta-trains the same recipe both
ways at each thread count (the corpus features and the hierarchy come from the cache, so only the loop is timed
apart from a second or so of loading), times it, and hashes each artifact's tensors.

Writes docs/results/{name}.{json,md}.
    python benchmarks/meta_threads.py [--host coop] [--steps 100] [--threads 1 2] [--repeats 2]
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import tempfile
import time
from pathlib import Path

import torch

from gramvl.backbone import load_backbone
from gramvl.engine.results import environment, markdown_table
from gramvl.gram.meta import CPU_PARALLEL, MetaConfig
from gramvl.gram.pipeline import MetaTrainJob, run_meta_train
from gramvl.io import write_json, write_text

OUT = Path(__file__).resolve().parents[1] / "docs" / "results"
WAYS = {"intra-op": "one task after another, each op on the run's threads (before session 16)",
        "tasks": "the meta-batch's tasks at once, one intra-op thread each (the default)"}
assert set(WAYS) == set(CPU_PARALLEL)


def tensor_digest(path: Path) -> str:
    """sha256 of the artifact's tensors (the .safetensors file; the JSON sidecar holds timings)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="small")
    ap.add_argument("--host", default="coop")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per cell; the fastest is reported")
    ap.add_argument("--name", default="meta_threads")
    args = ap.parse_args()
    t0 = time.time()
    bb = load_backbone(args.model)
    before = torch.get_num_threads()
    work = Path(tempfile.mkdtemp(prefix="gramvl-meta-threads-"))
    results, rows, digests = [], [], {}
    try:
        for way in WAYS:
            for th in args.threads:
                torch.set_num_threads(th)
                times, seen = [], set()
                for r in range(args.repeats):
                    out = work / f"{way}_{th}_{r}.safetensors"
                    cfg = MetaConfig(host=args.host, steps=args.steps, cpu_parallel=way)
                    t = time.time()
                    run_meta_train(MetaTrainJob(model=args.model, meta=cfg), out, bb=bb, progress=False)
                    times.append(time.time() - t)
                    seen.add(tensor_digest(out))
                if len(seen) != 1:  # the same run twice must give the same artifact
                    raise SystemExit(f"{way} at {th} threads gave {len(seen)} different artifacts: {sorted(seen)}")
                digests[way, th] = seen.pop()
                results.append({"way": way, "threads": th, "seconds": round(min(times), 2),
                                "all_seconds": [round(x, 2) for x in times], "artifact_sha256": digests[way, th]})
    finally:
        torch.set_num_threads(before)
        shutil.rmtree(work, ignore_errors=True)
    ref = digests["intra-op", args.threads[0]]
    for rec in results:
        rec["same_artifact_as_intra_op_at_first_thread_count"] = rec["artifact_sha256"] == ref
        rows.append([rec["way"], rec["threads"], f"{rec['seconds']:.1f}", rec["artifact_sha256"],
                     "yes" if rec["same_artifact_as_intra_op_at_first_thread_count"] else "no"])
    secs = {(r["way"], r["threads"]): r["seconds"] for r in results}
    ratios = [[th, f"{secs['intra-op', th] / secs['tasks', th]:.2f}"] for th in args.threads]
    wall = time.time() - t0
    cmd = "python benchmarks/meta_threads.py " + " ".join(
        [f"--host {args.host}", f"--steps {args.steps}", f"--threads {' '.join(map(str, args.threads))}",
         f"--repeats {args.repeats}", f"--name {args.name}"])
    write_json(OUT / f"{args.name}.json", {"config": vars(args), "results": results, "environment": environment(),
                                            "seconds": round(wall, 1), "command": cmd})
    md = [f"# Meta-training on the CPU: thread count and speed (model `{args.model}`, host `{args.host}`)\n",
          f"`gramvl meta-train` with the default recipe for {args.steps} meta-steps (meta-batch "
          f"{MetaConfig().meta_batch}), corpus features and hierarchy from the cache; each time is the fastest of "
          f"{args.repeats} runs, and every repeat gave the same artifact. 'Same artifact': the tensors are "
          f"identical, bit for bit, to those of the intra-op loop at {args.threads[0]} thread(s).\n",
          "\n".join(f"- `{k}`: {v}" for k, v in WAYS.items()) + "\n",
          markdown_table(["meta.cpu_parallel", "threads", "seconds", "artifact sha256", "same artifact"], rows), "",
          "Time of the intra-op loop over the task-parallel one (above 1: task-parallel is faster):\n",
          markdown_table(["threads", "intra-op / tasks"], ratios), "",
          f"Command: `{cmd}`; wall time {wall:.0f} s."]
    write_text(OUT / f"{args.name}.md", "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
