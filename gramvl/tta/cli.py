"""`gramvl tta` (test-time prompt tuning on one dataset) and the `gramvl meta-train --tta` entry point."""

from __future__ import annotations

import argparse
import json
import time

from gramvl.errors import GramvlError

METHODS = ("tpt", "zeroshot")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `gramvl tta` on the main parser's subparsers."""
    from gramvl.cli import _add_model_args

    p = subparsers.add_parser("tta", help="test-time prompt tuning (TPT), optionally from a GRAM artifact")
    _add_model_args(p)
    p.add_argument("--method", default="tpt", choices=METHODS,
                   help="tpt: tune the text context per test image; zeroshot: the initial context, untuned")
    p.add_argument("--dataset", required=True, help="embedded name, standard name, or folder:ROOT")
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, default=None, help="this many test samples (a fixed random subset)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random views")
    p.add_argument("--batch-images", type=int, default=8, help="test images tuned at once (own contexts)")
    p.add_argument("--gram", default=None, help="GRAM artifact: θ* as the initial context and its ψ* "
                   "(structure-induced when the artifact was meta-trained with --tta)")
    p.add_argument("--gram-parts", default="both", choices=["both", "init", "regulator"])
    p.add_argument("--no-structure", action="store_true", help="use ψ* without its structure context e(x)")
    p.add_argument("--init", default=None, metavar="PROMPT_FILE",
                   help="initial context from a prompt file written by `gramvl train` (e.g. CoOp)")
    p.add_argument("--ctx-init", default="a photo of a", help="hand-written initial context (default)")
    p.add_argument("--n-ctx", type=int, default=None, help="check that the initial context has this length")
    p.add_argument("--n-views", type=int, default=64)
    p.add_argument("--selection", type=float, default=0.1, help="fraction of confident views kept")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--augmix", action="store_true", help="AugMix views (TPT's choice for fine-grained sets)")
    p.add_argument("--encode-precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="autocast of the frozen image tower on the views (bf16: ~1.5x faster on CPUs with "
                        "AVX512-BF16, features differ by ~1e-3)")
    p.add_argument("--json", default=None, help="write the run record here")
    p.set_defaults(func=tta_main)
    return p


def tta_main(args) -> int:
    """Run TPT / zero-shot on one dataset split; print a table and write the record."""
    from gramvl.backbone import load_backbone
    from gramvl.data.registry import get_dataset
    from gramvl.engine.results import make_record, markdown_table, save_record
    from gramvl.tta.tpt import TPT, TPTConfig, resolve_init, run_tta

    t0 = time.time()
    bb = load_backbone(args.model, args.weights, device=args.device)
    ds = get_dataset(args.dataset, args.split, args.data_root)
    init = resolve_init(bb, args.init, args.gram, args.gram_parts, args.ctx_init, args.n_ctx,
                        structure=not args.no_structure)
    steps = 0 if args.method == "zeroshot" else args.steps
    cfg = TPTConfig(n_views=args.n_views, selection=args.selection, steps=steps, lr=args.lr,
                    augmix=args.augmix, batch_images=args.batch_images, seed=args.seed,
                    encode_precision=args.encode_precision)
    tpt = TPT(bb, ds.classnames, init, cfg)
    res = run_tta(tpt, ds, args.limit, progress=not getattr(args, "quiet", False))
    m = res["metrics"]
    print(markdown_table(["dataset", "split", "method", "init", "n", "accuracy", "ms/sample"],
                         [[args.dataset, args.split, args.method, init.source, m["n"], m["accuracy"],
                           round(m["latency_ms"], 1)]]), end="")
    if args.json:
        config = {"method": args.method, "model": args.model, "weights": args.weights, "backbone": bb.ident,
                  "dataset": args.dataset, "split": args.split, "limit": args.limit, "seed": args.seed,
                  "init": res["init"], "tpt": res["config"], "gram": args.gram, "gram_parts": args.gram_parts,
                  "prompt": args.init}
        save_record(args.json, make_record("tta", config, m, time.time() - t0, per_sample=res["per_sample"]))
    return 0


def _job_overrides(args) -> list[str]:
    """`gramvl meta-train` flags as overrides of a MetaTTAJob."""
    if getattr(args, "unigram", False):
        raise GramvlError("--tta meta-trains the text context of test-time tuning; --unigram does not apply")
    if getattr(args, "host", "coop") not in ("coop", None):
        raise GramvlError(f"--tta tunes a shared text context (TPT), which is the coop slot; --host "
                          f"{args.host} does not apply")
    out = list(getattr(args, "set", None) or [])
    if getattr(args, "steps", None):
        out.append(f"meta.steps={args.steps}")
    if getattr(args, "time_budget", None):
        out.append(f"meta.time_budget_s={args.time_budget}")
    if getattr(args, "first_order", False):
        out.append("meta.second_order=false")
    if getattr(args, "no_regulator", False):
        out.append("meta.use_regulator=false")
    if getattr(args, "no_shifted_query", False):
        out += ["meta.shifted_weight=0", "tasks.shifted_query=false"]
    if getattr(args, "no_complexity", False):
        out.append("tasks.complexity_informed=false")
    return out


def meta_tta_main(args) -> int:
    """`gramvl meta-train --tta ...`: meta-train θ* and the structure-induced ψ* for test-time tuning."""
    from gramvl.config import build_config
    from gramvl.tta.meta_tta import MetaTTAJob, run_meta_tta

    job = build_config(MetaTTAJob, getattr(args, "config", None),
                       {"corpus": getattr(args, "corpus", None), "model": getattr(args, "model", None),
                        "weights": getattr(args, "weights", None), "device": getattr(args, "device", None),
                        "hierarchy": getattr(args, "hierarchy", None)}, _job_overrides(args))
    out = run_meta_tta(job, args.out, progress=not getattr(args, "quiet", False))
    meta = json.loads(out.with_suffix(".json").read_text())
    print(f"test-time GRAM artifact: {out} ({meta['steps_done']} meta-steps, {meta['seconds']:.0f} s, "
          f"structure {meta['structure']['mode']})")
    print("diagnostics: " + json.dumps(meta.get("psi_diagnostics", {}), indent=1))
    return 0
