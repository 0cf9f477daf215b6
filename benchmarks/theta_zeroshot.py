"""Zero-shot accuracy of meta-learned contexts θ* used as plain prompts (no training), next to the hand-written
"a photo of a" and CoOp's random init: how good an init each GRAM artifact hands to a host before any shot.
With --host (vpt, maple, ivlp, ...) the rows are that host at its own default init (one per seed) and with each
artifact's θ* (init only), evaluated untrained. Writes docs/results/<name>.{json,md}.

    python benchmarks/theta_zeroshot.py --artifacts gramvl/assets/gram_coop.safetensors runs/gram4/m4.safetensors
    python benchmarks/theta_zeroshot.py --host vpt --artifacts runs/gram4/vpt_lr025_phi3.safetensors --name theta_zeroshot_vpt
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from gramvl.backbone import load_backbone
from gramvl.data.registry import get_dataset
from gramvl.engine.results import command_line, markdown_table, versions
from gramvl.engine.train import evaluate
from gramvl.gram.attach import attach, load_artifact
from gramvl.io import write_json, write_text
from gramvl.prompts import HOSTS, host_config
from gramvl.prompts.base import HostConfig

ROOT = Path(__file__).resolve().parents[1]
D7 = ["emoji-nature", "emoji-animals", "emoji-food", "emoji-activities", "emoji-travel", "emoji-objects",
      "emoji-faces"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifacts", nargs="+", required=True)
    ap.add_argument("--datasets", nargs="+", default=D7)
    ap.add_argument("--split", default="test")
    ap.add_argument("--random-seeds", nargs="+", type=int, default=[1, 2, 3],
                    help="seeds of the random 16-token context row (CoOp's default init)")
    ap.add_argument("--host", default="coop", help="coop: the context rows above; another host: its own init")
    ap.add_argument("--name", default="theta_zeroshot")
    args = ap.parse_args()
    t0 = time.time()
    bb = load_backbone("small")
    sets = {n: get_dataset(n, args.split) for n in args.datasets}
    rows_def: list[tuple[str, HostConfig, str | None]] = []
    if args.host == "coop":
        rows_def.append(("hand-written 'a photo of a' (M = 4)", HostConfig(), None))
        rows_def += [(f"random N(0, 0.02), M = 16, seed {s}", HostConfig(n_ctx=16, ctx_init="", seed=s), None)
                     for s in args.random_seeds]
        for a in args.artifacts:
            n_ctx = int(load_artifact(a)[0]["text_ctx"].shape[0])
            rows_def.append((f"θ* of `{a}` (M = {n_ctx})", HostConfig(n_ctx=n_ctx, ctx_init="", seed=1), a))
    else:
        rows_def += [(f"{args.host} default init, seed {s}", host_config(args.host, bb, {"seed": s}), None)
                     for s in args.random_seeds]
        rows_def += [(f"θ* of `{a}`", host_config(args.host, bb, {"seed": 1}), a) for a in args.artifacts]
    results, rows = {}, []
    for label, cfg, art in rows_def:
        accs = {}
        for n, ds in sets.items():
            host = HOSTS[args.host](bb, ds.classnames, cfg)
            if art:
                attach(host, art, parts="init")
            accs[n] = evaluate(host, ds)["accuracy"]
        results[label] = {"artifact": art, "accuracy": accs, "mean": float(np.mean(list(accs.values())))}
        rows.append([label, *[f"{100 * accs[n]:.2f}" for n in sets], f"**{100 * results[label]['mean']:.2f}**"])
        print(rows[-1], flush=True)
    write_json(ROOT / "docs" / "results" / f"{args.name}.json",
               {"results": results, "split": args.split, "model": bb.ident, "versions": versions(),
                "seconds": round(time.time() - t0, 1)})
    md = [f"# Meta-learned contexts as zero-shot prompts ({args.split} split)\n\n",
          f"Model `{bb.ident}`. Host `{args.host}`. Each row: the host with the context below and no training "
          "(for CoOp the prompt `[ctx] <class>.`), accuracy % on the full split. This is the init a host starts "
          "from at 1 shot.\n\n",
          markdown_table(["context", *sets, "mean"], rows),
          f"\nCommand: `{command_line()}`; {time.time() - t0:.0f} s.\n"]
    write_text(ROOT / "docs" / "results" / f"{args.name}.md", "".join(md))


if __name__ == "__main__":
    main()
