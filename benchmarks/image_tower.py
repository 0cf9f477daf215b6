"""Image-tower speed: open_clip's own forward against gramvl's direct block path (`gramvl/backbone.py`
`_run_blocks` / `_block_sdpa`), side by side in one process, rounds interleaved.

Two workloads per model: frozen encoding without grad (feature caches, TPT's 64 views) and a VPT step
(forward + backward to 8 shallow visual prompts). The same weights, the same inputs; the largest difference
between the two paths' normalized features is reported with the timings.

    python benchmarks/image_tower.py --models small ViT-B-16 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from gramvl.backbone import load_backbone
from gramvl.engine.results import command_line, markdown_table, versions
from gramvl.io import write_json, write_text

OUT = Path(__file__).resolve().parents[1] / "docs" / "results"


def _openclip_vpt(bb, x, prompts):
    """The reference: open_clip's blocks called as modules, prompts appended after the patch tokens."""
    v = bb.model.visual
    h = torch.cat([v._embeds(x), prompts.expand(x.shape[0], -1, -1)], 1)
    h = v.transformer(h)[:, : h.shape[1] - prompts.shape[0]]
    pooled, _ = v._pool(h)
    return F.normalize(pooled @ v.proj, dim=-1)


def bench(model: str, batch: int, rounds: int) -> dict:
    bb = load_backbone(model, allow_random=True)
    torch.manual_seed(0)
    x = torch.randn(batch, 3, bb.image_size, bb.image_size)
    prompts = (0.02 * torch.randn(8, bb.vision_width)).requires_grad_(True)

    def enc_ref():
        with torch.no_grad():
            return F.normalize(bb.model.encode_image(x), dim=-1)

    def enc_ours():
        with torch.no_grad():
            return bb.encode_image(x)

    def vpt_ref():
        out = _openclip_vpt(bb, x, prompts)
        out.sum().backward()
        return out.detach()

    def vpt_ours():
        out = bb.encode_image(x, prompts=prompts)
        out.sum().backward()
        return out.detach()

    res = {}
    for name, ref, ours in (("encode (no grad)", enc_ref, enc_ours), ("VPT step (fwd+bwd)", vpt_ref, vpt_ours)):
        diff = (ref() - ours()).abs().max().item()
        tr, to = [], []
        for _ in range(rounds):
            t = time.perf_counter()
            ref()
            tr.append(time.perf_counter() - t)
            t = time.perf_counter()
            ours()
            to.append(time.perf_counter() - t)
        res[name] = {"openclip_s": statistics.median(tr), "gramvl_s": statistics.median(to),
                     "speedup": statistics.median(tr) / statistics.median(to), "max_abs_diff": diff,
                     "openclip_all": tr, "gramvl_all": to}
    return {"model": model, "ident": bb.ident, "batch": batch, "results": res}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["small", "ViT-B-16"])
    ap.add_argument("--batch", type=int, nargs="+", default=[512, 16], help="batch per model")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--name", default="image_tower")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    runs = [bench(m, b, args.rounds) for m, b in zip(args.models, args.batch, strict=True)]
    rows = []
    for r in runs:
        for work, v in r["results"].items():
            rows.append([r["model"] + (" (random init)" if r["model"] != "small" else " (packaged)"), work,
                         r["batch"], f"{v['openclip_s']:.3f}", f"{v['gramvl_s']:.3f}", f"**{v['speedup']:.2f}x**",
                         f"{v['max_abs_diff']:.1e}"])
    load = " ".join(f"{x:.1f}" for x in __import__("os").getloadavg())
    cmd = command_line()
    record = {"runs": runs, "threads": args.threads, "rounds": args.rounds, "command": cmd,
              "load_average_end": load, "versions": versions(), "seconds": time.time() - t0}
    write_json(OUT / f"{args.name}.json", record)
    md = ["# Image tower: open_clip forward vs gramvl's direct block path\n\n",
          f"Median seconds over {args.rounds} interleaved rounds, {args.threads} CPU thread(s), fp32, one process "
          "(the same weights and inputs for both). `max |diff|`: largest difference of the normalized "
          "features of the two paths.\n\n",
          markdown_table(["model", "workload", "batch", "open_clip s", "gramvl s", "speedup", "max |diff|"], rows),
          f"\nCommand: `{cmd}`; load average at the end {load} (2 cores); gramvl commit "
          f"{record['versions']['git_commit']}.\n"]
    write_text(OUT / f"{args.name}.md", "".join(md))
    print("".join(md))


if __name__ == "__main__":
    main()
