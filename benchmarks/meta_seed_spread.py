"""How much does GRAM's result depend on the meta-training run itself? Every GRAM table in docs/results/
evaluates one artifact (one meta-training run) over 3 downstream seeds, so its ± covers the few-shot draw and
the prompt tuning, not the meta-training. This benchmark meta-trains the same recipe with several meta-seeds
(`meta.seed`: the meta-task draws and ψ's init) and evaluates each artifact with base-to-new CoOp on
emoji-nature, beside plain CoOp with the same seeds.

Session 13 found why `make demo`'s GRAM row differs between machines (12.07 in sessions 8-10, 18.55 in
sessions 11-12): the same seed run with 1 or 2 CPU threads, or on corpus features cached by a run with another
thread count (they differ in the last float bit), gives another artifact. `--threads 2 1` repeats each
meta-seed with both thread counts to measure that effect beside the seed's.

`--protocol dg|xd|fewshot`, `--host-set` (host options for meta-training and tuning alike) and `--theta-anchor`
check another cell of the GRAM tables the same way; `--method cocoop --tune-set` tunes another host (with its own
options) from the CoOp artifacts; `--meta-host maple` (with `--meta-set second_order=false`, `--unigram`)
meta-trains for another host; `--reference ARTIFACT` adds the artifact a table used as a reference row.

Writes docs/results/{name}.{json,md}; artifacts and protocol folders go under --work (reused when present: an
artifact is retrained only when missing, and a protocol folder is named by its artifact's sha256).
    # the demo's recipe (300 meta-steps, torch k-means as in a clean clone, CoOp 40 epochs, seed 1)
    python benchmarks/meta_seed_spread.py --meta-seeds 0 1 2 3 4 --threads 2 1 --steps 300 --epochs 40 \
        --seeds 1 --kmeans torch --name meta_seed_spread_demo
    # the shipped artifact's recipe (600 meta-steps, faiss k-means, full CoOp schedule, seeds 1-3)
    python benchmarks/meta_seed_spread.py --meta-seeds 0 1 2 3 4 --steps 600 --seeds 1 2 3 --kmeans faiss \
        --with-shipped --name meta_seed_spread_v3
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch
from omegaconf import OmegaConf

from gramvl.backbone import load_backbone
from gramvl.engine.protocols import ProtocolConfig, record_path, run_protocol
from gramvl.engine.results import markdown_table, versions
from gramvl.gram.attach import resolve_artifact
from gramvl.gram.cmhc import CMHCConfig
from gramvl.gram.meta import MetaConfig
from gramvl.gram.pipeline import MetaTrainJob, run_meta_train
from gramvl.io import write_json, write_text

OUT = Path(__file__).resolve().parents[1] / "docs" / "results"
PROTOCOL_METRIC = {"base2new": "hm", "dg": "accuracy", "fewshot": "accuracy", "xd": "accuracy"}
# the cross-dataset targets of the xd tables (xd_*_gram_v3): the six other OpenMoji colour sets
XD_TARGETS = ["emoji-animals", "emoji-food", "emoji-activities", "emoji-travel", "emoji-objects", "emoji-faces"]
HOST_NAMES = {"coop": "CoOp", "cocoop": "CoCoOp", "maple": "MaPLe", "vpt": "VPT", "ivlp": "IVLP"}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def parse_host_opts(items: list[str]) -> dict:
    """KEY=VALUE host options, read as `benchmarks/protocols.py --set` reads them."""
    return OmegaConf.to_container(OmegaConf.from_dotlist(list(items)))


def evaluate(bb, args, work: Path, label: str, gram: str | None, host: dict) -> dict:
    """args.method (+ GRAM) on emoji-nature under args.protocol: the protocol's metric (mean over the seeds, in
    %), the same per seed, and base and new for base-to-new."""
    metric = PROTOCOL_METRIC[args.protocol]
    p = ProtocolConfig(protocol=args.protocol, method=args.method, datasets=["emoji-nature"], seeds=args.seeds,
                       shots=[args.shots], out=str(work / label), epochs=args.epochs, gram=gram, host=dict(host),
                       targets=XD_TARGETS if args.protocol == "xd" else [])
    summary = run_protocol(p, progress=False, bb=bb)
    per_seed = []
    for s in args.seeds:
        rec = json.loads(record_path(work / label, "emoji-nature", args.shots, s).read_text())
        per_seed.append(100 * rec["metrics"][metric])
    a = summary["average"]
    return {**{k: 100 * a[k] for k in ("base", "new") if k in a}, metric: 100 * a[metric],
            f"{metric}_per_seed": per_seed}


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--meta-seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, nargs="+", default=[2],
                    help="CPU thread counts; every meta-seed is meta-trained and evaluated with each")
    ap.add_argument("--tune-threads", type=int, default=None,
                    help="CPU threads of the tuning runs (default: the thread count of the artifact's meta-training)")
    ap.add_argument("--steps", type=int, default=600, help="meta-steps")
    ap.add_argument("--epochs", type=int, default=None, help="tuning epochs (default: the host's schedule)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="downstream (few-shot) seeds")
    ap.add_argument("--protocol", choices=sorted(PROTOCOL_METRIC), default="base2new",
                    help="base2new (HM), dg (emoji-nature -> its line art), xd (emoji-nature -> the six other "
                         "colour sets, mean accuracy) or fewshot (accuracy)")
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--host-set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="host options for meta-training and tuning alike, e.g. n_ctx=4 'ctx_init=a photo of a'")
    ap.add_argument("--meta-host", default="coop", choices=["coop", "vpt", "ivlp", "maple"],
                    help="the host the artifacts are meta-trained for (meta.host)")
    ap.add_argument("--unigram", action="store_true", help="meta-train text and visual slots jointly (ivlp)")
    ap.add_argument("--meta-set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="more MetaConfig fields, e.g. second_order=false")
    ap.add_argument("--method", default=None,
                    help="the host tuned with each artifact (default: --meta-host), e.g. cocoop with CoOp artifacts")
    ap.add_argument("--tune-set", nargs="*", default=None, metavar="KEY=VALUE",
                    help="the tuned host's options when they differ from --host-set (none given: its defaults)")
    ap.add_argument("--theta-anchor", type=float, default=0.0, help="meta.theta_anchor of the meta-training")
    ap.add_argument("--kmeans", choices=["torch", "faiss"], default="faiss",
                    help="CMHC's k-means (a clean clone without gramvl[scale] uses torch)")
    ap.add_argument("--with-shipped", action="store_true",
                    help="add a reference row: the shipped artifact (--gram default), outside the spread")
    ap.add_argument("--reference", nargs="*", default=[],
                    help="more reference rows: existing artifacts (e.g. the one a table used), outside the spread")
    ap.add_argument("--work", default="runs/meta_seed_spread")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--name", default="meta_seed_spread")
    args = ap.parse_args()
    args.method = args.method or args.meta_host
    t0 = time.time()
    metric = PROTOCOL_METRIC[args.protocol]
    head = {"hm": "HM", "accuracy": "accuracy"}[metric]
    host = parse_host_opts(args.host_set)
    tune = host if args.tune_set is None else parse_host_opts(args.tune_set)
    name = HOST_NAMES.get(args.method, args.method)
    # the MetaConfig fields this script's own options set (the seed comes from --meta-seeds)
    meta_fixed = dict(host=args.meta_host, unigram=args.unigram, steps=args.steps, host_cfg=dict(host),
                      theta_anchor=args.theta_anchor)
    meta_extra = parse_host_opts(args.meta_set)
    if unknown := set(meta_extra) - set(MetaConfig.__dataclass_fields__):
        raise SystemExit(f"--meta-set: unknown MetaConfig field(s) {sorted(unknown)}")
    if own := set(meta_extra) & (set(meta_fixed) | {"seed"}):
        raise SystemExit(f"--meta-set: {sorted(own)} have their own options (--meta-host, --unigram, --steps, "
                         "--meta-seeds, --host-set, --theta-anchor)")
    work = Path(args.work) / args.name
    bb = load_backbone("small")
    torch.set_num_threads(args.tune_threads or args.threads[0])
    base = evaluate(bb, args, work, args.method, None, tune)
    print(f"{name}: {base}", flush=True)

    def row(first: list[str], r: dict) -> list[str]:
        return first + ([f"{r['base']:.2f}", f"{r['new']:.2f}"] if metric == "hm" else []) + [
            f"{r[metric]:.2f}", " / ".join(f"{h:.2f}" for h in r[f"{metric}_per_seed"]),
            f"{r[metric] - base[metric]:+.2f}"]

    arts, rows = [], []
    done: dict[tuple[str, int], dict] = {}  # (artifact sha256, tuning threads) -> its evaluation
    for ms in args.meta_seeds:
        for th in args.threads:
            torch.set_num_threads(th)
            art = work / f"gram_ms{ms}_t{th}.safetensors"
            if not art.is_file():
                job = MetaTrainJob(meta=MetaConfig(**meta_fixed, seed=ms, **meta_extra),
                                   cmhc=replace(CMHCConfig(), use_faiss=args.kmeans == "faiss"))
                run_meta_train(job, art, bb=bb, progress=False)
            tune_th = args.tune_threads or th
            torch.set_num_threads(tune_th)
            side = json.loads(art.with_suffix(".json").read_text())
            digest = sha256(art)
            if (digest, tune_th) in done:  # the same bytes (meta-training no longer depends on the thread
                r = dict(done[digest, tune_th])  # count, session 16), tuned the same way: the same evaluation
            else:  # an artifact evaluated before with another tuning thread count gets its own folder
                folder = f"gram_{digest[:12]}" + (f"_tune{tune_th}" if any(d == digest for d, _ in done) else "")
                r = evaluate(bb, args, work, folder, str(art), tune)
                done[digest, tune_th] = dict(r)
            r.update({"meta_seed": ms, "threads": th, "artifact": str(art), "sha256": digest,
                      "steps_done": side["steps_done"], "kmeans_backend": side["kmeans_backend"],
                      "corpus_features_sha256": side.get("corpus_features_sha256")})
            arts.append(r)
            print(f"meta-seed {ms}, {th} thread(s): {r}", flush=True)
            rows.append(row([str(ms), str(th), digest[:12]], r))
    torch.set_num_threads(args.tune_threads or args.threads[0])
    refs = (["default"] if args.with_shipped else []) + list(args.reference)
    references = []
    for ref in refs:
        path = resolve_artifact(ref)
        digest = sha256(path)
        r = evaluate(bb, args, work, "gram_shipped" if ref == "default" else f"gram_ref_{digest[:12]}", ref, tune)
        r.update({"artifact": str(path.name) if ref == "default" else str(path), "sha256": digest,
                  "shipped": ref == "default"})
        references.append(r)
        print(f"reference {ref}: {r}", flush=True)
    vals = [r[metric] for r in arts]
    m, s = mean_std(vals)
    # the downstream seeds' spread of one artifact, averaged over the artifacts (what the tables' ± measure)
    within = (statistics.fmean(mean_std(r[f"{metric}_per_seed"])[1] for r in arts)
              if len(args.seeds) > 1 else None)
    summary = {f"{metric}_mean": m, f"{metric}_std_over_artifacts": s, f"{metric}_min": min(vals),
               f"{metric}_max": max(vals), f"{args.method}_{metric}": base[metric], "gain_mean": m - base[metric],
               # (named for the first tables, which tuned CoOp: the artifacts over the plain tuned host)
               "artifacts_over_coop": sum(v > base[metric] for v in vals), "artifacts": len(vals),
               "within_artifact_std_over_seeds": within}
    cmd = (f"python benchmarks/meta_seed_spread.py --meta-seeds {' '.join(map(str, args.meta_seeds))} --threads "
           f"{' '.join(map(str, args.threads))} --steps {args.steps}"
           + (f" --tune-threads {args.tune_threads}" if args.tune_threads else "")
           + (f" --epochs {args.epochs}" if args.epochs else "")
           + f" --seeds {' '.join(map(str, args.seeds))} --kmeans {args.kmeans} --name {args.name}"
           + (f" --protocol {args.protocol}" if args.protocol != "base2new" else "")
           + (f" --shots {args.shots}" if args.shots != 16 else "")
           + (" --host-set " + " ".join(f"'{x}'" if " " in x else x for x in args.host_set) if args.host_set else "")
           + (f" --theta-anchor {args.theta_anchor:g}" if args.theta_anchor else "")
           + (f" --meta-host {args.meta_host}" if args.meta_host != "coop" else "")
           + (" --unigram" if args.unigram else "")
           + (" --meta-set " + " ".join(args.meta_set) if args.meta_set else "")
           + (f" --method {args.method}" if args.method != args.meta_host else "")
           + (" --tune-set" + "".join(f" '{x}'" if " " in x else f" {x}" for x in args.tune_set)
              if args.tune_set is not None else "")
           + (" --with-shipped" if args.with_shipped else "")
           + (" --reference " + " ".join(args.reference) if args.reference else ""))
    shipped = next((r for r in references if r["shipped"]), None)
    record = {"command": cmd, "protocol": args.protocol, "method": args.method, "host": host, "tune_host": tune,
              "theta_anchor": args.theta_anchor,
              args.method: base, "gram": arts, "shipped": shipped, "references": references, "summary": summary,
              "versions": versions(), "seconds": time.time() - t0}
    out = Path(args.out)
    write_json(out / f"{args.name}.json", record)
    blank = ["", ""] if metric == "hm" else []
    rows.append(["**all**", "", f"{len(vals)} artifacts"] + blank + [
        f"**{m:.2f} ± {s:.2f}**", f"min {min(vals):.2f}, max {max(vals):.2f}", f"{m - base[metric]:+.2f}"])
    for r in references:
        rows.append(row([f"shipped `{r['artifact']}`" if r["shipped"] else f"reference `{r['artifact']}`", "",
                         r["sha256"][:12]], r))
    what = {"base2new": f"Base-to-new {name}{{host}} + GRAM on emoji-nature, {args.shots} shots",
            "dg": f"DG: {name}{{host}} + GRAM trained on emoji-nature ({args.shots} shots), accuracy on its line art",
            "fewshot": f"Few-shot {name}{{host}} + GRAM on emoji-nature, {args.shots} shots",
            "xd": f"Cross-dataset: {name}{{host}} + GRAM trained on emoji-nature ({args.shots} shots), mean accuracy "
                  f"on the six other colour sets ({', '.join(XD_TARGETS)})"}[args.protocol]
    host_txt = (f" ({', '.join(f'{k} = {v!r}' for k, v in tune.items())})" if tune else
                " (M = 16)" if args.method == "coop" else " (its defaults)")
    meta_name = HOST_NAMES[args.meta_host] + (" + UNIGRAM" if args.unigram else "")
    if tune != host or args.method != args.meta_host or args.unigram:
        host_txt += (f" with artifacts meta-trained for {meta_name} ({', '.join(f'{k} = {v!r}' for k, v in host.items())})"
                     if host else f" with artifacts meta-trained for {meta_name}"
                     + (" (M = 16)" if args.meta_host == "coop" else ""))
    md = ["# GRAM's spread over meta-training runs\n\n",
          what.format(host=host_txt) + f", downstream seeds {', '.join(map(str, args.seeds))}, {name} "
          f"{'for ' + str(args.epochs) + ' epochs' if args.epochs else 'with its schedule'}"
          f"; each row is one artifact meta-trained for {args.steps} steps ({args.kmeans} k-means"
          + (f", θ anchored to the words with radius {args.theta_anchor:g}" if args.theta_anchor else "")
          + (f"; {', '.join(args.meta_set)}" if args.meta_set else "")
          + f") with the meta-seed and CPU thread count of its row. Plain {name} with the same seeds: "
          + (f"base {base['base']:.2f}, new {base['new']:.2f}, " if metric == "hm" else "")
          + f"**{head} {base[metric]:.2f}** (per seed: "
          + " / ".join(f"{h:.2f}" for h in base[f"{metric}_per_seed"]) + ").\n\n",
          markdown_table(["meta-seed", "threads", "artifact sha256"] + (["base", "new"] if metric == "hm" else [])
                         + [head, f"{head} per seed", f"{head} - {name}"], rows),
          f"\n{summary['artifacts_over_coop']} of {len(vals)} artifacts beat plain {name}'s {head}. "
          + (f"The spread over the downstream seeds of one artifact (the ± of the other tables), averaged over "
             f"the artifacts: {within:.2f}.\n" if within is not None else "\n"),
          f"\nCommand: `{cmd}`; wall time {time.time() - t0:.0f} s; gramvl commit {record['versions']['git_commit']}.\n"]
    write_text(out / f"{args.name}.md", "".join(md))


if __name__ == "__main__":
    main()
