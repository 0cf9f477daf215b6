"""One table of every host with and without GRAM across the protocols, assembled from the protocol summaries
in docs/results/ (no run of its own): base-to-new HM, 1 to 16 shots, cross-dataset and DG on emoji-nature,
3 seeds each. Each cell is `host -> host + GRAM (difference)`; the sources of every cell are listed under the
table. Two tables: sessions 1-6 on small-v1 (docs/results/gram_summary.{json,md}) and the current `small`
(sessions 8-12, docs/results/gram_summary_v3.{json,md}). The v3 table also lists the cells checked over
several meta-training runs (META_CHECKS_V3, from benchmarks/meta_seed_spread.py's result files).

    python benchmarks/gram_summary.py            # both
    python benchmarks/gram_summary.py --only v3
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gramvl.engine.results import markdown_table
from gramvl.io import write_json, write_text

RES = Path(__file__).resolve().parents[1] / "docs" / "results"
COLUMNS = ["hm", "1", "2", "4", "8", "16", "xd", "dg"]
HEAD = {"hm": "base-to-new HM", "1": "1 shot", "2": "2 shots", "4": "4 shots", "8": "8 shots",
        "16": "16 shots", "xd": "cross-dataset (6 targets)", "dg": "DG (line art)"}

# host -> (artifact, {column: ((host file, host row), (GRAM file, GRAM row))}); a file holds one protocol
# summary (benchmarks/protocols.py); a curve file covers the columns 2-16 (and 1 where it has it)
C = "coop + GRAM"
SOURCES_V1 = {
    "CoOp (M = 16, random init)": ("gramvl/assets/gram_coop.safetensors (shipped default, session 4)", {
        "hm": (("base2new_coop_gram2", "coop"), ("base2new_coop_gram4", C)),
        "curve": (("fewshot_text_hosts", "coop"), ("fewshot_coop_gram4_curve", C)),
        "xd": (("xd_hosts", "coop"), ("xd_coop_gram4", C)),
        "dg": (("dg_hosts", "coop"), ("dg_coop_gram4", C))}),
    "CoOp (M = 4, 'a photo of a')": ("runs/gram6/m4_anchor05 (θ anchored to the words, session 5)", {
        "hm": (("base2new_coop4_gram2", "coop"), ("base2new_coop4_gram6_anchor05", C)),
        "1": (("fewshot1_coop4_gram2", "coop"), ("fewshot1_coop4_gram6_anchor05", C)),
        "curve": (("fewshot_coop4_curve", "coop"), ("fewshot_coop4_gram6_curve", C))}),
    "CoCoOp": ("runs/gram6/m4_anchor05 (the CoOp M = 4 artifact)", {
        "hm": (("base2new_hosts2", "cocoop"), ("base2new_cocoop_gram6_anchor05", "cocoop + GRAM")),
        "1": (("fewshot_cocoop", "cocoop"), ("fewshot1_cocoop_gram6_anchor05", "cocoop + GRAM")),
        "curve": (("fewshot_cocoop", "cocoop"), ("fewshot_cocoop_gram6_curve", "cocoop + GRAM")),
        "xd": (("xd_hosts", "cocoop"), ("xd_cocoop_gram6", "cocoop + GRAM")),
        "dg": (("dg_hosts", "cocoop"), ("dg_cocoop_gram6", "cocoop + GRAM"))}),
    "VPT (shallow, 8 tokens)": ("runs/gram4/vpt_lr025_phi3 (first order, session 4)", {
        "hm": (("base2new_hosts2", "vpt"), ("base2new_vpt_gram4", "vpt + GRAM")),
        "1": (("fewshot1_hosts", "vpt"), ("fewshot1_vpt_gram4", "vpt + GRAM")),
        "curve": (("fewshot_visual_hosts", "vpt"), ("fewshot_vpt_gram4_curve", "vpt + GRAM")),
        "xd": (("xd_hosts", "vpt"), ("xd_vpt_gram4", "vpt + GRAM")),
        "dg": (("dg_hosts", "vpt"), ("dg_vpt_gram4", "vpt + GRAM"))}),
    "MaPLe": ("runs/gram6/maple_anchor05 (anchored, first order, session 5)", {
        "hm": (("base2new_hosts2", "maple"), ("base2new_maple_gram6_anchor05", "maple + GRAM")),
        "1": (("fewshot1_hosts", "maple"), ("fewshot1_maple_gram6_anchor05", "maple + GRAM")),
        "curve": (("fewshot_visual_hosts", "maple"), ("fewshot_maple_gram6_curve", "maple + GRAM")),
        "xd": (("xd_hosts", "maple"), ("xd_maple_gram6", "maple + GRAM")),
        "dg": (("dg_hosts", "maple"), ("dg_maple_gram6", "maple + GRAM"))}),
    "IVLP + UNIGRAM": ("runs/gram6/unigram_anchor05 (text + visual slots, anchored, session 5)", {
        "hm": (("base2new_hosts2", "ivlp"), ("base2new_unigram_gram6_anchor05", "ivlp + GRAM")),
        "1": (("fewshot1_hosts", "ivlp"), ("fewshot1_unigram_gram6_anchor05", "ivlp + GRAM")),
        "curve": (("fewshot_visual_hosts", "ivlp"), ("fewshot_unigram_gram6_curve", "ivlp + GRAM")),
        "xd": (("xd_hosts", "ivlp"), ("xd_unigram_gram6", "ivlp + GRAM")),
        "dg": (("dg_hosts", "ivlp"), ("dg_unigram_gram6", "ivlp + GRAM"))}),
}


G = "cocoop + GRAM"
SOURCES_V3 = {
    "CoOp (M = 16, random init)": ("gramvl/assets/gram_coop_v3.safetensors (shipped default of `small`)", {
        "hm": (("base2new_coop_gram_v3", "coop"), ("base2new_coop_gram_v3", C)),
        "curve": (("fewshot_coop_gram_curve_v3", "coop"), ("fewshot_coop_gram_curve_v3", C)),
        "xd": (("xd_coop_gram_v3", "coop"), ("xd_coop_gram_v3", C)),
        "dg": (("dg_coop_gram_v3", "coop"), ("dg_coop_gram_v3", C))}),
    "CoOp (M = 4, 'a photo of a')": ("runs/gram10/m4_anchor025 (θ anchored to the words, radius 0.25 chosen on val; "
                                      "session 10 for HM and 1 shot, made again in session 11 for 2-16 shots, "
                                      "cross-dataset and DG)", {
        "hm": (("base2new_coop4_gram_v3", "coop"), ("base2new_coop4_gram_anchor025_v3", C)),
        "1": (("fewshot1_coop4_v3", "coop"), ("fewshot1_coop4_gram_anchor025_v3", C)),
        "curve": (("fewshot_coop4_gram_curve_v3", "coop"), ("fewshot_coop4_gram_curve_v3", C)),
        "xd": (("xd_coop4_gram_v3", "coop"), ("xd_coop4_gram_v3", C)),
        "dg": (("dg_coop4_gram_v3", "coop"), ("dg_coop4_gram_v3", C))}),
    "CoCoOp": ("runs/gram10/m4_anchor025 (the CoOp M = 4 artifact; session 10 for HM and 1 shot, made again in "
               "session 11 for 2-16 shots, cross-dataset and DG)", {
        "hm": (("base2new_cocoop_v3", "cocoop"), ("base2new_cocoop_gram_anchor025_v3", G)),
        "1": (("fewshot1_cocoop_gram_v3", "cocoop"), ("fewshot1_cocoop_gram_anchor025_v3", G)),
        "curve": (("fewshot_cocoop_gram_curve_v3", "cocoop"), ("fewshot_cocoop_gram_curve_v3", G)),
        "xd": (("xd_cocoop_gram_v3", "cocoop"), ("xd_cocoop_gram_v3", G)),
        "dg": (("dg_cocoop_gram_v3", "cocoop"), ("dg_cocoop_gram_v3", G))}),
    "VPT (shallow, 8 tokens)": ("runs/gram10/vpt (first order, session 10) for HM and 1 shot; runs/gram11/vpt (the "
                                "same recipe meta-trained again, session 11) for 2-16 shots, cross-dataset and DG", {
        "hm": (("base2new_vpt_gram_v3", "vpt"), ("base2new_vpt_gram_v3", "vpt + GRAM")),
        "1": (("fewshot1_vpt_gram_v3", "vpt"), ("fewshot1_vpt_gram_v3", "vpt + GRAM")),
        "curve": (("fewshot_vpt_gram_curve_v3", "vpt"), ("fewshot_vpt_gram_curve_v3", "vpt + GRAM")),
        "xd": (("xd_vpt_gram_v3", "vpt"), ("xd_vpt_gram_v3", "vpt + GRAM")),
        "dg": (("dg_vpt_gram_v3", "vpt"), ("dg_vpt_gram_v3", "vpt + GRAM"))}),
    "MaPLe": ("runs/gram10/maple_anchor05 (anchored, first order, session 10) for HM and 1-16 shots; "
              "runs/gram11/maple_anchor05 (the same recipe meta-trained again, session 11) for cross-dataset and DG", {
        "hm": (("base2new_maple_gram_v3", "maple"), ("base2new_maple_gram_v3", "maple + GRAM")),
        "1": (("fewshot1_maple_gram_v3", "maple"), ("fewshot1_maple_gram_v3", "maple + GRAM")),
        "curve": (("fewshot_maple_gram_curve_v3", "maple"), ("fewshot_maple_gram_curve_v3", "maple + GRAM")),
        "xd": (("xd_maple_gram_v3", "maple"), ("xd_maple_gram_v3", "maple + GRAM")),
        "dg": (("dg_maple_gram_v3", "maple"), ("dg_maple_gram_v3", "maple + GRAM"))}),
    "IVLP + UNIGRAM": ("runs/gram10/unigram_anchor05 (text + visual slots, anchored, session 10) for HM and 1 shot; "
                       "runs/gram11/unigram_anchor05 (the same recipe meta-trained again, session 11) for 2-16 "
                       "shots, cross-dataset and DG", {
        "hm": (("base2new_unigram_gram_v3", "ivlp"), ("base2new_unigram_gram_v3", "ivlp + GRAM")),
        "1": (("fewshot1_unigram_gram_v3", "ivlp"), ("fewshot1_unigram_gram_v3", "ivlp + GRAM")),
        "curve": (("fewshot_unigram_gram_curve_v3", "ivlp"), ("fewshot_unigram_gram_curve_v3", "ivlp + GRAM")),
        "xd": (("xd_unigram_gram_v3", "ivlp"), ("xd_unigram_gram_v3", "ivlp + GRAM")),
        "dg": (("dg_unigram_gram_v3", "ivlp"), ("dg_unigram_gram_v3", "ivlp + GRAM"))}),
}
# which -> (sources, model, output name, what the anchors were)
# cells of the v3 table checked over several meta-training runs (benchmarks/meta_seed_spread.py, sessions 13-14):
# (host, column) -> the meta_seed_spread result file; missing files are skipped
META_CHECKS_V3 = {
    ("CoOp (M = 16, random init)", "hm"): "meta_seed_spread_v3",
    **{("CoOp (M = 16, random init)", k): f"meta_seed_spread_v3_{k}shot" for k in ("1", "2", "4", "8", "16")},
    ("CoOp (M = 16, random init)", "xd"): "meta_seed_spread_v3_xd",
    ("CoOp (M = 16, random init)", "dg"): "meta_seed_spread_v3_dg",
    ("CoOp (M = 4, 'a photo of a')", "hm"): "meta_seed_spread_coop4_b2n",
    ("CoOp (M = 4, 'a photo of a')", "1"): "meta_seed_spread_coop4_1shot",
    **{("CoOp (M = 4, 'a photo of a')", k): f"meta_seed_spread_coop4_{k}shot" for k in ("2", "4", "8", "16")},
    ("CoOp (M = 4, 'a photo of a')", "xd"): "meta_seed_spread_coop4_xd",
    ("CoOp (M = 4, 'a photo of a')", "dg"): "meta_seed_spread_coop4_dg",
    ("CoCoOp", "hm"): "meta_seed_spread_cocoop_b2n",
    ("CoCoOp", "1"): "meta_seed_spread_cocoop_1shot",
    **{("CoCoOp", k): f"meta_seed_spread_cocoop_{k}shot" for k in ("2", "4", "8", "16")},
    ("CoCoOp", "xd"): "meta_seed_spread_cocoop_xd",
    ("CoCoOp", "dg"): "meta_seed_spread_cocoop_dg",
    ("VPT (shallow, 8 tokens)", "hm"): "meta_seed_spread_vpt_b2n",
    ("VPT (shallow, 8 tokens)", "1"): "meta_seed_spread_vpt_1shot",
    **{("VPT (shallow, 8 tokens)", k): f"meta_seed_spread_vpt_{k}shot" for k in ("2", "4", "8", "16")},
    ("VPT (shallow, 8 tokens)", "xd"): "meta_seed_spread_vpt_xd",
    ("VPT (shallow, 8 tokens)", "dg"): "meta_seed_spread_vpt_dg",
    ("MaPLe", "hm"): "meta_seed_spread_maple_b2n",
    ("MaPLe", "1"): "meta_seed_spread_maple_1shot",
    **{("MaPLe", k): f"meta_seed_spread_maple_{k}shot" for k in ("2", "4", "8", "16")},
    ("MaPLe", "xd"): "meta_seed_spread_maple_xd",
    ("MaPLe", "dg"): "meta_seed_spread_maple_dg",
    ("IVLP + UNIGRAM", "hm"): "meta_seed_spread_unigram_b2n",
    ("IVLP + UNIGRAM", "1"): "meta_seed_spread_unigram_1shot",
    **{("IVLP + UNIGRAM", k): f"meta_seed_spread_unigram_{k}shot" for k in ("2", "4", "8", "16")},
    ("IVLP + UNIGRAM", "xd"): "meta_seed_spread_unigram_xd",
    ("IVLP + UNIGRAM", "dg"): "meta_seed_spread_unigram_dg",
}  # a cell whose result file does not exist yet is left out

TABLES = {
    "v1": (SOURCES_V1, "small-v1, sessions 1-6", "gram_summary",
           "Word-initialised hosts use θ* anchored to the words (`meta.theta_anchor=0.5`, session 5)."),
    "v3": (SOURCES_V3, "`small`, sessions 8-12", "gram_summary_v3",
           "Word-initialised hosts use θ* anchored to the words: radius 0.25 for CoOp M = 4 and CoCoOp (chosen on "
           "val, session 10), 0.5 for MaPLe and IVLP + UNIGRAM (session 6's radius)."),
}


def _value(file: str, row: str, column: str) -> tuple[float, float] | None:
    """(mean, std over seeds) in %, or None where the file or the row does not exist."""
    path = RES / f"{file}.json"
    if not path.is_file():
        return None
    res = json.loads(path.read_text())["results"].get(row)
    if res is None:
        return None
    shots = "16" if column in ("hm", "xd", "dg") else column
    entry = res["by_shots"].get(shots)
    if entry is None:
        return None
    key = "hm" if column == "hm" else "accuracy"
    per = entry["per_dataset"]["emoji-nature"]
    return 100 * entry["average"][key], 100 * per.get(f"{key}_std", float("nan"))


def collect(sources: dict) -> dict:
    out = {}
    for host, (artifact, spec) in sources.items():
        cells = {}
        for col in COLUMNS:
            key = col if col in spec else ("curve" if col in "1 2 4 8 16".split() and "curve" in spec else None)
            if key is None:
                continue
            (hf, hr), (gf, gr) = spec[key]
            h, g = _value(hf, hr, col), _value(gf, gr, col)
            if h is not None and g is not None:
                cells[col] = {"host": h[0], "host_std": h[1], "gram": g[0], "gram_std": g[1], "diff": g[0] - h[0],
                              "sources": [f"{hf}: {hr}", f"{gf}: {gr}"]}
        out[host] = {"artifact": artifact, "cells": cells}
    return out


def meta_checks(table: dict, checks: dict) -> list[list[str]]:
    """One row per checked cell: the table's single-artifact difference beside the spread over meta-training runs."""
    rows = []
    for (host, col), file in checks.items():
        path = RES / f"{file}.json"
        cell = table.get(host, {}).get("cells", {}).get(col)
        if not path.is_file() or cell is None:
            continue
        rec = json.loads(path.read_text())
        metric = "hm" if col == "hm" else "accuracy"
        sm = rec["summary"]
        plain = sm[f"{rec.get('method', 'coop')}_{metric}"]
        gains = sorted(a[metric] - plain for a in rec["gram"])
        rows.append([host, HEAD[col], f"{cell['diff']:+.2f}", str(sm["artifacts"]),
                     f"{sm[f'{metric}_mean']:.2f} ± {sm[f'{metric}_std_over_artifacts']:.2f}", f"{plain:.2f}",
                     f"**{sm['gain_mean']:+.2f}** ({gains[0]:+.2f} to {gains[-1]:+.2f})",
                     f"{sm['artifacts_over_coop']} of {sm['artifacts']}", f"`{file}`"])
    return rows


def write_summary(which: str) -> None:
    sources_by_host, model, name, anchors = TABLES[which]
    table = collect(sources_by_host)
    checks = meta_checks(table, META_CHECKS_V3) if which == "v3" else []
    rows, wins = [], []
    for host, t in table.items():
        cells = t["cells"]
        row = [host]
        for col in COLUMNS:
            c = cells.get(col)
            row.append("-" if c is None else f"{c['host']:.2f} ± {c['host_std']:.2f} → {c['gram']:.2f} ± "
                       f"{c['gram_std']:.2f} (**{c['diff']:+.2f}**)")
        rows.append(row)
        n_win = sum(c["diff"] >= 0 for c in cells.values())
        wins.append([host, t["artifact"], f"{n_win} of {len(cells)}"])
    sources = []
    for host, t in table.items():
        for col, c in t["cells"].items():
            sources.append(f"- {host}, {HEAD[col]}: `{c['sources'][0]}` vs `{c['sources'][1]}`\n")
    text = [
        f"# GRAM on every host, every protocol (emoji-nature, 3 seeds, model {model})\n\n",
        "Each cell: host → host + GRAM (difference), accuracy % (HM % for base-to-new), mean ± std over seeds "
        "1-3, "
        "test splits. Base-to-new, cross-dataset and DG train on 16 shots; cross-dataset evaluates on the six "
        "other OpenMoji colour datasets, DG on emoji-nature's line-art set. Assembled by "
        "`benchmarks/gram_summary.py` from the protocol summaries named at the bottom (no run of its own); "
        "'-' where no run exists. " + anchors + " The artifact of each row is named in the second table.\n\n",
        markdown_table(["host", *[HEAD[c] for c in COLUMNS]], rows),
        "\n", markdown_table(["host", "GRAM artifact", "cells where host + GRAM >= host"], wins),
        *(["\nCells checked over several meta-training runs (`benchmarks/meta_seed_spread.py`): each artifact of a "
           "row is the cell's recipe meta-trained with another meta-seed, evaluated with the same downstream seeds "
           "1-3. The ± of the first table covers the downstream seeds of one artifact only; this one is over the "
           "artifacts (each a mean over the seeds).\n\n",
           markdown_table(["host", "cell", "table: GRAM - host", "artifacts", "host + GRAM over the artifacts",
                           "host", "GRAM - host: mean (min to max)", "artifacts over the host", "file"], checks)]
          if checks else []),
        "\nSources (file: row):\n\n", *sources]
    write_json(RES / f"{name}.json", table)
    write_text(RES / f"{name}.md", "".join(text))
    print("".join(text[:3]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=sorted(TABLES), help="write one table (default: both)")
    args = ap.parse_args()
    for which in [args.only] if args.only else sorted(TABLES):
        write_summary(which)


if __name__ == "__main__":
    main()
