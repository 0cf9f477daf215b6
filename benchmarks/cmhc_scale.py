"""CMHC at scale: a 1,000,000-pair synthetic feature corpus with a planted hierarchy, stored as memory-mapped
feature shards (float16, D=512, the ViT-B/16 embedding width), clustered end to end (agreement filter,
two-level hierarchy, weak labels, complexity, safetensors save) with faiss k-means and, on a smaller corpus,
with the torch k-means. Each clustering runs in a fresh process: wall time and peak RSS are its own.

    python benchmarks/cmhc_scale.py                         # 1M with faiss, 200k faiss vs torch (~10 min)
    python benchmarks/cmhc_scale.py --sizes 20000 --torch-sizes 20000 --no-write   # smoke run (~1 min)

The planted corpus (see `generate`): 16 domains with 6..30 classes each (288 classes; more classes in more
dispersed domains), class sizes log-normal, image and caption features = a shared concept vector plus a
per-modality offset (the modality gap) and noise, so that cos(image, caption) is ~0.4 as in CLIP; 5% of the
pairs get the caption and text feature of a random other class (noisy web pairs). Captions are templates
around the class name ("a photo of a striped kite"). Writes docs/results/cmhc_scale.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "results"
DOMAIN_WORDS = ["bird", "car", "flower", "dog", "boat", "chair", "fruit", "tree", "shoe", "lamp", "fish",
                "house", "cake", "guitar", "bottle", "kite"]
ADJECTIVES = ["red", "striped", "tiny", "wooden", "golden", "spotted", "frozen", "ancient", "plastic", "woolly",
              "neon", "rusty", "paper", "glass", "muddy", "silver", "sleepy", "giant", "purple", "curly",
              "broken", "shiny", "velvet", "marble", "tropical", "vintage", "folded", "painted", "floating",
              "burnt"]
TEMPLATES = ["a photo of a {}", "{}", "a {} in the wild", "the {}", "a close-up photo of the {}",
             "an image of a {}"]
GEN_FORMAT = "cmhc-scale-synthetic/1"


# ======================================================================================= planted corpus
def planted_structure(dim: int, seed: int) -> dict:
    """Domain and class centers, class weights and names (the same for every corpus size)."""
    rng = np.random.default_rng([seed, 0])
    n_cls = np.linspace(6, 30, len(DOMAIN_WORDS)).round().astype(int)
    rng.shuffle(n_cls)
    spread = 0.45 + 0.75 * (n_cls - n_cls.min()) / (n_cls.max() - n_cls.min())  # more classes, more spread
    dom = rng.standard_normal((len(DOMAIN_WORDS), dim))
    dom /= np.linalg.norm(dom, axis=1, keepdims=True)
    centers, cls_dom, names, weights = [], [], [], []
    for d, k in enumerate(n_cls):
        r = rng.standard_normal((k, dim))
        c = dom[d] + spread[d] * r / np.linalg.norm(r, axis=1, keepdims=True)
        centers.append(c / np.linalg.norm(c, axis=1, keepdims=True))
        cls_dom += [d] * k
        names += [f"{ADJECTIVES[j]} {DOMAIN_WORDS[d]}" for j in range(k)]
        weights.append(np.exp(0.5 * rng.standard_normal(k)))  # log-normal class sizes within a domain
    w = np.concatenate(weights)
    gaps = rng.standard_normal((2, dim))
    gaps /= np.linalg.norm(gaps, axis=1, keepdims=True)
    return {"centers": np.concatenate(centers).astype(np.float32), "domain": np.array(cls_dom),
            "names": names, "weights": w / w.sum(), "n_classes": n_cls, "spread": spread,
            "gap_image": gaps[0].astype(np.float32), "gap_text": gaps[1].astype(np.float32)}


def generate(folder: Path, n: int, dim: int, seed: int, shard_size: int, noisy: float = 0.05) -> dict:
    """Write the planted corpus as feature shards (float16) plus truth.npz (class, domain, noisy flag)."""
    from gramvl.gram.shards import FeatureShardWriter

    folder.mkdir(parents=True, exist_ok=True)
    want = {"format": GEN_FORMAT, "n": n, "dim": dim, "seed": seed, "shard_size": shard_size, "noisy": noisy}
    stamp = folder / "generated.json"
    if stamp.is_file() and (folder / "manifest.json").is_file():
        made = json.loads(stamp.read_text())
        if {k: made.get(k) for k in want} == want:
            return made  # reused; its "seconds" is the original generation time
    t0 = time.time()
    st = planted_structure(dim, seed)
    w = FeatureShardWriter(folder, f"synthetic-planted-{dim}", dim, "float16", key=f"planted-{n}-{dim}-{seed}")
    recs, truth_cls, truth_noisy = [], [], []
    sig_concept, sig_mod = 0.6 / np.sqrt(dim), 0.6 / np.sqrt(dim)
    for i, s in enumerate(range(0, n, shard_size)):
        rng = np.random.default_rng([seed, 1, i])
        m = min(shard_size, n - s)
        cls = rng.choice(len(st["names"]), size=m, p=st["weights"])
        x = st["centers"][cls] + sig_concept * rng.standard_normal((m, dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        text_cls = cls.copy()
        bad = rng.random(m) < noisy
        text_cls[bad] = rng.integers(len(st["names"]), size=int(bad.sum()))
        xt = x.copy()
        xt[bad] = st["centers"][text_cls[bad]]
        zI = x + st["gap_image"] + sig_mod * rng.standard_normal((m, dim), dtype=np.float32)
        zT = xt + st["gap_text"] + sig_mod * rng.standard_normal((m, dim), dtype=np.float32)
        tmpl = rng.integers(len(TEMPLATES), size=m)
        caps = [TEMPLATES[t].format(st["names"][c]) for t, c in zip(tmpl, text_cls, strict=True)]
        recs.append(w.write(i, zI, zT, caps) | {"file": w.stem(i)})
        truth_cls.append(cls)
        truth_noisy.append(bad & (text_cls != cls))
    w.manifest(recs, complete=True)
    cls = np.concatenate(truth_cls)
    np.savez(folder / "truth.npz", cls=cls, domain=st["domain"][cls], noisy=np.concatenate(truth_noisy))
    want["seconds"] = round(time.time() - t0, 1)
    stamp.write_text(json.dumps(want))
    return want


# ======================================================================================= metrics
def nmi(a: np.ndarray, b: np.ndarray) -> float:
    """Normalized mutual information (arithmetic normalization) of two labelings."""
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    cont = np.bincount(ai * (bi.max() + 1) + bi, minlength=(ai.max() + 1) * (bi.max() + 1)).reshape(
        ai.max() + 1, bi.max() + 1).astype(np.float64)
    p = cont / cont.sum()
    pa, pb = p.sum(1), p.sum(0)
    nz = p > 0
    mi = float((p[nz] * np.log(p[nz] / np.outer(pa, pb)[nz])).sum())
    ha, hb = -float((pa[pa > 0] * np.log(pa[pa > 0])).sum()), -float((pb[pb > 0] * np.log(pb[pb > 0])).sum())
    return 2 * mi / (ha + hb) if ha + hb > 0 else 1.0


def purity(pred: np.ndarray, truth: np.ndarray) -> float:
    order = np.lexsort((truth, pred))
    p, t = pred[order], truth[order]
    total = 0
    for grp in np.split(t, np.flatnonzero(np.diff(p)) + 1):
        total += np.bincount(grp).max()
    return total / len(pred)


def spearman(a, b) -> float:
    ra = np.argsort(np.argsort(a)).astype(float)
    rb = np.argsort(np.argsort(b)).astype(float)
    return float(np.corrcoef(ra, rb)[0, 1])


def evaluate(h, folder: Path, dim: int, seed: int) -> dict:
    """Recovery of the planted hierarchy: filter, domains, classes, complexity, weak labels."""
    t = np.load(folder / "truth.npz")
    cls, dom, noisy = t["cls"], t["domain"], t["noisy"]
    st = planted_structure(dim, seed)
    kept = h.kept
    leaf = h.leaf_of[kept]
    dmap = np.zeros(len(h), dtype=np.int64)
    for d in h.domains():
        dmap[h.leaves(d)] = d
    pdom = dmap[leaf]
    clean = ~noisy[kept]
    out = {"kept": int(len(kept)), "noisy_pairs": int(noisy.sum()),
           "noisy_removed": float(1 - noisy[kept].sum() / max(noisy.sum(), 1)),
           "removed_that_are_noisy": float(noisy[h.leaf_of < 0].mean()),
           "domains": len(h.domains()), "leaves": len(h.leaves()), "planted_domains": len(st["n_classes"]),
           "planted_classes": len(st["names"]),
           "domain_nmi": nmi(pdom[clean], dom[kept][clean]), "domain_purity": purity(pdom[clean], dom[kept][clean]),
           "class_nmi": nmi(leaf[clean], cls[kept][clean]), "class_purity": purity(leaf[clean], cls[kept][clean]),
           "class_inverse_purity": purity(cls[kept][clean], leaf[clean])}
    # complexity: does each found domain's complexity / child count follow its planted class count?
    comp, kids, planted_k = [], [], []
    label_ok = 0
    for d in h.domains():
        members = dom[h.members(d)]
        major = int(np.bincount(members).argmax())
        comp.append(h.complexity[d])
        kids.append(len(h.children_of[d]))
        planted_k.append(int(st["n_classes"][major]))
    for lf in h.leaves():
        m = cls[h.members(lf)]
        if len(m):
            label_ok += st["names"][int(np.bincount(m).argmax())] in h.labels[lf]
    out.update(complexity_vs_planted_classes_spearman=spearman(comp, planted_k),
               children_vs_planted_classes_spearman=spearman(kids, planted_k),
               weak_label_accuracy=label_ok / len(h.leaves()))
    return out


# ======================================================================================= one clustering run
def cluster_child(folder: Path, faiss: bool, threads: int, dim: int, seed: int, max_memory_mb: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    if faiss:
        import faiss as fs

        fs.omp_set_num_threads(threads)
    from gramvl.gram.cmhc import CMHCConfig, cmhc
    from gramvl.gram.corpus import CorpusFeatures

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.time()
    feats = CorpusFeatures.load(folder)  # memory-mapped feature shards
    cfg = CMHCConfig(k1=16, min_children=6, max_children=30, leaf_min_size=20, use_faiss=faiss,
                     max_memory_mb=max_memory_mb, seed=0)
    t1 = time.time()
    h = cmhc(feats, cfg)
    t2 = time.time()
    h.save(folder / f"hierarchy-{'faiss' if faiss else 'torch'}.safetensors")
    t3 = time.time()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    res = {"n": len(feats), "faiss": faiss, "threads": threads, "max_memory_mb": max_memory_mb,
           "load_s": t1 - t0, "cmhc_s": t2 - t1, "save_s": t3 - t2, "total_s": t3 - t0,
           "peak_rss_mb": rss / 1024, "rss_before_mb": rss0 / 1024, "cmhc_config": cfg.__dict__}
    res.update(evaluate(h, folder, dim, seed))
    return res


def run_child(args, folder: Path, faiss: bool, max_memory_mb: int) -> dict:
    cmd = [sys.executable, __file__, "--child", str(folder), "--threads", str(args.threads), "--dim",
           str(args.dim), "--seed", str(args.seed), "--max-memory-mb", str(max_memory_mb)] + (
        ["--faiss"] if faiss else [])
    load0 = os.getloadavg()[0]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise SystemExit(out.stderr[-3000:])
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["loadavg_1min_before_after"] = [round(load0, 2), round(os.getloadavg()[0], 2)]
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", nargs="+", type=int, default=[1_000_000, 200_000], help="faiss runs")
    ap.add_argument("--torch-sizes", nargs="*", type=int, default=[200_000], help="torch k-means runs")
    ap.add_argument("--low-memory-sizes", nargs="*", type=int, default=[],
                    help="faiss runs with max_memory_mb=256 (joint embedding recomputed per chunk)")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shard-size", type=int, default=50_000)
    ap.add_argument("--max-memory-mb", type=int, default=2048)
    ap.add_argument("--work", default="/tmp/gramvl-cmhc-scale")
    ap.add_argument("--no-write", action="store_true", help="print results only")
    ap.add_argument("--render", action="store_true", help="rebuild cmhc_scale.md from cmhc_scale.json")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--faiss", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.render:
        rec = json.loads((OUT / "cmhc_scale.json").read_text())
        write_results(args, rec["results"], {int(k): v for k, v in rec["corpora"].items()}, rec["seconds"],
                      rec["command"], rec["versions"])
        return
    if args.child:
        print(json.dumps(cluster_child(Path(args.child), args.faiss, args.threads, args.dim, args.seed,
                                       args.max_memory_mb), default=str))
        return
    from gramvl.gram.cmhc import faiss_available

    if args.sizes and not faiss_available():
        raise SystemExit("faiss is not installed: pip install 'gramvl[scale]' (or pass --sizes with nothing)")
    runs = [(n, True, args.max_memory_mb) for n in args.sizes] + [(n, False, args.max_memory_mb)
                                                                   for n in args.torch_sizes]
    runs += [(n, True, 256) for n in args.low_memory_sizes]
    results, gen = [], {}
    t0 = time.time()
    for n in sorted({n for n, _, _ in runs}, reverse=True):
        folder = Path(args.work) / f"n{n}-d{args.dim}-s{args.seed}"
        made = generate(folder, n, args.dim, args.seed, args.shard_size)
        gen[n] = {"folder": str(folder), "seconds": made.get("seconds"),
                  "disk_mb": round(sum(f.stat().st_size for f in folder.glob("shard-*")) / 2**20)}
        print(f"corpus n={n}: {gen[n]}", flush=True)
        for m, fs, mm in runs:
            if m == n:
                r = run_child(args, folder, fs, mm)
                results.append(r)
                print(json.dumps({k: r[k] for k in ("n", "faiss", "max_memory_mb", "total_s", "peak_rss_mb",
                                                    "domain_nmi", "class_nmi", "class_purity", "leaves",
                                                    "weak_label_accuracy")}), flush=True)
    if args.no_write:
        return
    write_results(args, results, gen, time.time() - t0)


def write_results(args, results: list[dict], gen: dict, seconds: float, cmd: str | None = None,
                  vers: dict | None = None) -> None:
    from gramvl.engine.results import markdown_table, versions
    from gramvl.io import write_json, write_text

    if vers is None:
        try:
            import faiss

            fv = faiss.__version__
        except ImportError:
            fv = None
        vers = {**versions(), "faiss": fv}
    cmd = cmd or ("python benchmarks/cmhc_scale.py " + " ".join(sys.argv[1:])).strip()
    write_json(OUT / "cmhc_scale.json", {"command": cmd, "results": results, "corpora": gen,
                                         "versions": vers, "seconds": round(seconds)})
    rows = []
    for r in results:
        rows.append([f"{r['n']:,}", "faiss" if r["faiss"] else "torch",
                     "yes" if r["max_memory_mb"] >= r["n"] * 512 * 4 / 2**20 else "no (per chunk)",
                     f"{r['total_s']:.0f}", f"{r['peak_rss_mb']:.0f} ({r['peak_rss_mb'] - r['rss_before_mb']:.0f})",
                     f"{r['domain_nmi']:.3f}",
                     f"{r['class_nmi']:.3f}", f"{r['class_purity']:.3f}",
                     f"{r['leaves']} / {r['planted_classes']}", f"{r['noisy_removed']:.2f}",
                     f"{r['complexity_vs_planted_classes_spearman']:.2f}", f"{r['weak_label_accuracy']:.2f}",
                     "{:.1f}/{:.1f}".format(*r["loadavg_1min_before_after"])])
    n_max = max(gen)
    r0 = results[0]
    md = ["# CMHC at scale: 1M image-text pairs from memory-mapped feature shards\n\n",
          f"A synthetic feature corpus with a planted hierarchy ({r0['planted_domains']} domains, "
          f"{r0['planted_classes']} classes, D=512, float16 feature "
          "shards of 50,000 pairs, 5% noisy pairs whose caption belongs to another class; see the docstring of "
          "`benchmarks/cmhc_scale.py`) clustered end to end by `gramvl.gram.cmhc.cmhc` (agreement filter at the "
          "10% quantile, k1=16 domains, 6..30 children per domain by dispersion, weak labels, complexity, "
          "hierarchy saved as safetensors). Each row is a fresh process on this project's 2-core CPU machine "
          f"({args.threads} threads; other agents shared the machine, see load), reading the shards memory-mapped.\n\n",
          "- time: load + CMHC + save, seconds; peak RSS: ru_maxrss of the process (in brackets: above the "
          "process after importing torch and gramvl), which counts the pages of "
          "the memory-mapped shards it touched (the float16 shards of 1M pairs are "
          f"{gen[n_max]['disk_mb']} MB on disk) plus the materialized float32 joint embedding (1M x 512 = 1953 MB) "
          "when it fits `max_memory_mb`;\n",
          "- NMI / purity are computed on the kept clean pairs against the planted domains (domain NMI) and "
          "classes (class NMI, leaf purity); noisy removed: share of the planted noisy pairs that the agreement "
          "filter dropped; complexity rho: Spearman correlation, over the found domains, between CMHC's "
          "complexity and the planted class count of the domain; weak labels: share of leaves whose weak label "
          "contains the name of their majority planted class (e.g. 'striped kite in the wild').\n\n",
          markdown_table(["pairs", "k-means", "joint in RAM", "time s", "peak RSS MB (above start)", "domain NMI",
                          "class NMI", "leaf purity", "leaves / planted", "noisy removed", "complexity rho",
                          "weak labels", "load 1-min"], rows),
          "\nHow the k-means paths differ: faiss runs Lloyd on a 20,000-pair sample of each node (k-means++ "
          "seeds, best of 3 restarts) and assigns every pair once; torch runs Lloyd over all pairs of the node "
          "(same seeding, up to 25 passes per restart), so it is slower. With `max_memory_mb=256` the joint "
          "embedding is not materialized but recomputed from the float16 shards per chunk: the same clusters "
          "with less resident memory.\n",
          "\nCorpus generation (not included above): "
          + ", ".join(f"{n:,} pairs {g['seconds']:.0f} s" for n, g in sorted(gen.items())) + ".\n",
          f"\nCommand: `{cmd}`; {seconds:.0f} s in all.\n"]
    write_text(OUT / "cmhc_scale.md", "".join(md))


if __name__ == "__main__":
    main()
