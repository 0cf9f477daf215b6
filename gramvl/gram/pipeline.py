"""`gramvl cluster` and `gramvl meta-train`: corpus -> features -> CMHC -> meta-tasks -> bi-level loop."""

from __future__ import annotations

import csv
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from gramvl.backbone import Backbone
from gramvl.engine.results import environment
from gramvl.errors import GramvlError
from gramvl.gram.cmhc import CMHCConfig, Hierarchy, cmhc, faiss_available
from gramvl.gram.corpus import CorpusFeatures, encode_corpus
from gramvl.gram.meta import CorpusBatches, MetaConfig, meta_train
from gramvl.gram.shards import (
    ShardedArray,
    extract_shard_features,
    is_feature_folder,
    is_shard_spec,
    shard_batches,
)
from gramvl.gram.tasks import TaskConfig, TaskSampler
from gramvl.paths import cache_dir
from gramvl.prompts import build_host

HIERARCHIES = ("cmhc", "flat", "random")


@dataclass
class MetaTrainJob:
    """Everything `gramvl meta-train` needs; ablations are fields."""

    corpus: str = "world"  # 'world', a CSV/TSV of path,caption, WebDataset tar shards or a feature folder
    model: str = "small"
    weights: str | None = None
    hierarchy: str = "cmhc"  # cmhc | flat | random (ablations)
    meta: MetaConfig = field(default_factory=MetaConfig)
    tasks: TaskConfig = field(default_factory=TaskConfig)
    cmhc: CMHCConfig = field(default_factory=CMHCConfig)
    feature_dtype: str = "float16"  # storage of features extracted from tar shards (float16 | float32)
    device: str = "cpu"  # where the backbone, the slots and ψ live (cpu, cuda, cuda:N)


def load_pairs(corpus: str) -> list[dict]:
    """Image-caption pairs: the embedded meta-training corpus, or a CSV/TSV with columns path, caption
    (WebDataset tar shards are streamed by `corpus_features` instead)."""
    if corpus == "world":
        from gramvl.data.world import load_meta_pairs

        return load_meta_pairs()
    path = Path(corpus)
    if not path.is_file():
        raise GramvlError(f"corpus not found: {path} (use 'world', a CSV/TSV of image path, caption, WebDataset "
                          "tar shards (a folder, shards/{000000..000009}.tar, or one .tar) or a feature folder)")
    delim = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for i, row in enumerate(csv.reader(f, delimiter=delim)):
            if i == 0 and [c.strip().lower() for c in row[:2]] == ["path", "caption"]:
                continue
            if len(row) < 2:
                raise GramvlError(f"{path}:{i + 1}: expected two columns (image path, caption), got {row!r}")
            img = Path(row[0])
            if not img.is_absolute():
                img = path.parent / img
            rows.append({"image": str(img), "caption": row[1]})
    if not rows:
        raise GramvlError(f"corpus file {path} holds no pairs")
    return rows


def hierarchy_cache_key(corpus_key: str, kind: str, cfg: CMHCConfig) -> str:
    """Cache key of a hierarchy: corpus, kind, config, the k-means backend that use_faiss resolves to (faiss and
    torch k-means give different clusterings, so one must never be served for the other) and how the clustering
    runs (`CLUSTER_FILL`: one intra-op thread, so hierarchies cached before that rule are not served)."""
    from gramvl.gram.cmhc import CLUSTER_FILL, faiss_available

    backend = "faiss" if cfg.use_faiss is True or (cfg.use_faiss == "auto" and faiss_available()) else "torch"
    blob = json.dumps([corpus_key, kind, asdict(cfg), backend, CLUSTER_FILL], default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def build_hierarchy(feats: CorpusFeatures, kind: str, cfg: CMHCConfig, progress: bool = True) -> Hierarchy:
    """CMHC (cached on disk per corpus and config), or a flat / random hierarchy for the ablations."""
    if kind not in HIERARCHIES:
        raise GramvlError(f"unknown hierarchy {kind!r}; choose one of {', '.join(HIERARCHIES)}")
    path = cache_dir("cmhc") / f"{hierarchy_cache_key(feats.key, kind, cfg)}.safetensors"
    if feats.key and path.is_file():
        h = Hierarchy.load(path)
        h.check_corpus(feats)  # a cached hierarchy of another corpus under this key is an error, not a wrong run
        return h
    if kind == "cmhc":
        h = cmhc(feats, cfg, progress=progress)
    elif kind == "flat":
        from gramvl.gram.cmhc import flat_clusters

        h = flat_clusters(feats, cfg)
    else:
        from gramvl.gram.cmhc import random_hierarchy

        h = random_hierarchy(feats, cfg)
    if feats.key:
        h.save(path)
    return h


def corpus_features(bb: Backbone, corpus: str, progress: bool = True, dtype: str = "float16") -> CorpusFeatures:
    """Frozen features of a corpus: 'world' or a CSV/TSV (encoded, cached), WebDataset tar shards (a folder,
    brace pattern, glob or one .tar: streamed into cached feature shards, resumable), or a folder of
    feature shards written earlier (must come from the same backbone)."""
    if corpus != "world" and is_feature_folder(corpus):
        feats = CorpusFeatures.load(corpus)
        if feats.ident and feats.ident != bb.ident:
            raise GramvlError(f"the features in {corpus} come from {feats.ident}, not from {bb.ident}; "
                              "extract them again with this backbone")
        if feats.dim != bb.embed_dim:
            raise GramvlError(f"the features in {corpus} have dimension {feats.dim}, the backbone "
                              f"{bb.embed_dim}")
        return feats
    if corpus != "world" and is_shard_spec(corpus):
        return extract_shard_features(bb, corpus, dtype=dtype, progress=progress)
    return encode_corpus(bb, load_pairs(corpus), progress=progress)


def features_digest(z) -> str | None:
    """sha256 (first 16 hex digits) of an in-memory feature matrix; None for sharded (on-disk) features."""
    import numpy as np

    if isinstance(z, ShardedArray):
        return None
    arr = z.detach().cpu().numpy() if hasattr(z, "detach") else np.asarray(z)
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()[:16]


def run_meta_train(job: MetaTrainJob, out: str | Path, bb: Backbone | None = None, progress: bool = True) -> Path:
    """Meta-train θ* and ψ* for `job.meta.host` and write the artifact to `out`."""
    from gramvl.backbone import load_backbone

    t0 = time.time()
    bb = bb or load_backbone(job.model, job.weights, device=job.device)
    feats = corpus_features(bb, job.corpus, progress, job.feature_dtype)
    t_feat = time.time() - t0
    hier = build_hierarchy(feats, job.hierarchy, job.cmhc, progress)
    t_clu = time.time() - t0 - t_feat
    sampler = TaskSampler(hier, job.tasks)
    probe = sampler.sample(__import__("numpy").random.default_rng(0))
    host = build_host(job.meta.host, bb, probe.classnames, job.meta.host_cfg)
    if isinstance(feats.zI, ShardedArray):  # images (visual hosts) are read back from the tar shards
        data = shard_batches(feats, bb, need_images=not host.image_side_frozen)
    else:
        data = CorpusBatches(feats.zI, feats.paths, bb, need_images=not host.image_side_frozen)
    extra = {"corpus": job.corpus, "pairs": len(feats), "hierarchy": job.hierarchy,
             # what the corpus's images were (the corpus name alone does not say: the world's meta part can be
             # rebuilt with other pixels); also keeps a checkpoint from resuming on other data
             "corpus_features_sha256": features_digest(feats.zI),
             "hierarchy_summary": {"domains": len(hier.domains()), "leaves": len(hier.leaves())},
             "task_config": asdict(job.tasks), "cmhc_config": asdict(job.cmhc),
             # which k-means ran (use_faiss='auto' picks faiss when importable): the two give different
             # hierarchies, hence different meta-tasks and artifacts
             "kmeans_backend": "faiss" if job.cmhc.use_faiss is not False and faiss_available() else "torch",
             "timing": {"features_s": round(t_feat, 1), "clustering_s": round(t_clu, 1)},
             # the run's torch, CPU and thread count: the artifact's last bits depend on them (a resumed run
             # records the environment of the leg that finished it)
             "environment": environment()}
    return meta_train(job.meta, host, sampler, data, out, extra_meta=extra, progress=progress)
