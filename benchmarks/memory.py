"""Peak memory of one CoOp training step with many classes on the real ViT-B/16 architecture (random init).

Each configuration runs in a fresh subprocess; peak resident memory (ru_maxrss) minus the process's memory
after loading the model is the step's working memory. Writes docs/results/memory.{json,md}.

    python benchmarks/memory.py [--classes 100 1000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time, torch
torch.set_num_threads(2)
from gramvl.backbone import load_backbone
from gramvl.prompts import build_host
classes, chunk, ckpt, naive = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4] == "1"
bb = load_backbone("ViT-B-16", allow_random=True)
names = [f"object category number {i}" for i in range(classes)]
host = build_host("coop", bb, names, {"n_ctx": 16, "text_chunk": chunk, "checkpoint_text": ckpt})
if naive:  # what the peers do: the full 77-token sequence for every class, one pass
    bb._text_forward_orig = bb._text_forward
    def full_len(x, eot, pos, deep):
        t = bb._text
        x = x + t.positional_embedding.to(x.dtype)
        from gramvl.backbone import _run_blocks
        x = _run_blocks(t.transformer, x, t.attn_mask, None)
        x = t.ln_final(x)[torch.arange(x.shape[0]), eot]
        return x @ t.text_projection
    bb._text_forward = full_len
feats = torch.nn.functional.normalize(torch.randn(32, bb.embed_dim), dim=-1)
labels = torch.randint(0, classes, (32,))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.time()
loss = host.backward({"features": feats}, labels)
dt = time.time() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
g = host.slots()["text_ctx"].grad
print(json.dumps({"classes": classes, "chunk": chunk, "checkpoint": ckpt, "naive_77_tokens": naive,
                  "step_mb": (peak - base) / 1024, "peak_mb": peak / 1024, "seconds": dt,
                  "grad_norm": float(g.norm())}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--classes", nargs="+", type=int, default=[100, 1000])
    args = ap.parse_args()
    configs = []
    for c in args.classes:
        if c <= 200:  # the peer-style full-length pass needs ~25 MB per class: 1000 classes exceed this 24 GB box
            configs.append((c, 100000, False, True))
        configs += [(c, 100000, False, False), (c, 128, True, False)]
    rows, results = [], []
    t0 = time.time()
    for classes, chunk, ckpt, naive in configs:
        out = subprocess.run([sys.executable, "-c", CHILD, str(classes), str(chunk), "1" if ckpt else "0",
                              "1" if naive else "0"], capture_output=True, text=True, timeout=1800)
        if out.returncode != 0:
            raise SystemExit(out.stderr[-2000:])
        r = json.loads(out.stdout.strip().splitlines()[-1])
        results.append(r)
        label = ("77-token sequences, one pass (peer style)" if naive else
                 "cut after EOT, chunks of 128 + activation checkpointing" if ckpt else "cut after EOT, one pass")
        rows.append([classes, label, f"{r['step_mb']:.0f}", f"{r['seconds']:.1f}"])
        print(rows[-1], flush=True)
    from gramvl.engine.results import markdown_table, versions
    from gramvl.io import write_json, write_text

    write_json(ROOT / "docs" / "results" / "memory.json",
               {"results": results, "versions": versions(), "command": "python benchmarks/memory.py"})
    md = ["# Memory of one CoOp step with many classes (ViT-B/16 architecture, random init, CPU)\n\n",
          "One training step of CoOp (16 context tokens, batch 32 of cached image features): the text encoder "
          "runs over every class. 'step MB' is the peak resident memory of the step above the memory after "
          "loading the model (ru_maxrss, fresh process per row). CPU fp32 activations are the same size as on "
          "a GPU in fp32; fp16/bf16 autocast halves them.\n\n",
          markdown_table(["classes", "text encoding", "step MB", "step s"], rows),
          f"\nCommand: `python benchmarks/memory.py`; {time.time() - t0:.0f} s on 2 CPU cores.\n"]
    write_text(ROOT / "docs" / "results" / "memory.md", "".join(md))


if __name__ == "__main__":
    main()
