"""Peak GPU memory and step time of prompt tuning with many classes on the ViT-B/16 architecture (random init).

The GPU counterpart of benchmarks/memory.py (which measures CPU resident memory): one training step of a
host (forward, loss, backward through the frozen towers into the prompt slots) on 1000 class names, with
the optimizer's memory left out (it holds only the prompt slots). Each configuration runs in a fresh
subprocess: the peak is `torch.cuda.max_memory_allocated` during the step, minus what the model and the
inputs hold before it ('step GB'), and with them ('peak GB'). The time is the median of `--repeats` timed
steps after one warm-up step (CUDA synchronised).

Rows: CoOp with the text encoding the peers use (one padded 77-token sequence per class, one pass) and with
gramvl's packed prompts (one pass; chunks of 128 classes with activation checkpointing); CoCoOp (batch 1,
its paper recipe, and batch 4); VPT deep and MaPLe on a batch of 32 images at 224 px; a second-order GRAM
meta-step with CoOp as host; each in fp32 and under bf16 autocast (the engine's `--precision bf16`).

    python benchmarks/memory_gpu.py --out docs/results          # needs a CUDA GPU
    python benchmarks/memory_gpu.py --render docs/results/memory_gpu.json   # rebuild the table only
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import gc, json, statistics, sys, time, torch
sys.path.insert(0, sys.argv[2])  # benchmarks/: memsteps
from gramvl.backbone import load_backbone
from gramvl.prompts import build_host
from memsteps import gram_meta_step, restore_text_encoding, use_peer_text_encoding
todo = json.loads(sys.argv[1])
dev = todo[0].get("device", "cuda")
cuda = dev.startswith("cuda")
sync = torch.cuda.synchronize if cuda else (lambda: None)
allocated = torch.cuda.memory_allocated if cuda else (lambda: 0)
bb = load_backbone("ViT-B-16", allow_random=True, device=dev)  # frozen by Backbone
def run(cfg):
    classes, host_name = cfg["classes"], cfg["host"]
    names = [f"object category number {i}" for i in range(classes)]
    over = {"text_chunk": cfg["chunk"], "checkpoint_text": cfg["checkpoint"]}
    if host_name == "coop":
        over["n_ctx"] = 16
    host = build_host(host_name, bb, names, over).to(dev)
    plain = use_peer_text_encoding(bb) if cfg["naive_77_tokens"] else None
    g = torch.Generator().manual_seed(0)

    def batch():
        b = cfg["batch"]
        y = torch.randint(0, classes, (b,), generator=g).to(dev)
        if host.image_side_frozen:
            f = torch.nn.functional.normalize(torch.randn(b, bb.embed_dim, generator=g), dim=-1)
            return {"features": f.to(dev)}, y
        return {"images": torch.randn(b, 3, bb.image_size, bb.image_size, generator=g).to(dev)}, y

    def amp():
        kind = torch.device(dev).type
        if cfg["precision"] == "bf16":
            return torch.autocast(kind, dtype=torch.bfloat16)
        return torch.autocast(kind, enabled=False)

    if cfg["mode"] == "meta":
        meta_step = gram_meta_step(host, batch, [f"other thing number {i}" for i in range(classes)],
                                   cfg["second_order"], amp)

        def step():
            return meta_step()[0]
    else:
        data = batch()

        def step():
            host.zero_grad(set_to_none=True)
            with amp():
                host.backward(*data)
            return next(p.grad for p in host.parameters() if p.requires_grad and p.grad is not None)
    sync()
    base = allocated()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    grad = step()  # warm-up; also the measured peak of one step
    sync()
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    times = []
    for _ in range(cfg["repeats"]):
        sync(); t0 = time.perf_counter()
        grad = step()
        sync(); times.append(time.perf_counter() - t0)
    out = {**cfg, "base_gb": base / 2**30, "peak_gb": peak / 2**30, "step_gb": (peak - base) / 2**30,
           "reserved_gb": torch.cuda.max_memory_reserved() / 2**30 if cuda else 0, "step_s": statistics.median(times),
           "grad_finite": bool(torch.isfinite(grad.float()).all()), "grad_norm": float(grad.float().norm()),
           "gpu": torch.cuda.get_device_name() if cuda else "cpu (dry run)", "torch": torch.__version__}
    if plain is not None:
        restore_text_encoding(bb, plain)
    return out

for cfg in todo:
    print("START " + json.dumps(cfg), flush=True)
    print("RESULT " + json.dumps(run(cfg)), flush=True)
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
"""


def configs(classes: list[int], repeats: int, device: str) -> list[dict]:
    out = []

    def add(host, c, batch, chunk=100000, ckpt=False, naive=False, mode="train", precision="fp32"):
        out.append({"mode": mode, "host": host, "classes": c, "batch": batch, "chunk": chunk, "checkpoint": ckpt,
                    "naive_77_tokens": naive, "precision": precision, "second_order": True, "repeats": repeats,
                    "device": device})

    for c in classes:
        for prec in ("fp32", "bf16"):
            add("coop", c, 32, precision=prec)
            add("coop", c, 32, chunk=128, ckpt=True, precision=prec)
            add("cocoop", c, 1, precision=prec)
            add("cocoop", c, 4, precision=prec)
            add("vpt", c, 32, precision=prec)
            add("maple", c, 32, precision=prec)
            add("coop", c, 32, mode="meta", precision=prec)
            add("coop", c, 32, chunk=128, ckpt=True, mode="meta", precision=prec)
        for prec in ("fp32", "bf16"):  # last: the largest, and the most likely to run out of memory
            add("coop", c, 32, naive=True, precision=prec)
    return out


def label(r: dict) -> str:
    if r["mode"] == "meta":
        what = "GRAM meta-step (CoOp host, second order)"
    else:
        what = {"coop": "CoOp (M=16)", "cocoop": "CoCoOp (M=4)", "vpt": "VPT deep", "maple": "MaPLe"}[r["host"]]
    text = ("77-token sequences, one pass (peer style)" if r["naive_77_tokens"] else
            "packed, chunks of 128 + checkpointing" if r["checkpoint"] else "packed, one pass")
    return what, text


def render(records: list[dict], out: Path, argv: str, seconds: float, note: str = "") -> None:
    from gramvl.engine.results import markdown_table
    from gramvl.io import write_json, write_text

    rows = []
    for r in records:
        what, text = label(r)
        if "error" in r:
            cells = ["failed: " + r["error"].strip().splitlines()[-1][:120], "", "", ""]
        else:
            cells = [f"{r['step_gb']:.2f}", f"{r['peak_gb']:.2f}", f"{r['step_s'] * 1000:.0f}",
                     "yes" if r["grad_finite"] else "NO"]
        rows.append([what, r["classes"], r["batch"], text, r["precision"], *cells])
    gpu = next((r["gpu"] for r in records if "gpu" in r), "?")
    tv = next((r["torch"] for r in records if "torch" in r), "?")
    md = (f"# GPU memory of prompt tuning with many classes (ViT-B/16 architecture, random init)\n\n"
          f"One training step on {gpu}, torch {tv}, one configuration per fresh process. 'step GB' is the peak of "
          "`torch.cuda.max_memory_allocated` during the step minus the memory held before it (model and "
          "inputs); 'peak GB' includes them. Time: median of timed steps after a warm-up step. bf16 = the "
          "engine's `--precision bf16` (autocast). Random weights: memory and time only. The CPU counterpart "
          "(resident memory) is memory.md.\n\n"
          + markdown_table(["host / step", "classes", "batch", "text encoding", "precision", "step GB",
                            "peak GB", "step ms", "finite grads"], rows)
          + f"\n\nTarget (issue 3): 1000-class prompt tuning under 12 GB on a GPU.\n\n{note + chr(10) * 2 if note else ''}"
          f"Command: `python benchmarks/memory_gpu.py {argv}` ({seconds:.0f} s).\n")
    write_json(out / "memory_gpu.json", {"results": records, "seconds": seconds, "argv": argv, "note": note})
    write_text(out / "memory_gpu.md", md)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", nargs="+", type=int, default=[1000])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="docs/results")
    ap.add_argument("--device", default="cuda", help="cuda; cpu only as a dry run of the harness (no memory)")
    ap.add_argument("--timeout", type=int, default=600, help="seconds for all configurations")
    ap.add_argument("--render", default=None, help="rebuild the table from this JSON only")
    ap.add_argument("--note", default=None, help="with --render: a paragraph under the table")
    args = ap.parse_args()
    out = Path(args.out)
    if args.render:
        d = json.loads(Path(args.render).read_text())
        render(d["results"], out, d["argv"], d["seconds"], args.note if args.note is not None else d.get("note", ""))
        return
    t0 = time.time()
    todo, records = configs(args.classes, args.repeats, args.device), []
    while todo:  # one process runs the configurations in turn (one model); after a crash the rest go on
        try:
            p = subprocess.run([sys.executable, "-c", CHILD, json.dumps(todo), str(Path(__file__).resolve().parent)], capture_output=True, text=True,
                               timeout=args.timeout)
            stdout, err = p.stdout, (p.stderr[-1500:] or f"exit {p.returncode}") if p.returncode else None
        except subprocess.TimeoutExpired as e:
            stdout, err = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), \
                f"timed out after {args.timeout} s"
        done = [json.loads(line[7:]) for line in stdout.splitlines() if line.startswith("RESULT ")]
        records += done
        for r in done:
            print(json.dumps({k: r.get(k) for k in ("host", "mode", "classes", "batch", "precision",
                                                    "naive_77_tokens", "checkpoint", "step_gb", "step_s")}),
                  flush=True)
        todo = todo[len(done):]
        if todo and err is None:
            err = "the process ended before this configuration"
        if todo:  # the configuration it was running failed: record it, go on with the next ones
            records.append({**todo[0], "error": err})
            print(json.dumps({"failed": todo[0], "error": err[-300:]}), flush=True)
            todo = todo[1:]
        render(records, out, " ".join(sys.argv[1:]), time.time() - t0)  # partial results survive a kill

if __name__ == "__main__":
    main()
