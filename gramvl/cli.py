"""`gramvl <command>`: a thin layer over the library. Every GramvlError is printed as one clear line.

`train`, `protocol` and `meta-train` also run data-parallel under `torchrun --nproc_per_node N -m gramvl ...`
(gramvl/dist.py): rank 0 prints and writes, the other ranks are quiet."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from gramvl import dist
from gramvl.errors import GramvlError

DATA_PARALLEL_COMMANDS = ("train", "protocol", "meta-train")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="small", help="'small' (packaged CLIP; 'small-v1', 'small-v2': those of sessions 1-6 and 7), "
                   "a small-CLIP .safetensors file, or an open_clip architecture name (ViT-B-16, ...)")
    p.add_argument("--weights", default=None, help="local weights file for open_clip models (.pt/.bin/"
                   ".safetensors); 'random' for random init (tests only)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--data-root", default=None, help="folder holding the standard datasets (or $GRAMVL_DATA)")


def _load_model(args):
    from gramvl.backbone import load_backbone

    return load_backbone(args.model, args.weights, device=args.device)


# ----------------------------------------------------------------------------------------- commands
def cmd_world(args) -> int:
    from gramvl.data.world import build_icon_part, build_world

    t0 = time.time()
    path = build_world(force=args.force, progress=not args.quiet)
    print(f"embedded world ready at {path} ({time.time() - t0:.1f} s)")
    if args.icons:
        icons = build_icon_part(force=args.force, progress=not args.quiet)
        print(f"icon corpus ready at {icons} ({time.time() - t0:.1f} s)")
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
    ds = get_dataset(args.dataset, args.split, args.data_root)
    bb = _load_model(args)
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
                         eval_every=args.eval_every, val_sets=args.val_sets or [], ema=args.ema,
                         caption_positives=args.caption_positives, icons=args.icons, init=args.init or "",
                         warmup=args.warmup, photo_aug=args.photo_aug, val_limit=args.val_limit,
                         threads=args.threads, logit_scale_init=args.logit_scale_init,
                         logit_scale_lr=args.logit_scale_lr,
                         pool=args.pool, augment=not args.no_augment)
    best = pretrain(cfg, args.out, progress=not args.quiet)
    print(f"best checkpoint: {best}")
    return 0


def _overrides(args) -> list[str]:
    return list(getattr(args, "set", None) or [])


def cmd_train(args) -> int:
    from dataclasses import asdict

    from gramvl.config import build_config
    from gramvl.data.fewshot import harmonic_mean, split_base_new
    from gramvl.data.registry import get_dataset
    from gramvl.engine.protocols import train_host
    from gramvl.engine.results import make_record, markdown_table, save_record
    from gramvl.engine.train import TrainConfig, evaluate_sets
    from gramvl.io import save_tensors

    t0 = time.time()
    cfg = build_config(TrainConfig, args.config, {
        "method": args.method, "dataset": args.dataset, "shots": args.shots, "seed": args.seed,
        "subsample": args.subsample, "model": args.model, "weights": args.weights, "data_root": args.data_root,
        "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size, "device": args.device,
        "gram": args.gram, "precision": args.precision}, _overrides(args))
    from gramvl.backbone import load_backbone

    bb = load_backbone(cfg.model, cfg.weights, device=cfg.device)
    out = Path(args.out)
    host, info = train_host(cfg, bb, ckpt=out / "checkpoint.safetensors", progress=not args.quiet)
    if dist.is_main():
        save_tensors(out / "prompt.safetensors", host.trainable_state(),
                     {"format": "gramvl-prompt", "method": cfg.method, "backbone": bb.ident,
                      "classnames": host.classnames, "config": asdict(cfg)})
    test = get_dataset(cfg.dataset, cfg.eval_split, cfg.data_root)
    if cfg.subsample == "base":
        metrics = evaluate_sets(host, {p: split_base_new(test, p) for p in ("base", "new")}, cfg.device)
        metrics["hm"] = harmonic_mean(metrics["base"], metrics["new"])
    else:
        metrics = {"accuracy": evaluate_sets(host, {"test": test}, cfg.device)["test"]}
    if not dist.is_main():
        return 0
    print(markdown_table(list(metrics), [list(metrics.values())]), end="")
    save_record(out / "record.json", make_record("train", asdict(cfg) | {"backbone": bb.ident}, metrics,
                                                 time.time() - t0, train=info))
    print(f"prompt and record written to {out}")
    return 0


def cmd_eval(args) -> int:
    from gramvl.backbone import load_backbone
    from gramvl.config import build_config
    from gramvl.data.registry import get_dataset
    from gramvl.engine.results import make_record, markdown_table, save_record
    from gramvl.engine.train import TrainConfig, evaluate
    from gramvl.io import load_tensors
    from gramvl.prompts import build_host

    t0 = time.time()
    tensors, meta = load_tensors(args.prompt)
    if not meta or meta.get("format") != "gramvl-prompt":
        raise GramvlError(f"{args.prompt} is not a gramvl prompt file (written by `gramvl train`)")
    cfg = build_config(TrainConfig, None, meta["config"])
    bb = load_backbone(cfg.model if args.model == "small" else args.model, args.weights, device=args.device)
    if meta["backbone"] != bb.ident:
        raise GramvlError(f"checkpoint from another backbone: {args.prompt} was trained on {meta['backbone']}, "
                          f"the loaded model is {bb.ident}")
    ds = get_dataset(args.dataset, args.split, args.data_root)
    host = build_host(cfg.method, bb, meta["classnames"], cfg.host)
    host.load_trainable_state(tensors)
    host.set_classnames(ds.classnames)
    m = evaluate(host, ds, args.device)
    print(markdown_table(["dataset", "split", "accuracy"], [[args.dataset, args.split, m["accuracy"]]]), end="")
    if args.json:
        save_record(args.json, make_record("eval", {"prompt": str(args.prompt), "dataset": args.dataset,
                                                    "split": args.split, "train_config": meta["config"]},
                                           m, time.time() - t0))
    return 0


def cmd_protocol(args) -> int:
    from gramvl.config import build_config
    from gramvl.engine.protocols import ProtocolConfig, plot_summary, run_protocol

    p = build_config(ProtocolConfig, args.config, {
        "protocol": args.protocol, "method": args.method, "datasets": args.datasets, "targets": args.targets,
        "seeds": args.seeds, "shots": args.shots, "out": args.out, "model": args.model, "weights": args.weights,
        "data_root": args.data_root, "device": args.device, "epochs": args.epochs, "lr": args.lr,
        "batch_size": args.batch_size, "gram": args.gram, "eval_split": args.eval_split,
        "precision": args.precision}, _overrides(args))
    run_protocol(p, progress=not args.quiet)
    if not dist.is_main():
        return 0
    plot_summary(p.out)
    print((Path(p.out) / "summary.md").read_text())
    return 0


def cmd_report(args) -> int:
    from gramvl.engine.protocols import plot_summary, summarize

    summarize(args.dir)
    files = plot_summary(args.dir)
    print((Path(args.dir) / "summary.md").read_text())
    for f in files:
        print(f"plot: {f}")
    return 0


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", default=None, help="host method: zeroshot, coop, cocoop, kgcoop, prograd, vpt, "
                   "vpt-deep, ivlp, maple, promptsrc, linear_probe")
    p.add_argument("--config", default=None, help="YAML config (see configs/)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--gram", default=None, help="GRAM artifact (.safetensors) to attach")
    p.add_argument("--precision", default=None, choices=["fp32", "bf16", "fp16"], help="autocast on GPU")
    p.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. host.n_ctx=16")


def cmd_meta_train(args) -> int:
    from gramvl.config import build_config
    from gramvl.gram.pipeline import MetaTrainJob, run_meta_train

    if getattr(args, "tta", False):
        from gramvl.tta.cli import meta_tta_main

        return meta_tta_main(args)
    job = build_config(MetaTrainJob, args.config, {"corpus": args.corpus, "model": args.model,
                                                   "weights": args.weights, "hierarchy": args.hierarchy,
                                                   "device": args.device},
                       _overrides(args) + [f"meta.host={args.host}", f"meta.unigram={args.unigram}"]
                       + ([f"meta.steps={args.steps}"] if args.steps else [])
                       + ([f"meta.time_budget_s={args.time_budget}"] if args.time_budget else [])
                       + (["meta.second_order=false"] if args.first_order else [])
                       + (["meta.use_regulator=false"] if args.no_regulator else [])
                       + (["meta.shifted_weight=0", "tasks.shifted_query=false"] if args.no_shifted_query else [])
                       + (["tasks.complexity_informed=false"] if args.no_complexity else []))
    bb = None
    if dist.active():
        from gramvl.backbone import load_backbone
        from gramvl.gram.pipeline import build_hierarchy, corpus_features

        with dist.main_first():  # rank 0 encodes and clusters the corpus (both cached); the others read the caches
            bb = load_backbone(job.model, job.weights, device=job.device)
            if dist.is_main():
                feats = corpus_features(bb, job.corpus, not args.quiet, job.feature_dtype)
                build_hierarchy(feats, job.hierarchy, job.cmhc, not args.quiet)
    out = run_meta_train(job, args.out, bb=bb, progress=not args.quiet)
    if not dist.is_main():
        return 0
    import json

    meta = json.loads(out.with_suffix(".json").read_text())
    print(f"GRAM artifact: {out} ({meta['steps_done']} meta-steps, {meta['seconds']:.0f} s)")
    print("psi diagnostics: " + json.dumps(meta.get("psi_diagnostics", {}), indent=1))
    return 0


def cmd_cluster(args) -> int:
    from gramvl.backbone import load_backbone
    from gramvl.config import build_config
    from gramvl.gram.cmhc import CMHCConfig
    from gramvl.gram.pipeline import build_hierarchy, corpus_features

    cfg = build_config(CMHCConfig, None, None, _overrides(args))
    bb = load_backbone(args.model, args.weights)
    feats = corpus_features(bb, args.corpus, progress=not args.quiet)
    h = build_hierarchy(feats, args.hierarchy, cfg, progress=not args.quiet)
    path = h.save(args.out)
    print(h.summary())
    print(f"hierarchy written to {path}")
    return 0


def cmd_demo(args) -> int:
    from gramvl.demo import run_demo

    return run_demo(out=args.out, quick=args.quick)


def cmd_cache(args) -> int:
    from gramvl.caches import prune, scan, summary
    from gramvl.engine.results import markdown_table
    from gramvl.paths import gramvl_home

    entries = scan()
    print(f"cache: {gramvl_home() / 'cache'}")
    if not entries:
        print("empty")
        return 0
    print(markdown_table(["kind", "entries", "current", "stale", "stale MB", "unknown"], summary(entries)))
    if args.prune:
        freed = prune(entries)
        print(f"deleted {sum(e.state == 'stale' for e in entries)} stale entries ({freed / 1e6:.1f} MB)")
    elif any(e.state == "stale" for e in entries):
        print("stale entries were made under earlier rules and are never served; `gramvl cache --prune` deletes "
              "them")
    return 0


CORPUS_HELP = ("'world', a CSV/TSV of image path, caption, WebDataset tar shards (a folder of .tar files, "
               "'shards/{000000..000009}.tar' or one .tar; needs gramvl[scale]) or a folder of extracted "
               "feature shards")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gramvl", description="GRAM: gradient-regulated meta-prompt learning "
                                "for CLIP-style vision-language models")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = p.add_subparsers(dest="command", required=True)

    w = sub.add_parser("world", help="the embedded image-text world")
    wsub = w.add_subparsers(dest="world_command", required=True)
    wb = wsub.add_parser("build", help="fetch the packages and build the world (idempotent)")
    wb.add_argument("--force", action="store_true")
    wb.add_argument("--icons", action="store_true",
                    help="also build the optional icon corpus (3 iconify icon sets) for `gramvl pretrain --icons`")
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
    pt.add_argument("--ema", type=float, default=0.0,
                    help="evaluate and export a weight average with this decay, e.g. 0.999 (0: raw weights)")
    pt.add_argument("--caption-positives", action="store_true",
                    help="count a caption shared by several emoji (e.g. 'a flag.') as a positive for all of them")
    pt.add_argument("--icons", type=float, default=0.0,
                    help="share of each batch drawn from the icon corpus (built on demand; 0: emoji only)")
    pt.add_argument("--init", default=None,
                    help="start from this small-CLIP .safetensors (same architecture) instead of random weights")
    pt.add_argument("--warmup", type=int, default=150, help="learning-rate warm-up steps")
    pt.add_argument("--photo-aug", type=float, default=0.0,
                    help="share of images drawn as grey objects on a dark background (0: not used)")
    pt.add_argument("--val-limit", type=int, default=600, help="at most this many val images per set")
    pt.add_argument("--threads", type=int, default=2,
                    help="CPU threads (torch.set_num_threads); 1 lets two runs share a 2-core machine")
    pt.add_argument("--logit-scale-init", type=float, default=0.0,
                    help="start the learned logit scale at this value, e.g. 100 (0: the model's own)")
    pt.add_argument("--logit-scale-lr", type=float, default=1e-2,
                    help="the logit scale's own peak learning rate; 0 holds it at its start value, as real CLIP's "
                         "sits at its clamp of 100 for most of its training")
    pt.add_argument("--pool", type=int, default=0,
                    help="diagnostic: train on a fixed random subset of this many pairs (0: the whole corpus)")
    pt.add_argument("--no-augment", action="store_true",
                    help="diagnostic: images only resized, no style or geometry augmentation")
    pt.set_defaults(func=cmd_pretrain)

    tr = sub.add_parser("train", help="train one host on one dataset (few-shot), then evaluate")
    _add_model_args(tr)
    _add_train_args(tr)
    tr.add_argument("--dataset", default=None)
    tr.add_argument("--shots", type=int, default=None)
    tr.add_argument("--seed", type=int, default=None)
    tr.add_argument("--subsample", default=None, choices=["all", "base", "new"])
    tr.add_argument("--out", required=True)
    tr.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="evaluate a trained prompt file on a dataset")
    _add_model_args(ev)
    ev.add_argument("--prompt", required=True)
    ev.add_argument("--dataset", required=True)
    ev.add_argument("--split", default="test")
    ev.add_argument("--json", default=None)
    ev.set_defaults(func=cmd_eval)

    pr = sub.add_parser("protocol", help="run a protocol over datasets, shots and seeds")
    pr.add_argument("protocol", choices=["fewshot", "base2new", "xd", "dg"])
    _add_model_args(pr)
    _add_train_args(pr)
    pr.add_argument("--datasets", nargs="+", default=None)
    pr.add_argument("--targets", nargs="*", default=None)
    pr.add_argument("--seeds", nargs="+", type=int, default=None)
    pr.add_argument("--shots", nargs="+", type=int, default=None)
    pr.add_argument("--eval-split", default=None, choices=["test", "val"], help="val: recipe tuning")
    pr.add_argument("--out", required=True)
    pr.set_defaults(func=cmd_protocol)

    rp = sub.add_parser("report", help="rebuild summary tables and plots of a protocol folder from its records")
    rp.add_argument("dir")
    rp.set_defaults(func=cmd_report)

    mt = sub.add_parser("meta-train", help="meta-learn a prompt init and gradient regulator (GRAM)")
    _add_model_args(mt)
    mt.add_argument("--host", default="coop", help="coop, cocoop, vpt, maple, ivlp, promptsrc, ...")
    mt.add_argument("--unigram", action="store_true", help="text and visual slots jointly (UNIGRAM)")
    mt.add_argument("--corpus", default="world", help=CORPUS_HELP)
    mt.add_argument("--hierarchy", default="cmhc", choices=["cmhc", "flat", "random"])
    mt.add_argument("--steps", type=int, default=None)
    mt.add_argument("--time-budget", type=float, default=None, help="stop after this many seconds")
    mt.add_argument("--first-order", action="store_true")
    mt.add_argument("--no-regulator", action="store_true", help="ablation: learn the init only (MAML)")
    mt.add_argument("--no-shifted-query", action="store_true", help="ablation: no cross-domain query")
    mt.add_argument("--no-complexity", action="store_true", help="ablation: uniform task construction")
    mt.add_argument("--tta", action="store_true", help="meta-train for test-time tuning (structure-induced)")
    mt.add_argument("--config", default=None)
    mt.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="overrides, e.g. meta.inner_lr=0.5")
    mt.add_argument("--out", required=True, help="artifact path (.safetensors; a .json sidecar is written)")
    mt.set_defaults(func=cmd_meta_train)

    cl = sub.add_parser("cluster", help="cross-modal hierarchical clustering of an image-text corpus")
    _add_model_args(cl)
    cl.add_argument("--corpus", default="world", help=CORPUS_HELP)
    cl.add_argument("--hierarchy", default="cmhc", choices=["cmhc", "flat", "random"])
    cl.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="CMHC options, e.g. k1=12")
    cl.add_argument("--out", required=True)
    cl.set_defaults(func=cmd_cluster)

    ca = sub.add_parser("cache", help="what $GRAMVL_HOME/cache holds; --prune deletes the entries no run serves")
    ca.add_argument("--prune", action="store_true",
                    help="delete the stale entries (made under earlier rules; do not run beside another gramvl run)")
    ca.set_defaults(func=cmd_cache)

    dm = sub.add_parser("demo", help="the main job on the embedded default")
    dm.add_argument("--out", default="runs/demo")
    dm.add_argument("--quick", action="store_true")
    dm.set_defaults(func=cmd_demo)

    from gramvl.tta.cli import add_parser as add_tta_parser

    add_tta_parser(sub)
    return p


def _start_data_parallel(args) -> bool:
    """Join torchrun's process group (if torchrun launched us); True when this call set it up."""
    if not dist.launched():
        return False
    if args.command not in DATA_PARALLEL_COMMANDS or getattr(args, "tta", False):
        raise GramvlError(f"`gramvl {args.command}{' --tta' if getattr(args, 'tta', False) else ''}` does not "
                          f"run data-parallel; under torchrun use one of: {', '.join(DATA_PARALLEL_COMMANDS)} "
                          f"(or run it as a single process)")
    started = dist.init_from_env(getattr(args, "device", "cpu"))
    if hasattr(args, "device"):
        args.device = dist.device_for(args.device)
    if not dist.is_main():
        args.quiet = True  # progress bars and tables come from rank 0
    return started


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = False
    try:
        started = _start_data_parallel(args)
        return int(args.func(args) or 0)
    except GramvlError as e:
        print(f"gramvl: error{f' (rank {dist.rank()})' if dist.active() else ''}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gramvl: interrupted", file=sys.stderr)
        return 130
    finally:
        if started:
            dist.shutdown()


if __name__ == "__main__":
    sys.exit(main())

