"""The field's protocols as code: few-shot, base-to-new, cross-dataset (xd) and domain generalization (dg).

Every (dataset, shots, seed) unit writes one JSON record under OUT/records/; a unit whose record exists is
skipped (an interrupted protocol resumes). The aggregate (mean ± std over seeds; HM computed here) is
written as OUT/summary.json + OUT/summary.md and can be rebuilt from records with `gramvl report OUT`.
Under torchrun every rank runs every unit (data-parallel inside); rank 0 alone writes the folder.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gramvl import dist
from gramvl.backbone import Backbone, load_backbone
from gramvl.data.base import ImageDataset
from gramvl.data.features import image_features
from gramvl.data.fewshot import harmonic_mean, sample_few_shot, split_base_new
from gramvl.data.registry import get_dataset
from gramvl.engine.results import make_record, markdown_table, save_record
from gramvl.engine.train import (
    TrainConfig,
    Trainer,
    config_hash,
    evaluate_sets,
    resolved_recipe,
    run_identity,
)
from gramvl.errors import GramvlError
from gramvl.io import write_json, write_text
from gramvl.prompts import HOSTS, build_host

PROTOCOLS = ("fewshot", "base2new", "xd", "dg")


@dataclass
class ProtocolConfig:
    protocol: str = "fewshot"
    method: str = "coop"
    datasets: list[str] = field(default_factory=lambda: ["emoji-animals"])
    targets: list[str] = field(default_factory=list)  # xd / dg targets (default: see resolve_targets)
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    shots: list[int] = field(default_factory=lambda: [16])
    out: str = "runs/protocol"
    model: str = "small"
    weights: str | None = None
    data_root: str | None = None
    device: str = "cpu"
    precision: str = "fp32"
    epochs: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    train_views: int | None = None
    gram: str | None = None
    gram_parts: str = "both"
    eval_split: str = "test"  # 'val' for recipe tuning (never tune on test)
    host: dict[str, Any] = field(default_factory=dict)


def resolve_targets(p: ProtocolConfig) -> list[str]:
    if p.targets:
        return list(p.targets)
    if p.protocol == "xd":
        return list(p.datasets[1:])
    if p.protocol == "dg":
        return [f"{d}-lineart" for d in p.datasets]
    return []


def _train_cfg(p: ProtocolConfig, bb: Backbone, dataset: str, shots: int, seed: int, subsample: str) -> TrainConfig:
    """A unit's training config: the method's own setting for this protocol (`protocol_setting`), then the
    protocol's explicit epochs and host options."""
    recipe, host = HOSTS[p.method].protocol_setting(p.protocol, bb) if p.method in HOSTS else ({}, {})
    return TrainConfig(method=p.method, dataset=dataset, shots=shots, seed=seed, subsample=subsample,
                       model=p.model, weights=p.weights, data_root=p.data_root,
                       epochs=p.epochs if p.epochs is not None else recipe.get("epochs"), lr=p.lr,
                       batch_size=p.batch_size, train_views=p.train_views, device=p.device,
                       precision=p.precision, gram=p.gram, gram_parts=p.gram_parts,
                       host={**host, **p.host, "seed": seed})


def train_host(cfg: TrainConfig, bb: Backbone, ckpt: Path | None = None, progress: bool = True):
    """Few-shot sample, build the host, attach GRAM if asked, train. Returns (host, train info)."""
    train_full = get_dataset(cfg.dataset, "train", cfg.data_root)
    if cfg.subsample != "all":
        train_full = split_base_new(train_full, cfg.subsample)
    train = sample_few_shot(train_full, cfg.shots, cfg.seed)
    host = build_host(cfg.method, bb, train.classnames, cfg.host)
    info: dict = {"train_images": len(train), "classes": train.num_classes}
    if cfg.gram:
        from gramvl.gram.attach import attach

        info["gram"] = attach(host, cfg.gram, parts=cfg.gram_parts)
    host_cls = HOSTS[cfg.method]
    recipe = resolved_recipe(host_cls, cfg, bb.ident)
    info["recipe"] = asdict(recipe)
    if cfg.method == "linear_probe":
        val = get_dataset(cfg.dataset, "val", cfg.data_root)
        if cfg.subsample != "all":
            val = split_base_new(val, cfg.subsample)
        ftr, ytr = image_features(bb, train, progress=progress)
        fva, yva = image_features(bb, val, progress=progress)
        info.update(host.fit(ftr, ytr, fva, yva) or {})
    else:
        trainer = Trainer(host, recipe, cfg.seed, ckpt=ckpt, device=cfg.device, precision=cfg.precision,
                          progress=progress, identity=run_identity(cfg, bb, recipe))
        info.update(trainer.fit(train))
        info["loss_curve"] = [h["loss"] for h in trainer.history]
    return host, info


def eval_sets(p: ProtocolConfig, dataset: str) -> dict[str, ImageDataset]:
    test = get_dataset(dataset, p.eval_split, p.data_root)
    if p.protocol == "base2new":
        return {"base": split_base_new(test, "base"), "new": split_base_new(test, "new")}
    sets = {dataset: test}
    for t in resolve_targets(p):
        sets[t] = get_dataset(t, p.eval_split, p.data_root)
    return sets


def run_unit(p: ProtocolConfig, bb: Backbone, dataset: str, shots: int, seed: int, progress: bool = True) -> dict:
    """Train (or not, for zero-shot) and evaluate one (dataset, shots, seed) unit; returns its record."""
    t0 = time.time()
    subsample = "base" if p.protocol == "base2new" else "all"
    cfg = _train_cfg(p, bb, dataset, shots, seed, subsample)
    ckpt = Path(p.out) / "checkpoints" / f"{unit_name(dataset, shots, seed)}.safetensors"
    host, info = train_host(cfg, bb, ckpt, progress)
    metrics: dict = evaluate_sets(host, eval_sets(p, dataset), p.device)
    if p.protocol == "base2new":
        metrics["hm"] = harmonic_mean(metrics["base"], metrics["new"])
    elif p.protocol in ("xd", "dg"):
        metrics["source"] = metrics[dataset]
        targets = resolve_targets(p)
        metrics["accuracy"] = float(np.mean([metrics[t] for t in targets])) if targets else metrics[dataset]
    else:
        metrics["accuracy"] = metrics[dataset]
    cfgd = asdict(cfg)
    cfgd.update({"protocol": p.protocol, "backbone": bb.ident})
    return make_record(p.protocol, cfgd, metrics, time.time() - t0, train=info, dataset=dataset, shots=shots,
                       seed=seed, method=p.method, gram=bool(p.gram))


def unit_identity(p: ProtocolConfig, bb: Backbone, dataset: str, shots: int, seed: int) -> dict:
    """What a unit's record depends on: its training config (not the device), the protocol, the evaluation
    split and targets, the backbone, and the content of the GRAM artifact."""
    cfg = asdict(_train_cfg(p, bb, dataset, shots, seed, "base" if p.protocol == "base2new" else "all"))
    cfg.pop("device", None)
    cfg.update(protocol=p.protocol, eval_split=p.eval_split, targets=resolve_targets(p))
    ident = {"config": config_hash(cfg), "backbone": bb.ident}
    if p.gram:
        from gramvl.gram.attach import artifact_digest

        ident["gram"] = artifact_digest(p.gram)
    return ident


def reusable(path: Path, ident: dict) -> bool:
    """Whether the record at `path` is this unit's result (an interrupted run resumes by skipping it). A
    record of another run (other config, model or GRAM artifact) is an error, never silently reused.
    Records written before gramvl stored identities are reused as before."""
    if not path.is_file():
        return False
    try:
        got = json.loads(path.read_text()).get("unit_identity")
    except json.JSONDecodeError as e:
        raise GramvlError(f"corrupt record {path}: {e}; remove it to run the unit again") from e
    if got is None or got == ident:
        return True
    what = {"config": "configuration", "backbone": "model", "gram": "GRAM artifact"}
    diff = [what.get(k, k) for k in sorted(set(got) | set(ident)) if got.get(k) != ident.get(k)]
    raise GramvlError(f"{path} was made by another run (different {', '.join(diff)}); remove it, or write "
                      f"this run to another --out folder")


def unit_name(dataset: str, shots: int, seed: int) -> str:
    """File name of a unit; 'folder:/data/x' becomes 'folder__data_x' (one file, not nested folders)."""
    safe = re.sub(r"[/:\\]", "_", dataset)
    return f"{safe}_{shots}shot_seed{seed}"


def record_path(out: str | Path, dataset: str, shots: int, seed: int) -> Path:
    return Path(out) / "records" / f"{unit_name(dataset, shots, seed)}.json"


def run_protocol(p: ProtocolConfig, progress: bool = True, bb: Backbone | None = None) -> dict:
    if p.protocol not in PROTOCOLS:
        raise GramvlError(f"unknown protocol {p.protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    if p.method not in HOSTS:
        raise GramvlError(f"unknown method {p.method!r}; choose one of {', '.join(HOSTS)}")
    bb = bb or load_backbone(p.model, p.weights, device=p.device)
    shots = p.shots if p.protocol == "fewshot" else [max(p.shots)]
    datasets = p.datasets[:1] if p.protocol == "xd" else p.datasets
    if dist.is_main():
        write_json(Path(p.out) / "protocol.json", asdict(p))
    for d in datasets:
        for k in shots:
            for s in p.seeds:
                path = record_path(p.out, d, k, s)
                ident = unit_identity(p, bb, d, k, s)
                # every rank reads the same record (and raises the same error); rank 0's answer decides
                if dist.broadcast_object(reusable(path, ident)):
                    continue
                rec = run_unit(p, bb, d, k, s, progress)
                rec["unit_identity"] = ident
                if dist.is_main():
                    save_record(path, rec)
    return dist.broadcast_object(summarize(p.out) if dist.is_main() else None)


# ----------------------------------------------------------------------------------------- aggregate
def _ms(values: list[float]) -> dict:
    a = np.asarray(values, dtype=float)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=0)), "n": len(a)}


def load_records(out: str | Path) -> list[dict]:
    recs = []
    for f in sorted((Path(out) / "records").glob("*.json")):
        try:
            recs.append(json.loads(f.read_text()))
        except json.JSONDecodeError as e:
            raise GramvlError(f"corrupt record {f}: {e}") from e
    if not recs:
        raise GramvlError(f"no records under {Path(out) / 'records'}; run `gramvl protocol ... --out {out}` first")
    return recs


def summarize(out: str | Path) -> dict:
    """Aggregate records into summary.json + summary.md (mean ± std over seeds; HM from mean base/new)."""
    recs = load_records(out)
    protocol = recs[0]["kind"]
    method = recs[0].get("method")
    keys = ["base", "new"] if protocol == "base2new" else ["accuracy"]
    by: dict[tuple[str, int], list[dict]] = {}
    for r in recs:
        by.setdefault((r["dataset"], r["shots"]), []).append(r)
    per_shot: dict[int, dict[str, dict]] = {}
    for (d, k), rs in sorted(by.items()):
        entry: dict = {"seeds": sorted(r["seed"] for r in rs)}
        for key in keys:
            st = _ms([r["metrics"][key] for r in rs])
            entry[key], entry[f"{key}_std"] = st["mean"], st["std"]
        if protocol == "base2new":
            entry["hm"] = harmonic_mean(entry["base"], entry["new"])
            entry["hm_std"] = _ms([r["metrics"]["hm"] for r in rs])["std"]
        if protocol in ("xd", "dg"):
            entry["source"] = float(np.mean([r["metrics"]["source"] for r in rs]))
            targets = [t for t in rs[0]["metrics"] if t not in ("source", "accuracy", d)]
            entry["targets"] = {t: _ms([r["metrics"][t] for r in rs]) for t in targets}
        per_shot.setdefault(k, {})[d] = entry
    summary: dict = {"protocol": protocol, "method": method, "gram": bool(recs[0].get("gram")),
                     "by_shots": {}, "records": len(recs)}
    for k, per in sorted(per_shot.items()):
        avg: dict = {}
        for key in keys:
            avg[key] = float(np.mean([e[key] for e in per.values()]))
        if protocol == "base2new":
            avg["hm"] = harmonic_mean(avg["base"], avg["new"])
        summary["by_shots"][str(k)] = {"average": avg, "per_dataset": per}
    top = str(max(per_shot))
    summary["average"] = summary["by_shots"][top]["average"]
    summary["per_dataset"] = summary["by_shots"][top]["per_dataset"]
    summary["shots"] = int(top)
    write_json(Path(out) / "summary.json", summary)
    write_text(Path(out) / "summary.md", summary_markdown(summary))
    return summary


def _pm(m: float, s: float) -> str:
    return f"{100 * m:.2f} ± {100 * s:.2f}"


def summary_markdown(s: dict) -> str:
    title = f"# {s['protocol']}: {s['method']}{' + GRAM' if s['gram'] else ''}\n\n"
    lines = [title, "Accuracy in %, mean ± std over seeds.\n\n"]
    for k, block in s["by_shots"].items():
        per = block["per_dataset"]
        if s["protocol"] == "base2new":
            rows = [[d, _pm(e["base"], e["base_std"]), _pm(e["new"], e["new_std"]), f"{100 * e['hm']:.2f}"]
                    for d, e in per.items()]
            a = block["average"]
            rows.append(["**average**", f"{100 * a['base']:.2f}", f"{100 * a['new']:.2f}", f"{100 * a['hm']:.2f}"])
            lines.append(f"## {k} shots\n\n" + markdown_table(["dataset", "base", "new", "HM"], rows))
        elif s["protocol"] in ("xd", "dg"):
            rows = []
            for d, e in per.items():
                rows.append([f"{d} (source)", f"{100 * e['source']:.2f}"])
                rows += [[t, _pm(v["mean"], v["std"])] for t, v in e["targets"].items()]
            rows.append(["**target average**", f"{100 * block['average']['accuracy']:.2f}"])
            lines.append(f"## {k} shots\n\n" + markdown_table(["dataset", "accuracy"], rows))
        else:
            rows = [[d, _pm(e["accuracy"], e["accuracy_std"]), len(e["seeds"])] for d, e in per.items()]
            rows.append(["**average**", f"{100 * block['average']['accuracy']:.2f}", ""])
            lines.append(f"## {k} shots\n\n" + markdown_table(["dataset", "accuracy", "seeds"], rows))
        lines.append("\n")
    return "".join(lines)


def plot_summary(out: str | Path) -> list[Path]:
    """Few-shot curves or base/new bars from summary.json (PNG files next to it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = json.loads((Path(out) / "summary.json").read_text())
    files = []
    if s["protocol"] == "fewshot" and len(s["by_shots"]) > 1:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ks = sorted(int(k) for k in s["by_shots"])
        datasets = list(s["by_shots"][str(ks[-1])]["per_dataset"])
        for d in datasets + ["average"]:
            ys = [100 * (s["by_shots"][str(k)]["average"]["accuracy"] if d == "average"
                         else s["by_shots"][str(k)]["per_dataset"].get(d, {}).get("accuracy", math.nan)) for k in ks]
            ax.plot(ks, ys, marker="o", lw=2.5 if d == "average" else 1, label=d)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_xlabel("shots per class")
        ax.set_ylabel("accuracy (%)")
        ax.legend(fontsize=6)
        f = Path(out) / "fewshot.png"
        fig.tight_layout()
        fig.savefig(f, dpi=120)
        files.append(f)
        plt.close(fig)
    if s["protocol"] == "base2new":
        per = s["per_dataset"]
        names = list(per)
        x = np.arange(len(names))
        fig, ax = plt.subplots(figsize=(max(5, len(names)), 3.5))
        ax.bar(x - 0.2, [100 * per[n]["base"] for n in names], 0.4, label="base")
        ax.bar(x + 0.2, [100 * per[n]["new"] for n in names], 0.4, label="new")
        ax.set_xticks(x, names, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("accuracy (%)")
        ax.legend()
        f = Path(out) / "base2new.png"
        fig.tight_layout()
        fig.savefig(f, dpi=120)
        files.append(f)
        plt.close(fig)
    return files
