"""Does a logit scale of 100 (CLIP's) make the small CLIP more worth adapting? The packaged model side by side
with the same weights and only its logit scale set to S: zero-shot (identical accuracy by construction, a
check), CoOp and CoOp (M = 4, "a photo of a") at 16 and 1 shots, and base-to-new, with the hosts' recipes.

Writes runs/scale_adaptation/small_scale<S>.safetensors and docs/results/<name>.{json,md}.
    python benchmarks/scale_adaptation.py --scale 100 --datasets emoji-nature --seeds 1 2 3
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from gramvl.backbone import load_backbone, small_model_paths
from gramvl.engine.protocols import ProtocolConfig, run_protocol
from gramvl.engine.results import command_line, markdown_table, versions
from gramvl.engine.train import TrainConfig, resolved_recipe
from gramvl.io import load_tensors, save_tensors, write_json, write_text
from gramvl.prompts import HOSTS

ROOT = Path(__file__).resolve().parents[1]
M4 = {"n_ctx": 4, "ctx_init": "a photo of a"}
# (label, protocol, method, shots, host options)
SETTINGS = [
    ("zero-shot, all classes", "fewshot", "zeroshot", 16, {}),
    ("CoOp (M = 16), 16 shots", "fewshot", "coop", 16, {}),
    ("CoOp (M = 4, 'a photo of a'), 16 shots", "fewshot", "coop", 16, M4),
    ("CoOp (M = 4, 'a photo of a'), 1 shot", "fewshot", "coop", 1, M4),
    ("base-to-new CoOp (M = 16)", "base2new", "coop", 16, {}),
    ("base-to-new CoOp (M = 4, 'a photo of a')", "base2new", "coop", 16, M4),
]


def rescaled(model: str, scale: float, out: Path) -> Path:
    """The packaged small CLIP's file with only its logit scale replaced."""
    src, _ = small_model_paths(model)
    tensors, meta = load_tensors(src)
    tensors = dict(tensors)
    tensors["logit_scale"] = torch.tensor(math.log(scale), dtype=tensors["logit_scale"].dtype)
    meta = dict(meta or {}, note=f"benchmarks/scale_adaptation.py: {src.name} with its logit scale set to {scale}")
    path = out / f"{src.stem}_scale{scale:g}.safetensors"
    save_tensors(path, tensors, meta)
    return path


def cell(summary: dict, protocol: str) -> str:
    per = next(iter(summary["per_dataset"].values())) if len(summary["per_dataset"]) == 1 else None
    a = summary["average"]
    if protocol == "base2new":
        std = f" ± {100 * per['hm_std']:.2f}" if per else ""
        return f"{100 * a['base']:.2f} / {100 * a['new']:.2f} / {100 * a['hm']:.2f}{std}"
    std = f" ± {100 * per['accuracy_std']:.2f}" if per else ""
    return f"{100 * a['accuracy']:.2f}{std}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="small")
    ap.add_argument("--scale", type=float, default=100.0)
    ap.add_argument("--datasets", nargs="+", default=["emoji-nature"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    ap.add_argument("--runs", default=str(ROOT / "runs" / "scale_adaptation"))
    ap.add_argument("--name", default="logit_scale_adaptation")
    ap.add_argument("--lr-mult", type=float, default=None, metavar="X",
                    help="add a column: the rescaled model with each host's recipe lr times X (its lr control)")
    args = ap.parse_args()
    t0 = time.time()
    runs = Path(args.runs)
    scaled = str(rescaled(args.model, args.scale, runs))
    models = {"learned": args.model, f"set to {args.scale:g}": scaled}
    lr_mult = {}
    if args.lr_mult:
        key = f"set to {args.scale:g}, lr x{args.lr_mult:g}"
        models[key], lr_mult[key] = scaled, args.lr_mult
    loaded = {path: load_backbone(path) for path in set(models.values())}  # the rescaled file serves two columns
    bbs = {k: loaded[v] for k, v in models.items()}
    results: dict = {}
    rows = []
    for label, protocol, method, shots, host in SETTINGS:
        row = [label]
        for key, model in models.items():
            bb = bbs[key]
            lr, tag = None, ""
            if key in lr_mult:
                if method == "zeroshot":
                    row.append("(no training)")
                    continue
                cfg = TrainConfig(method=method, dataset=args.datasets[0], shots=shots)
                lr, tag = resolved_recipe(HOSTS[method], cfg, bb.ident).lr * lr_mult[key], f"_lr{lr_mult[key]:g}"
            folder = runs / f"{bb.ident.split(':')[1]}" / f"{protocol}_{method}_{shots}_{'m4' if host else 'm16'}{tag}"
            p = ProtocolConfig(protocol=protocol, method=method, datasets=args.datasets, seeds=args.seeds,
                               shots=[shots], out=str(folder), model=model, host=dict(host), lr=lr)
            s = run_protocol(p, progress=False, bb=bb)
            text = cell(s, protocol)
            results.setdefault(label, {})[key] = {"summary": s, "model": bb.ident, "scale": float(bb.logit_scale),
                                                  "lr": lr}
            row.append(text)
            print(label, key, text, flush=True)
        rows.append(row)
    cmd = command_line()
    record = {"name": args.name, "command": cmd, "models": {k: b.ident for k, b in bbs.items()},
              "scales": {k: float(b.logit_scale) for k, b in bbs.items()}, "datasets": args.datasets,
              "seeds": args.seeds, "results": results, "versions": versions(), "seconds": time.time() - t0}
    write_json(ROOT / "docs" / "results" / f"{args.name}.json", record)
    heads = ["setting"] + [f"logit scale {record['scales'][k]:.1f} ({k}; `{b.ident}`)" for k, b in bbs.items()]
    md = [f"# Prompt tuning at the learned logit scale and at {args.scale:g}\n\n",
          f"The packaged `{args.model}` model and the same weights with only the logit scale set to {args.scale:g} "
          f"(CLIP's). Datasets {', '.join(args.datasets)}, seeds {args.seeds}, test split; accuracy % (mean ± std "
          "over seeds); base-to-new: base / new / HM (± std of HM). Zero-shot accuracy does not depend on the "
          "scale, so its cells must agree. The hosts' recipes (with the small-model scaling) are the same "
          "for both models; the lr column, where present, multiplies each recipe's lr (does the higher scale "
          "only need a smaller step?).\n\n",
          markdown_table(heads, rows),
          f"\nCommand: `{cmd}`; wall time {time.time() - t0:.0f} s on 2 CPU cores; gramvl commit "
          f"{record['versions']['git_commit']}.\n"]
    write_text(ROOT / "docs" / "results" / f"{args.name}.md", "".join(md))


if __name__ == "__main__":
    main()
