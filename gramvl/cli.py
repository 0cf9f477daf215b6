"""`gramvl <command>`: a thin layer over the library. Every GramvlError is printed as one clear line."""

from __future__ import annotations

import argparse
import sys
import time

from gramvl.errors import GramvlError


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="small", help="'small' (packaged CLIP), a small-CLIP .safetensors file, "
                   "or an open_clip architecture name (ViT-B-16, ...)")
    p.add_argument("--weights", default=None, help="local weights file for open_clip models (.pt/.bin/"
                   ".safetensors); 'random' for random init (tests only)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--data-root", default=None, help="folder holding the standard datasets (or $GRAMVL_DATA)")


def _load_model(args):
    from gramvl.backbone import load_backbone

    return load_backbone(args.model, args.weights, device=args.device)


# ----------------------------------------------------------------------------------------- commands
def cmd_world(args) -> int:
    from gramvl.data.world import build_world

    t0 = time.time()
    path = build_world(force=args.force, progress=not args.quiet)
    print(f"embedded world ready at {path} ({time.time() - t0:.1f} s)")
    return 0


def cmd_datasets(args) -> int:
    from gramvl.data.registry import get_dataset
    from gramvl.data.world import embedded_dataset_names
    from gramvl.engine.results import markdown_table

    rows = []
    for name in embedded_dataset_names():
        counts = [len(get_dataset(name, s).samples) for s in ("train", "val", "test")]
        ds = get_dataset(name, "test")
        rows.append([name, ds.domain, ds.num_classes, *counts])
    print(markdown_table(["dataset", "domain", "classes", "train", "val", "test"], rows), end="")
    print("\nAlso: folder:ROOT (ROOT/{train,val,test}/<class>/*.png) and the standard datasets with "
          "--data-root (see `gramvl check-data ROOT`).")
    return 0


def cmd_check_data(args) -> int:
    from gramvl.data.check import check_data, format_report

    reports = check_data(args.root)
    print(format_report(reports))
    return 0


def cmd_zeroshot(args) -> int:
    from gramvl.data.registry import get_dataset
    from gramvl.engine.evaluate import ENSEMBLE_TEMPLATES, evaluate_zeroshot
    from gramvl.engine.results import make_record, markdown_table, save_record

    t0 = time.time()
    bb = _load_model(args)
    ds = get_dataset(args.dataset, args.split, args.data_root)
    templates = ENSEMBLE_TEMPLATES if args.ensemble else tuple(args.template or ["a photo of a {}."])
    for t in templates:
        if "{}" not in t:
            raise GramvlError(f"template {t!r} needs a '{{}}' placeholder for the class name")
    m = evaluate_zeroshot(bb, ds, templates, progress=not args.quiet)
    print(markdown_table(["dataset", "split", "classes", "images", "accuracy", "chance"],
                         [[args.dataset, args.split, m["num_classes"], m["n"], m["accuracy"], m["chance"]]]), end="")
    if args.json:
        cfg = {"model": args.model, "backbone": bb.ident, "weights": args.weights, "dataset": args.dataset,
               "split": args.split, "templates": list(templates)}
        save_record(args.json, make_record("zeroshot", cfg, m, time.time() - t0))
    return 0


def cmd_pretrain(args) -> int:
    from gramvl.pretrain import PretrainConfig, pretrain

    cfg = PretrainConfig(steps=args.steps, batch_size=args.batch_size, seed=args.seed, lr=args.lr,
                         eval_every=args.eval_every, val_sets=args.val_sets or [])
    best = pretrain(cfg, args.out, progress=not args.quiet)
    print(f"best checkpoint: {best}")
    return 0


def cmd_demo(args) -> int:
    from gramvl.demo import run_demo

    return run_demo(out=args.out, quick=args.quick)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gramvl", description="GRAM: gradient-regulated meta-prompt learning "
                                "for CLIP-style vision-language models")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = p.add_subparsers(dest="command", required=True)

    w = sub.add_parser("world", help="the embedded image-text world")
    wsub = w.add_subparsers(dest="world_command", required=True)
    wb = wsub.add_parser("build", help="fetch the packages and build the world (idempotent)")
    wb.add_argument("--force", action="store_true")
    wb.set_defaults(func=cmd_world)

    d = sub.add_parser("datasets", help="list the embedded datasets with class and image counts")
    d.set_defaults(func=cmd_datasets)

    c = sub.add_parser("check-data", help="report, per standard dataset, what is missing under ROOT")
    c.add_argument("root")
    c.set_defaults(func=cmd_check_data)

    z = sub.add_parser("zeroshot", help="zero-shot accuracy of a CLIP on one dataset split")
    _add_model_args(z)
    z.add_argument("--dataset", required=True, help="embedded name, standard name, or folder:ROOT")
    z.add_argument("--split", default="test")
    z.add_argument("--template", action="append", help="prompt template with {} (repeat for an ensemble)")
    z.add_argument("--ensemble", action="store_true", help="use gramvl's built-in template ensemble")
    z.add_argument("--json", default=None, help="write the run record here")
    z.set_defaults(func=cmd_zeroshot)

    pt = sub.add_parser("pretrain", help="contrastive pre-training of the small CLIP on the world corpus")
    pt.add_argument("--out", required=True)
    pt.add_argument("--steps", type=int, default=3000)
    pt.add_argument("--batch-size", type=int, default=128)
    pt.add_argument("--lr", type=float, default=1e-3)
    pt.add_argument("--seed", type=int, default=0)
    pt.add_argument("--eval-every", type=int, default=250)
    pt.add_argument("--val-sets", nargs="*", help="embedded datasets whose val split picks the checkpoint")
    pt.set_defaults(func=cmd_pretrain)

    dm = sub.add_parser("demo", help="the main job on the embedded default")
    dm.add_argument("--out", default="runs/demo")
    dm.add_argument("--quick", action="store_true")
    dm.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except GramvlError as e:
        print(f"gramvl: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gramvl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

