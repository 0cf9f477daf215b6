"""How features that a cache keeps are encoded: the same bytes at any thread count, and how fast.

Before session 15 a cache fill ran each batch on the run's own intra-op threads, so its bytes (and every result
built on them) depended on the thread count of whichever run filled the cache first. `cache_fill_map` runs each
batch on one intra-op thread and uses the run's threads to encode that many batches at once. This benchmark
encodes the test split of each dataset both ways at each run thread count (no cache), times it, and checks which
way gives the same bytes at every thread count.

Writes docs/results/{name}.{json,md}.
    python benchmarks/cache_fill.py [--datasets emoji-objects fashion-mnist] [--threads 1 2] [--repeats 2]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from gramvl.backbone import load_backbone
from gramvl.data.features import image_features
from gramvl.data.registry import get_dataset
from gramvl.engine.results import markdown_table, versions
from gramvl.io import write_json, write_text

OUT = Path(__file__).resolve().parents[1] / "docs" / "results"


@torch.no_grad()
def intra_op(bb, ds, batch_size: int) -> torch.Tensor:
    """The pre-session-15 fill: one batch after another, each on the run's intra-op threads."""
    loader = torch.utils.data.DataLoader(ds.with_transform(bb.transform(False)), batch_size=batch_size,
                                         shuffle=False, num_workers=0)
    return torch.cat([bb.encode_image(x.to(bb.device)).float().cpu() for x, _ in loader])


def batch_parallel(bb, ds, batch_size: int) -> torch.Tensor:
    """gramvl's fill (`cache_fill_map`), the cache off so every call encodes."""
    return image_features(bb, ds, batch_size=batch_size, cache=False, progress=False)[0]


WAYS = {"intra-op threads (before session 15)": intra_op, "batch-parallel, 1 intra-op thread (cache_fill_map)":
        batch_parallel}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="small")
    ap.add_argument("--datasets", nargs="+", default=["emoji-objects", "fashion-mnist"])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per cell; the fastest is reported")
    ap.add_argument("--name", default="cache_fill")
    args = ap.parse_args()
    t0 = time.time()
    bb = load_backbone(args.model)
    bb.eval()
    before = torch.get_num_threads()
    results, rows = [], []
    for name in args.datasets:
        ds = get_dataset(name, "test")
        first = None  # the intra-op fill at the first thread count: what every other fill is compared with
        for way, fn in WAYS.items():
            feats, secs = {}, {}
            for th in args.threads:
                torch.set_num_threads(th)
                times = []
                for _ in range(args.repeats):
                    t = time.time()
                    feats[th] = fn(bb, ds, args.batch_size)
                    times.append(time.time() - t)
                secs[th] = min(times)
            torch.set_num_threads(before)
            first = feats[args.threads[0]] if first is None else first
            differ = {th: int(((feats[th] - first).abs().amax(1) > 0).sum()) for th in args.threads}
            rec = {"dataset": name, "images": len(ds), "way": way, "seconds": secs,
                   "rows_differing_from_the_intra_op_fill_at_the_first_thread_count": differ}
            results.append(rec)
            rows.append([name, len(ds), way] + [f"{secs[th]:.1f}" for th in args.threads]
                        + [f"{differ[th]} of {len(ds)}" for th in args.threads])
    # the batch-parallel fill against the intra-op one at each thread count
    ratios = []
    for name in args.datasets:
        a, b = (r for r in results if r["dataset"] == name)
        ratios.append([name] + [f"{a['seconds'][th] / b['seconds'][th]:.2f}" for th in args.threads])
    wall = time.time() - t0
    cmd = "python benchmarks/cache_fill.py " + " ".join(
        [f"--datasets {' '.join(args.datasets)}", f"--threads {' '.join(map(str, args.threads))}",
         f"--batch-size {args.batch_size}", f"--repeats {args.repeats}", f"--name {args.name}"])
    write_json(OUT / f"{args.name}.json", {"config": vars(args), "results": results, "versions": versions(),
                                            "seconds": round(wall, 1), "command": cmd})
    th_cols = [f"seconds at {th} thread(s)" for th in args.threads]
    th_cols += [f"rows differing at {th} thread(s)" for th in args.threads]
    md = [f"# Encoding the features a cache keeps: thread count and speed (model `{args.model}`)\n",
          f"Test splits, batch size {args.batch_size}, the cache off; each time is the fastest of {args.repeats} "
          f"runs. 'Rows differing': rows of the features that differ in any bit from the intra-op fill's at "
          f"{args.threads[0]} thread(s). gramvl fills every cache the batch-parallel way (`gramvl.paths.cache_fill_map`).\n",
          markdown_table(["dataset", "images", "way"] + th_cols, rows), "",
          "Time of the intra-op fill over the batch-parallel one (above 1: the batch-parallel fill is faster):\n",
          markdown_table(["dataset"] + [f"at {th} thread(s)" for th in args.threads], ratios), "",
          f"Command: `{cmd}`; wall time {wall:.0f} s."]
    write_text(OUT / f"{args.name}.md", "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
