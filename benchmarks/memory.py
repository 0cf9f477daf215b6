"""Peak memory of one training step with many classes on the real ViT-B/16 architecture (random init, CPU):
a CoOp step (the text encoder runs over every class once) and a GRAM meta-training step (gramvl/gram/meta.py:
a second-order inner step through the text encoder, then the query and shifted-query losses through the
adapted context, backward to θ and ψ).

Each configuration runs in a fresh subprocess; peak resident memory (ru_maxrss) minus the process's memory
after loading the model is the step's working memory. Rows are merged into docs/results/memory.json by
configuration (a re-run replaces its rows, others are kept), and docs/results/memory.md is rebuilt.

    python benchmarks/memory.py                                    # every row (about 40 min on 2 cores)
    python benchmarks/memory.py --rows meta --classes 100 1000     # only the GRAM meta-step rows
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results" / "memory.json"
RAM_MB = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20

CHILD = r"""
import json, resource, sys, time, torch
torch.set_num_threads(2)
sys.path.insert(0, sys.argv[2])  # benchmarks/: memsteps
from gramvl.backbone import load_backbone
from gramvl.prompts import build_host
from memsteps import gram_meta_step, use_peer_text_encoding
cfg = json.loads(sys.argv[1])
classes, chunk, ckpt, naive = cfg["classes"], cfg["chunk"], cfg["checkpoint"], cfg["naive_77_tokens"]
bb = load_backbone("ViT-B-16", allow_random=True)
names = [f"object category number {i}" for i in range(classes)]
host = build_host("coop", bb, names, {"n_ctx": 16, "text_chunk": chunk, "checkpoint_text": ckpt})
if naive:  # what the peers do: the full 77-token sequence for every class, one pass (no packing)
    use_peer_text_encoding(bb)
g = torch.Generator().manual_seed(0)
def batch():
    f = torch.nn.functional.normalize(torch.randn(32, bb.embed_dim, generator=g), dim=-1)
    return {"features": f}, torch.randint(0, classes, (32,), generator=g)
if cfg["mode"] == "meta":
    meta_step = gram_meta_step(host, batch, [f"other thing number {i}" for i in range(classes)], cfg["second_order"])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.time()
if cfg["mode"] == "meta":
    grad, psi = meta_step()
    extra = {"psi_grad_norm": float(sum(p.grad.norm() ** 2 for p in psi.parameters() if p.grad is not None) ** 0.5)}
else:
    f, y = batch()
    host.backward(f, y)
    grad = host.slots()["text_ctx"].grad
    extra = {}
dt = time.time() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({**cfg, "step_mb": (peak - base) / 1024, "peak_mb": peak / 1024, "seconds": dt,
                  "grad_norm": float(grad.norm()), **extra}))
"""

LABELS = {"naive": "77-token sequences, one pass (peer style)", "one": "packed prompts, one pass",
          "ckpt": "packed prompts, chunks of 128 classes + activation checkpointing"}


def key(r: dict) -> tuple:
    return (r.get("mode", "coop"), r["classes"], r["chunk"], r["checkpoint"], r["naive_77_tokens"],
            r.get("second_order", True))


def configs(rows: list[str], classes: list[int]) -> list[dict]:
    out = []

    def add(mode, c, chunk, ckpt, naive=False, second_order=True):
        out.append({"mode": mode, "classes": c, "chunk": chunk, "checkpoint": ckpt, "naive_77_tokens": naive,
                    "second_order": second_order})

    for c in classes:
        if "peer" in rows:
            add("coop", c, 100000, False, naive=True)
        if "coop" in rows:
            add("coop", c, 100000, False)
            add("coop", c, 128, True)
        if "meta" in rows:
            add("meta", c, 100000, False)
            add("meta", c, 128, True)
        if "meta-first-order" in rows:
            add("meta", c, 128, True, second_order=False)
    return out


def estimate_mb(cfg: dict, known: list[dict]) -> float | None:
    """Linear-in-classes estimate of a row's step memory from a measured row of the same kind."""
    same = [r for r in known if key(r)[:1] + key(r)[2:] == key(cfg)[:1] + key(cfg)[2:] and "step_mb" in r]
    if not same:
        return None
    r = max(same, key=lambda r: r["classes"])
    return r["step_mb"] * cfg["classes"] / r["classes"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--classes", nargs="+", type=int, default=[100, 1000])
    ap.add_argument("--rows", nargs="+", default=["peer", "coop", "meta", "meta-first-order"],
                    choices=["peer", "coop", "meta", "meta-first-order"])
    ap.add_argument("--headroom", type=float, default=0.8,
                    help="skip a row whose estimated memory exceeds this share of the machine's RAM")
    args = ap.parse_args()
    old = json.loads(RESULTS.read_text())["results"] if RESULTS.is_file() else []
    merged = {key(r): r for r in old}
    t0 = time.time()
    for cfg in configs(args.rows, args.classes):
        est = estimate_mb(cfg, list(merged.values()))
        if est is not None and est > args.headroom * RAM_MB:
            merged[key(cfg)] = {**cfg, "not_run": f"estimated {est / 1024:.0f} GB (linear in classes from the "
                                f"largest measured row) exceeds {args.headroom:.0%} of this machine's "
                                f"{RAM_MB / 1024:.0f} GB RAM"}
            print(merged[key(cfg)], flush=True)
            continue
        out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg), str(ROOT / "benchmarks")], capture_output=True, text=True,
                             timeout=3600)
        if out.returncode != 0:
            raise SystemExit(out.stderr[-2000:])
        r = json.loads(out.stdout.strip().splitlines()[-1])
        r["loadavg_1min"] = round(os.getloadavg()[0], 2)
        merged[key(cfg)] = r
        print({k: r[k] for k in ("mode", "classes", "checkpoint", "step_mb", "seconds")}, flush=True)
    write(sorted(merged.values(), key=lambda r: (r.get("mode", "coop") != "coop", r["classes"],
                                                 not r["naive_77_tokens"], r["checkpoint"],
                                                 not r.get("second_order", True))),
          time.time() - t0, " ".join(sys.argv[1:]))


def write(results: list[dict], seconds: float, argv: str) -> None:
    from gramvl.engine.results import markdown_table, versions
    from gramvl.io import write_json, write_text

    rows = {"coop": [], "meta": []}
    for r in results:
        mode = r.get("mode", "coop")
        label = LABELS["naive" if r["naive_77_tokens"] else "ckpt" if r["checkpoint"] else "one"]
        if mode == "meta":
            label = ("second order" if r.get("second_order", True) else "first order") + ", " + label
        cells = ([f"{r['step_mb']:.0f}", f"{r['seconds']:.1f}"] if "step_mb" in r else ["not run", r["not_run"]])
        rows[mode].append([r["classes"], label, *cells])
    cmd = "python benchmarks/memory.py" + (f" {argv}" if argv else "")
    write_json(RESULTS, {"results": results, "versions": versions(), "command": cmd,
                         "last_run_seconds": round(seconds)})
    md = ["# Memory of one training step with many classes (ViT-B/16 architecture, random init, CPU)\n\n",
          "'step MB' is the peak resident memory of the step above the memory after loading the model "
          "(ru_maxrss, fresh process per row). CPU fp32 activations are the same size as on a GPU in fp32; "
          "fp16/bf16 autocast halves them. Times are on this project's 2-core CPU machine, shared with other "
          "jobs (the load is in memory.json), so they are indicative only.\n\n",
          "Text encoding: 'packed prompts' is gramvl's default for a context shared by all classes "
          "(`Backbone.prompted_text_features(pack=True)`: the [SOT] + context prefix is encoded once per packed "
          "sequence of several classes, sequences cut after the last EOT; exact); 'peer style' is one padded "
          "77-token sequence per class in one pass, as the official CoOp code does.\n\n",
          "## CoOp step\n\nOne training step of CoOp (16 context tokens, batch 32 of cached image features): the "
          "text encoder runs over every class.\n\n",
          markdown_table(["classes", "text encoding", "step MB", "step s"], rows["coop"]),
          "\n## GRAM meta-training step\n\nOne task of `gramvl.gram.meta` with CoOp as host (16 context tokens, "
          "ψ of rank 32): an inner step on 32 support features (second order: the gradient graph is kept), "
          "then the query loss (32 features) and the shifted-query loss (32 features, another set of the same "
          "number of class names) through the adapted context, and backward to θ and ψ; so the text encoder "
          "runs over the classes three times, and in second order its backward is differentiated again. "
          "Chunking and checkpointing are the host's `text_chunk` / `checkpoint_text` options, which "
          "meta-training passes through (`--set meta.host_cfg.text_chunk=128 meta.host_cfg.checkpoint_text="
          "true`); in second order the checkpointed inner pass is recomputed inside a backward that is itself "
          "recorded, so checkpointing saves the query passes' activations but not the inner pass's.\n\n",
          markdown_table(["classes", "meta step", "step MB", "step s"], rows["meta"]),
          f"\nCommand: `python benchmarks/memory.py` (every row; rows merge by configuration, this file was last "
          f"updated by `{cmd}`, {seconds:.0f} s).\n"]
    write_text(ROOT / "docs" / "results" / "memory.md", "".join(md))


if __name__ == "__main__":
    main()
