"""Where the training loss wants the logit scale: for each small-CLIP checkpoint, the contrastive loss of
its frozen features on fresh pre-training batches (the session-8 recipe's corpus mix and augmentation) as a
function of the logit scale s, and the s* that minimizes it.

For fixed features the loss is convex in s, so s* is the value the learned scale moves toward. s* above
100 means training pushes the scale against CLIP's clamp of 100 (where real CLIP sits). The batches are
drawn with seeds the training runs never used.

`--batch-sizes 128 512 4096 ...` repeats the measurement at larger batches (the same number of pairs in
total, so each size sees about as many images): real CLIP learns its scale of ~100 with 32,768 pairs per
batch, so this asks whether more negatives per row move the loss's optimum (measured: they do not,
docs/pretraining.md, session 10).

`--images augmented unaugmented` measures each model on the same pairs twice: with the training augmentation
and with the images only resized, and adds the in-batch top-1 (is the style and geometry augmentation what
keeps s* low? Measured: no, docs/pretraining.md, session 11).

`--errors` adds what the in-batch mistakes are (session 12): for every image whose most similar caption is a
negative, whose caption won: an emoji of the same Unicode subcategory (flags, families and skin-tone variants
included: near-duplicates), another emoji, an icon (for an icon image), or the other corpus. `--icons 0`
draws emoji-only batches (the session-8 mix has 40% icons).

`--by-positives` adds s* of the image->text loss on the images with one positive caption in their batch and on
those with several (session 13: does the multi-positive target hold the scale down?).

`--pool N` draws the batches from the fixed pool of N pairs that `gramvl pretrain --pool N` trains on (session
13: does the scale rise once a model fits its training batches?).

Writes docs/results/scale_optimum.{json,md}.
    python benchmarks/scale_optimum.py --models small small-v2 small-v1 runs/x/best.safetensors
    python benchmarks/scale_optimum.py --models small --batch-sizes 128 512 2048 8192 --name scale_optimum_batch
    python benchmarks/scale_optimum.py --models small small-v1 --images augmented unaugmented --name scale_optimum_unaugmented
    python benchmarks/scale_optimum.py --models small --images augmented unaugmented --errors --name scale_optimum_errors
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gramvl.backbone import load_backbone
from gramvl.engine.results import markdown_table, versions
from gramvl.io import write_json, write_text
from gramvl.pretrain import Corpus, PretrainConfig, contrastive_loss

OUT = Path(__file__).resolve().parents[1] / "docs" / "results"
SCALES = np.exp(np.linspace(math.log(5.0), math.log(1000.0), 107))  # 5 .. 1000, log-spaced


ERROR_KINDS = ("emoji, same subcategory", "emoji, other subcategory", "icon -> icon", "emoji <-> icon")


def error_kind(i: int, j: int, n_emoji: int, subcategory: list) -> str:
    """What kind of pair's caption (corpus row j) beat image i's own captions."""
    if i < n_emoji and j < n_emoji:
        return ERROR_KINDS[0] if subcategory[i] == subcategory[j] else ERROR_KINDS[1]
    return ERROR_KINDS[2] if i >= n_emoji and j >= n_emoji else ERROR_KINDS[3]


def image_to_text_rows(logits: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """The image->text half of the training loss, one value per image (row)."""
    return torch.sum(-(pos / pos.sum(1, keepdim=True)) * F.log_softmax(logits, 1), 1)


@torch.no_grad()
def losses_by_scale(bb, corpus: Corpus, batches: int, seed: int, augmented: bool = True,
                    subcategory: list | None = None, by_positives: bool = False) -> tuple[np.ndarray, dict]:
    """Mean loss over `batches` batches for every grid scale ([len(SCALES)]), and the statistics of the same
    batches: mean cosine of the positive pairs, mean and variance of the negative pairs' cosines, and the
    in-batch top-1 (share of images whose most similar caption in the batch is a positive one). With
    `subcategory` (one entry per corpus row), also the share of each ERROR_KINDS among the mistakes. With
    `by_positives`, also s* of the image->text loss on the images with one positive caption in the batch and on
    those with several (the same concept twice, or a shared caption such as 'a flag.'): CLIP's loss has one
    positive per row, this project's pre-training loss spreads the target over all of them."""
    net = bb.model
    total = np.zeros(len(SCALES))
    pos_sum = pos_n = neg_sum = neg_sq = neg_n = top1 = rows = 0.0
    errors = dict.fromkeys(ERROR_KINDS, 0)
    single_curve, multi_curve, n_single, n_multi = np.zeros(len(SCALES)), np.zeros(len(SCALES)), 0, 0
    for b in range(batches):
        imgs, text, pos = corpus.batch(seed * 1_000_003 + b, augmented=augmented)
        cos = F.normalize(net.encode_image(imgs), dim=-1) @ F.normalize(net.encode_text(text), dim=-1).T
        total += [float(contrastive_loss(float(s) * cos, pos)) for s in SCALES]
        if by_positives:
            single = pos.sum(1) == 1
            n_single, n_multi = n_single + int(single.sum()), n_multi + int((~single).sum())
            for k, s in enumerate(SCALES):
                rows_loss = image_to_text_rows(float(s) * cos, pos)
                single_curve[k] += float(rows_loss[single].sum())
                multi_curve[k] += float(rows_loss[~single].sum())
        best = cos.argmax(1, keepdim=True)
        hit = pos.gather(1, best)[:, 0] > 0
        top1 += float(hit.sum())
        rows += len(cos)
        if subcategory is not None:
            idx = corpus.batch_index(seed * 1_000_003 + b).tolist()
            for i in torch.nonzero(~hit)[:, 0].tolist():
                errors[error_kind(idx[i], idx[int(best[i])], corpus.n_emoji, subcategory)] += 1
        is_pos = pos > 0
        pos_sum, pos_n = pos_sum + float(cos[is_pos].double().sum()), pos_n + int(is_pos.sum())
        neg = cos[~is_pos].double()
        neg_sum, neg_sq, neg_n = neg_sum + float(neg.sum()), neg_sq + float((neg * neg).sum()), neg_n + neg.numel()
    mu = neg_sum / neg_n
    stats = {"pos_cos": pos_sum / pos_n, "neg_cos": mu, "neg_var": neg_sq / neg_n - mu * mu,
             "in_batch_top1": top1 / rows}
    if by_positives:
        stats["multi_positive_share"] = n_multi / max(1, n_single + n_multi)
        stats["s_single_positive"] = refine_minimum(single_curve) if n_single else None
        stats["s_multi_positive"] = refine_minimum(multi_curve) if n_multi else None
    if subcategory is not None:
        n_err = max(1, sum(errors.values()))
        stats["errors"] = {k: v / n_err for k, v in errors.items()}
    return total / batches, stats


def refine_minimum(curve: np.ndarray) -> float:
    """The loss minimum between grid points: the vertex of the parabola (in log s) through the grid minimum
    and its two neighbours; the grid value itself at the grid's edge."""
    i = int(np.argmin(curve))
    if i in (0, len(curve) - 1):
        return float(SCALES[i])
    x, y = np.log(SCALES[i - 1:i + 2]), curve[i - 1:i + 2]
    a, b, _ = np.polyfit(x, y, 2)
    return float(math.exp(-b / (2 * a)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["small", "small-v2", "small-v1"])
    ap.add_argument("--batches", type=int, default=16, help="batches of the first batch size")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[128],
                    help="pairs per batch; every size gets about the same number of pairs in total")
    ap.add_argument("--seed", type=int, default=777, help="batch seed (the training runs used 0)")
    ap.add_argument("--images", nargs="+", choices=["augmented", "unaugmented"], default=["augmented"],
                    help="augmented: the training augmentation; unaugmented: the same pairs and captions with the "
                         "images only resized (no style or geometry augmentation); both: one row each")
    ap.add_argument("--icons", type=float, default=0.4, help="share of icon pairs per batch (session 8's mix: 0.4)")
    ap.add_argument("--errors", action="store_true",
                    help="add what the in-batch mistakes are (same-subcategory emoji, other emoji, icons)")
    ap.add_argument("--by-positives", action="store_true",
                    help="add s* of the image->text loss on images with one positive caption in the batch and on "
                         "those with several (session 13)")
    ap.add_argument("--pool", type=int, default=0,
                    help="draw the batches from the fixed pool of `gramvl pretrain --pool N` (seed 0): the pairs a "
                         "pool run trained on (session 13)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--name", default="scale_optimum")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    # the session-8 leg's batches (128 pairs unless --batch-sizes), 40% icons, 15% photo-style images, shared
    # captions as positives
    if min(args.batch_sizes) < 2:
        raise SystemExit("--batch-sizes: a contrastive batch needs at least 2 pairs")
    cfg = PretrainConfig(batch_size=args.batch_sizes[0], icons=args.icons, photo_aug=0.15, caption_positives=True,
                         pool=args.pool)
    total_pairs = args.batches * args.batch_sizes[0]
    multi = len(args.batch_sizes) > 1  # one row per model and size
    both = len(args.images) > 1  # one row per model, size and kind of images
    extra = multi or args.images != ["augmented"] or args.errors  # the extra columns
    bb0 = load_backbone(args.models[0])
    corpus = Corpus(cfg, bb0.tokenizer, progress=False)
    subcategory, chance_same = None, None
    if args.errors:  # one entry per corpus row: the emoji's Unicode subcategory; the icons form one "icon" group
        subcategory = [p.get("subcategory") if i < corpus.n_emoji else "icon" for i, p in enumerate(corpus.pairs)]
        share = np.unique([str(c) for c in subcategory[:corpus.n_emoji]], return_counts=True)[1] / corpus.n_emoji
        chance_same = float((share ** 2).sum())  # two random emoji pairs share a subcategory
    results, rows = {}, []
    for model in args.models:
        bb = bb0 if model == args.models[0] else load_backbone(model)
        if bb.model.visual.image_size[0] != cfg.image_size:
            raise SystemExit(f"{model}: image size {bb.model.visual.image_size} is not the recipe's {cfg.image_size}")
        scale = float(bb.logit_scale)
        for bs, images in [(bs, im) for bs in args.batch_sizes for im in args.images]:
            corpus.cfg = replace(cfg, batch_size=bs)
            n_batches = max(1, round(total_pairs / bs))
            curve, stats = losses_by_scale(bb, corpus, n_batches, args.seed, augmented=images == "augmented",
                                           subcategory=subcategory, by_positives=args.by_positives)
            i = int(np.argmin(curve))
            at = {s: float(np.interp(math.log(s), np.log(SCALES), curve)) for s in (scale, 100.0)}
            r = {"ident": bb.ident, "logit_scale": scale, "batch_size": bs, "batches": n_batches,
                 "best_scale": float(SCALES[i]), "best_scale_refined": refine_minimum(curve), "loss_at_best": float(curve[i]),
                 **stats,
                 "loss_at_model_scale": at[scale], "loss_at_100": at[100.0],
                 "best_at_grid_edge": i in (0, len(SCALES) - 1), "images": images,
                 "curve": curve.tolist()}
            results[(f"{model}@{bs}" if multi else model) + (f":{images}" if both else "")] = r
            rows.append([f"`{model}`", r["ident"]] + ([f"{bs} ({n_batches})"] if multi else [])
                        + ([images] if both else [])
                        + [f"{scale:.1f}", f"{r['best_scale']:.1f}" + (" (grid edge)" if r["best_at_grid_edge"] else ""),
                           f"{r['loss_at_model_scale']:.3f}", f"{r['loss_at_100']:.3f}", f"{r['loss_at_best']:.3f}"]
                        + ([f"{r['best_scale_refined']:.1f}", f"{r['pos_cos']:.3f}", f"{r['neg_cos']:.3f} ± "
                            f"{math.sqrt(r['neg_var']):.3f}", f"{100 * r['in_batch_top1']:.1f}"] if extra else [])
                        + ([f"{100 * r['errors'][k]:.0f}" for k in ERROR_KINDS] if args.errors else [])
                        + ([f"{100 * r['multi_positive_share']:.1f}"]
                           + [f"{r[k]:.1f}" if r[k] is not None else "-" for k in ("s_single_positive", "s_multi_positive")]
                           if args.by_positives else []))
            print(rows[-1], flush=True)
    sizes = " ".join(map(str, args.batch_sizes))
    record = {"models": args.models, "batches": args.batches, "batch_sizes": args.batch_sizes, "seed": args.seed,
              "icons": args.icons, "same_subcategory_by_chance": chance_same,
              "scales": SCALES.tolist(),
              "results": results, "versions": versions(), "seconds": time.time() - t0,
              "command": f"python benchmarks/scale_optimum.py --batches {args.batches} --seed {args.seed} --models "
                         + " ".join(args.models)
                         + (f" --batch-sizes {sizes}" if multi else "") + (" --images " + " ".join(args.images) if args.images != ["augmented"] else "")
                         + (f" --icons {args.icons:g}" if args.icons != 0.4 else "") + (" --errors" if args.errors else "")
                         + (f" --pool {args.pool}" if args.pool else "") + (" --by-positives" if args.by_positives else "")
                         + (f" --name {args.name}" if args.name != "scale_optimum" else "")}
    out = Path(args.out)
    write_json(out / f"{args.name}.json", record)
    md = ["# Where the training loss wants the logit scale\n\n",
          "Contrastive loss (symmetric, multi-positive; the pre-training loss) of each checkpoint's frozen features "
          + (f"on fresh pre-training batches of each size in the table ({total_pairs} pairs in total per size; the "
             "number of batches in brackets)" if multi else
             f"on {args.batches} fresh pre-training batches of {cfg.batch_size} pairs")
          + (f", drawn from the fixed pool of {args.pool} pairs that `gramvl pretrain --pool {args.pool}` trains on"
             if args.pool else "")
          + (f" ({100 * args.icons:.0f}% icons, 15% photo-style images, shared " if args.images == ["augmented"] else
             f" ({100 * args.icons:.0f}% icons; images: 'augmented' with the training augmentation, 15% of them photo-style, "
             "'unaugmented' the same pairs with the images only resized; shared ")
          + f"captions as positives; batch seed {args.seed}, not a training seed), as a function of the logit scale s "
          f"(grid of {len(SCALES)} log-spaced values in 5..1000). For fixed features the loss is convex in s, so s* "
          "is where the learned scale is pulled. CLIP clamps the scale at 100; s* > 100 means training holds it "
          "there.\n\n"
          + ("The last columns: s* refined between grid points (a parabola in log s through the grid minimum and its "
             "neighbours), the cosines of the positive and the negative pairs over the same batches, and the in-batch "
             "top-1: the share of images whose most similar caption in their batch is a positive one.\n\n"
             if extra else "")
          + ("The mistakes columns: of the images whose most similar caption in the batch is a negative one, the "
             "share whose winning caption belongs to an emoji of the same Unicode subcategory (near-duplicates: flags, "
             "families, skin-tone and gender variants, similar faces), to an emoji of another subcategory, to another "
             "icon (icon images), or to the other corpus (an emoji's caption for an icon image or the reverse). Two "
             f"random emoji pairs share a subcategory {100 * chance_same:.1f}% of the time.\n\n"
             if args.errors else "")
          + ("The last three columns split the image->text half of the loss by the images' positives: the share "
             "of images with several positive captions in their batch (the same concept twice, or a shared caption "
             "such as 'a flag.'; the loss spreads their target over all of them, where CLIP's loss has one positive "
             "per row), and s* of the half on the images with one positive and on those with several.\n\n"
             if args.by_positives else "")
          + ("When the batch is large the loss of a row is about -s pos + log N + log E[exp(s neg)]: the batch size N only "
             "adds a constant, so s* is set by the features (how far the positives stand above the upper tail of "
             "the negatives), not by N.\n\n" if multi else ""),
          markdown_table(["model", "ident"] + (["batch size (batches)"] if multi else []) + (["images"] if both else [])
                         + ["learned scale", "s* (loss minimum)", "loss at learned scale",
                          "loss at 100", "loss at s*"]
                         + (["s* between grid points", "positive cosine", "negative cosine (mean ± std)",
                             "in-batch top-1 %"] if extra else [])
                         + ([f"mistakes: {k} %" for k in ERROR_KINDS] if args.errors else [])
                         + (["images with several positives %", "s*, one-positive images (image->text)",
                             "s*, several-positive images (image->text)"] if args.by_positives else []),
                         rows),
          f"\nCommand: `{record['command']}`; wall time {time.time() - t0:.0f} s on {args.threads} CPU thread(s); "
          f"gramvl commit {record['versions']['git_commit']}.\n"]
    write_text(out / f"{args.name}.md", "".join(md))


if __name__ == "__main__":
    main()
