"""How downstream prompt tuning uses a CPU's threads: the same prompts at any thread count, and how fast.

Before session 17 every op ran on the run's intra-op threads, and the image tower's float sums depend on that
count, so the prompts that VPT, IVLP, MaPLe and PromptSRC learn differed in the last bits between 1 and 2 threads.
`Trainer(cpu_parallel="rows")` (the default since) cuts each batch into a fixed number of parts that run at once, one
intra-op thread each (gramvl/rows.py). This benchmark trains each host both ways at each thread count on the same
few-shot data (image features of frozen-image hosts come from the cache), times the training, hashes the learned
tensors, and evaluates on the test split.

Writes docs/results/{name}.{json,md}.
    python benchmarks/train_threads.py [--methods coop vpt ivlp maple promptsrc] [--epochs 2] [--threads 1 2]
"""

from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path

import torch

from gramvl.backbone import load_backbone
from gramvl.data.fewshot import sample_few_shot
from gramvl.data.registry import get_dataset
from gramvl.engine.results import environment, markdown_table
from gramvl.engine.train import CPU_PARALLEL, TrainConfig, Trainer, evaluate, resolved_recipe
from gramvl.io import write_json, write_text
from gramvl.prompts import HOSTS, build_host

OUT = Path(__file__).resolve().parents[1] / "docs" / "results"
WAYS = {"intra-op": "every op on the run's threads (before session 17)",
        "rows": "each batch cut into a fixed number of parts, at once, one intra-op thread each (the default)"}
assert set(WAYS) == set(CPU_PARALLEL)


def digest(host) -> str:
    h = hashlib.sha256()
    for k, v in sorted(host.trainable_state().items()):
        h.update(k.encode())
        h.update(v.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="small")
    ap.add_argument("--methods", nargs="+", default=["coop", "vpt", "ivlp", "maple", "promptsrc"])
    ap.add_argument("--dataset", default="emoji-nature")
    ap.add_argument("--shots", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per cell; the fastest is reported")
    ap.add_argument("--name", default="train_threads")
    args = ap.parse_args()
    t0 = time.time()
    bb = load_backbone(args.model)
    train = sample_few_shot(get_dataset(args.dataset, "train"), args.shots, 1)
    test = get_dataset(args.dataset, "test")
    before = torch.get_num_threads()
    results = []
    try:
        for method in args.methods:
            recipe = resolved_recipe(HOSTS[method], TrainConfig(method=method, shots=args.shots, epochs=args.epochs),
                                     bb.ident)
            for way in WAYS:
                for th in args.threads:
                    torch.set_num_threads(th)
                    times, seen = [], set()
                    for _ in range(args.repeats):
                        host = build_host(method, bb, train.classnames, {"seed": 1})
                        t = time.time()
                        Trainer(host, recipe, seed=1, progress=False, cpu_parallel=way).fit(train)
                        times.append(time.time() - t)
                        seen.add(digest(host))
                    if len(seen) != 1:
                        raise SystemExit(f"{method} {way} at {th} threads gave {len(seen)} different results")
                    host.set_classnames(test.classnames)
                    acc = evaluate(host, test)["accuracy"]
                    results.append({"method": method, "way": way, "threads": th, "seconds": round(min(times), 2),
                                    "all_seconds": [round(x, 2) for x in times], "sha256": seen.pop(),
                                    "test_accuracy": acc})
                    print(results[-1], flush=True)
    finally:
        torch.set_num_threads(before)
    rows = []
    by = {(r["method"], r["way"], r["threads"]): r for r in results}
    for method in args.methods:
        same = {w: len({by[method, w, th]["sha256"] for th in args.threads}) == 1 for w in WAYS}
        for way in WAYS:
            secs = [by[method, way, th]["seconds"] for th in args.threads]
            accs = [f"{100 * by[method, way, th]['test_accuracy']:.2f}" for th in args.threads]
            rows.append([method, way, *[f"{s:.1f}" for s in secs], " / ".join(accs),
                         "yes" if same[way] else "**no**"])
    ratios = [[m, *[f"{by[m, 'intra-op', th]['seconds'] / by[m, 'rows', th]['seconds']:.2f}" for th in args.threads]]
              for m in args.methods]
    wall = time.time() - t0
    ths = " ".join(map(str, args.threads))
    cmd = (f"python benchmarks/train_threads.py --methods {' '.join(args.methods)} --dataset {args.dataset} "
           f"--shots {args.shots} --epochs {args.epochs} --threads {ths} --repeats {args.repeats} --name {args.name}")
    write_json(OUT / f"{args.name}.json", {"config": vars(args), "results": results, "environment": environment(),
                                            "seconds": round(wall, 1), "command": cmd})
    th_cols = [f"seconds at {th} thread(s)" for th in args.threads]
    md = [f"# Prompt tuning on the CPU: thread count and speed (model `{args.model}`)\n",
          f"Each host trained {args.epochs} epochs of its own recipe on {args.dataset}, {args.shots} shots, seed 1; "
          f"the time is the training only (fastest of {args.repeats}); 'same prompts': the learned tensors are "
          f"equal bit for bit at {ths} threads. Test accuracy after these few epochs (not a tuned result).\n",
          "\n".join(f"- `{k}`: {v}" for k, v in WAYS.items()) + "\n",
          markdown_table(["method", "cpu_parallel", *th_cols, f"test % at {ths} threads", "same prompts"], rows), "",
          "Time of `intra-op` over `rows` (above 1: `rows` is faster):\n",
          markdown_table(["method", *[f"{th} thread(s)" for th in args.threads]], ratios), "",
          f"Command: `{cmd}`; wall time {wall:.0f} s."]
    write_text(OUT / f"{args.name}.md", "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
