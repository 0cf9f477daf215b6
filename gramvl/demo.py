"""`make demo`: the main job on the embedded default, end to end on 2 CPU cores.

Zero-shot table of the packaged small CLIP on every embedded dataset (test splits).
"""

from __future__ import annotations

import time
from pathlib import Path

from gramvl.engine.results import make_record, markdown_table, save_record
from gramvl.io import write_text


def zeroshot_table(bb, names: list[str], progress: bool = True) -> tuple[list[list], dict]:
    from gramvl.data.registry import get_dataset
    from gramvl.engine.evaluate import evaluate_zeroshot

    rows, metrics = [], {}
    for name in names:
        ds = get_dataset(name, "test")
        m = evaluate_zeroshot(bb, ds, progress=progress)
        metrics[name] = m
        rows.append([name, ds.domain, m["num_classes"], m["n"], round(100 * m["accuracy"], 2),
                     round(100 * m["chance"], 2), round(m["accuracy"] / m["chance"], 1)])
    return rows, metrics


def run_demo(out: str = "runs/demo", quick: bool = False) -> int:
    from gramvl.backbone import load_backbone
    from gramvl.data.world import embedded_dataset_names

    t0 = time.time()
    out_p = Path(out)
    bb = load_backbone("small")
    print(f"model: {bb.ident}  (logit scale {float(bb.logit_scale):.1f})")
    names = embedded_dataset_names()
    if quick:
        names = [n for n in names if n in ("emoji-animals", "emoji-animals-lineart", "fashion-mnist")]
    rows, metrics = zeroshot_table(bb, names)
    table = markdown_table(["dataset", "domain", "classes", "test images", "zero-shot acc %", "chance %",
                            "x chance"], rows)
    print("\nZero-shot accuracy of the packaged small CLIP ('a photo of a {}.'):\n")
    print(table)
    write_text(out_p / "zeroshot.md", "# Zero-shot, packaged small CLIP\n\n" + table)
    save_record(out_p / "zeroshot.json", make_record("demo-zeroshot", {"model": bb.ident, "datasets": names},
                                                     metrics, time.time() - t0))
    print(f"demo finished in {time.time() - t0:.0f} s; results in {out_p}/")
    return 0
