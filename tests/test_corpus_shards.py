"""WebDataset tar shards -> streamed pairs -> memory-mapped feature shards (resumable) -> CMHC -> meta-train."""

from __future__ import annotations

import io
import json
import sys
import tarfile
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from gramvl.errors import GramvlError
from gramvl.gram.cmhc import CMHCConfig, cmhc, faiss_available
from gramvl.gram.corpus import CorpusFeatures
from gramvl.gram.shards import (
    FeatureShardWriter,
    ShardedArray,
    ShardStats,
    expand_shards,
    extract_shard_features,
    is_shard_spec,
    iter_shard,
    load_feature_shards,
    shard_batches,
)

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
SHAPES = ["square", "stripe", "dot"]


def _png(rgb, kind: int, size: int = 16) -> bytes:
    a = np.zeros((size, size, 3), dtype=np.uint8)
    a[:] = rgb
    if kind == 1:
        a[::4] = 255
    elif kind == 2:
        a[size // 3: 2 * size // 3, size // 3: 2 * size // 3] = 0
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def make_shards(folder, n_shards: int = 3, per_shard: int = 12, bad: bool = True) -> list[str]:
    """Tiny CC3M-style shards: <key>.png + <key>.txt; shard 0 also holds a corrupt image, an image without
    caption, a caption without image, and a pair whose caption is only in <key>.json."""
    folder.mkdir(parents=True, exist_ok=True)
    paths, k = [], 0
    for s in range(n_shards):
        path = folder / f"{s:06d}.tar"
        with tarfile.open(path, "w") as tf:
            for _ in range(per_shard):
                colour = list(COLOURS)[k % len(COLOURS)]
                kind = (k // len(COLOURS)) % len(SHAPES)
                key = f"{k:09d}"
                _add(tf, f"{key}.png", _png(COLOURS[colour], kind))
                if s == 0 and k == 1:
                    _add(tf, f"{key}.json", json.dumps({"caption": f"a {colour} {SHAPES[kind]}"}).encode())
                else:
                    _add(tf, f"{key}.txt", f"a photo of a {colour} {SHAPES[kind]}".encode())
                k += 1
            if s == 0 and bad:
                _add(tf, "bad000001.png", b"\x89PNG\r\n\x1a\nthis is not an image")
                _add(tf, "bad000001.txt", b"a broken picture")
                _add(tf, "bad000002.png", _png((0, 0, 0), 0))  # no caption
                _add(tf, "bad000003.txt", b"a caption without image")
        paths.append(str(path))
    return paths


@pytest.fixture()
def shard_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAMVL_HOME", str(tmp_path / "home"))
    make_shards(tmp_path / "shards")
    return tmp_path / "shards"


def test_shard_specs_expand_folder_brace_glob_and_single_file(shard_dir):
    files = [str(shard_dir / f"{i:06d}.tar") for i in range(3)]
    assert expand_shards(str(shard_dir)) == files
    assert expand_shards(str(shard_dir / "{000000..000002}.tar")) == files
    assert expand_shards(str(shard_dir / "{000002,000000}.tar")) == [files[2], files[0]]
    assert expand_shards(str(shard_dir / "*.tar")) == files
    assert expand_shards(files[1]) == [files[1]]
    assert is_shard_spec(str(shard_dir)) and is_shard_spec("x/{000..009}.tar") and not is_shard_spec("c.csv")
    with pytest.raises(GramvlError, match="not found"):
        expand_shards(str(shard_dir / "{000000..000005}.tar"))
    with pytest.raises(GramvlError, match="no .tar shards"):
        expand_shards(str(shard_dir.parent))


def test_streaming_skips_and_counts_corrupt_images_and_missing_captions(shard_dir):
    stats = ShardStats()
    pairs = list(iter_shard(str(shard_dir / "000000.tar"), stats))
    assert len(pairs) == 12 and stats.pairs == 12
    assert (stats.corrupt_image, stats.missing_caption, stats.missing_image) == (1, 1, 1)
    key, img, cap, member = pairs[1]
    assert cap == "a green square" and member == f"{key}.png"  # caption from <key>.json
    assert img.mode == "RGB" and img.size == (16, 16)
    assert not (shard_dir / "000000").exists()  # nothing extracted to disk


def _sync_encode(bb, calls: list):  # counts the rows of each batch that the extraction encodes
    orig = bb.encode_image_rows

    def enc(x, *a, **k):
        calls.append(x.shape[0])
        return orig(x, *a, **k)

    return enc


def test_extraction_writes_memmapped_shards_and_resumes_after_interruption(shard_dir, tmp_path,
                                                                          small_random_backbone, monkeypatch):
    bb = small_random_backbone
    out = tmp_path / "feats"
    real_write = FeatureShardWriter.write
    written = []

    def crash_on_second(self, i, *a, **k):
        if written:
            raise KeyboardInterrupt  # the process dies while writing shard 2
        written.append(i)
        return real_write(self, i, *a, **k)

    monkeypatch.setattr(FeatureShardWriter, "write", crash_on_second)
    with pytest.raises(KeyboardInterrupt), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        extract_shard_features(bb, str(shard_dir), out=out, batch_size=5, workers=0, progress=False)
    monkeypatch.setattr(FeatureShardWriter, "write", real_write)
    man = json.loads((out / "manifest.json").read_text())
    assert not man["complete"] and [s["file"] for s in man["shards"]] == ["shard-000000"]
    assert not list(out.glob(".*.tmp"))  # no half-written file left behind
    with pytest.raises(GramvlError, match="unfinished"):
        load_feature_shards(out)
    first = (out / "shard-000000.zI.npy").stat().st_mtime_ns

    calls: list[int] = []
    monkeypatch.setattr(bb, "encode_image_rows", _sync_encode(bb, calls))
    feats = extract_shard_features(bb, str(shard_dir), out=out, batch_size=5, workers=0, progress=False)
    assert sum(calls) == 24  # shards 1 and 2 only: the finished shard 0 is not re-encoded
    assert (out / "shard-000000.zI.npy").stat().st_mtime_ns == first
    assert isinstance(feats.zI, ShardedArray) and all(isinstance(p, np.memmap) for p in feats.zI.parts)
    assert len(feats) == 36 and feats.zI.dtype == np.float16 and feats.ident == bb.ident
    assert feats.paths[1].endswith("000000.tar#000000001.png") and feats.captions[1] == "a green square"
    man = json.loads((out / "manifest.json").read_text())
    assert man["complete"] and man["skipped"] == {"corrupt_image": 1, "missing_caption": 1, "missing_image": 1}

    # an uninterrupted extraction (2 loader workers, float32) gives the same features
    with pytest.warns(UserWarning, match="skipped 3 pairs"):
        ref = extract_shard_features(bb, str(shard_dir), out=tmp_path / "ref", dtype="float32", batch_size=7,
                                     workers=2, progress=False)
    assert ref.captions == feats.captions and ref.paths == feats.paths
    np.testing.assert_allclose(np.asarray(ref.zI), np.asarray(feats.zI, dtype=np.float32), atol=2e-3)
    np.testing.assert_allclose(np.asarray(ref.zT), np.asarray(feats.zT, dtype=np.float32), atol=2e-3)
    x = ref.image(torch.arange(36))
    assert torch.allclose(x.norm(dim=1), torch.ones(36), atol=1e-5)
    # a second call finds the finished folder and loads it without encoding
    calls.clear()
    again = extract_shard_features(bb, str(shard_dir), out=out, workers=0, progress=False)
    assert not calls and len(again) == 36
    assert CorpusFeatures.load(out).captions == feats.captions


def test_nothing_valid_is_a_clear_error(tmp_path, small_random_backbone):
    path = tmp_path / "bad.tar"
    with tarfile.open(path, "w") as tf:
        _add(tf, "a.png", b"garbage")
        _add(tf, "a.txt", b"a caption")
        _add(tf, "b.txt", b"only a caption")
    with pytest.raises(GramvlError, match="no valid image-caption pair"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        extract_shard_features(small_random_backbone, str(path), out=tmp_path / "f", workers=0, progress=False)


def test_missing_webdataset_names_the_extra(shard_dir, tmp_path, small_random_backbone, monkeypatch):
    monkeypatch.setitem(sys.modules, "webdataset", None)
    with pytest.raises(GramvlError, match=r"gramvl\[scale\]"):
        extract_shard_features(small_random_backbone, str(shard_dir), out=tmp_path / "f", progress=False)


def test_sharded_array_indexes_like_one_array():
    rng = np.random.default_rng(0)
    parts = [rng.standard_normal((n, 3)).astype(np.float32) for n in (4, 0, 7, 5)]
    full = np.concatenate(parts)
    a = ShardedArray([p for p in parts if len(p)])
    assert a.shape == (16, 3) and len(a) == 16
    for key in (0, 5, -1, slice(2, 13), slice(None), slice(3, 3), slice(1, 15, 4)):
        np.testing.assert_array_equal(a[key], full[key])
    for idx in ([9, 0, 15, 4, 4], np.array([], dtype=np.int64), np.arange(16) % 3 == 0, np.array([-2, 3])):
        np.testing.assert_array_equal(a[idx], full[idx])
    np.testing.assert_array_equal(np.asarray(a), full)
    np.testing.assert_array_equal(np.array(a, dtype=np.float64), full.astype(np.float64))
    with pytest.raises(IndexError):
        a[16]
    with pytest.raises(IndexError):
        a[np.array([3, 99])]


def _planted(n_dom=3, n_cls=4, per=25, dim=24, seed=0):
    rng = np.random.default_rng(seed)
    dom = rng.standard_normal((n_dom, dim))
    zI, zT, caps, truth = [], [], [], []
    for d in range(n_dom):
        for c in range(n_cls):
            center = 3 * dom[d] / np.linalg.norm(dom[d]) + rng.standard_normal(dim) / np.sqrt(dim)
            for _ in range(per):
                x = center / np.linalg.norm(center) + 0.05 * rng.standard_normal(dim)
                zI.append(x + 0.02 * rng.standard_normal(dim))
                zT.append(x + 0.02 * rng.standard_normal(dim))
                caps.append(f"a photo of a thing{d}x{c}")
                truth.append(d * n_cls + c)
    perm = rng.permutation(len(caps))
    return (np.array(zI)[perm], np.array(zT)[perm], [caps[i] for i in perm], np.array(truth)[perm])


@pytest.mark.parametrize("faiss", [False, pytest.param(True, marks=pytest.mark.skipif(
    not faiss_available(), reason="faiss not installed"))])
def test_cmhc_over_memmapped_shards_equals_cmhc_in_memory(tmp_path, faiss):
    zI, zT, caps, truth = _planted()
    w = FeatureShardWriter(tmp_path / "f", "synthetic", zI.shape[1], "float32", key="planted")
    cuts = [0, 70, 71, 200, len(caps)]
    recs = [w.write(i, zI[a:b], zT[a:b], caps[a:b]) | {"file": w.stem(i)}
            for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:], strict=True))]
    w.manifest(recs, complete=True)
    sharded = load_feature_shards(tmp_path / "f")
    assert isinstance(sharded.zI, ShardedArray) and len(sharded) == len(caps)
    mem = CorpusFeatures.from_arrays(np.asarray(sharded.zI), np.asarray(sharded.zT), caps)
    cfg = CMHCConfig(k1=3, min_children=4, max_children=4, leaf_min_size=5, use_faiss=faiss, max_memory_mb=0,
                     chunk=64, filter_quantile=0.05)
    h1, h2 = cmhc(sharded, cfg), cmhc(mem, cfg)
    np.testing.assert_array_equal(h1.leaf_of, h2.leaf_of)
    assert h1.labels == h2.labels
    kept = h1.kept
    leaf = h1.leaf_of[kept]
    purity = sum(np.bincount(truth[kept][leaf == v]).max() for v in np.unique(leaf)) / len(kept)
    assert purity > 0.95 and len(h1.domains()) == 3


def test_meta_train_from_a_shard_corpus(shard_dir, tmp_path, small_random_backbone):
    from gramvl.gram.meta import MetaConfig
    from gramvl.gram.pipeline import MetaTrainJob, corpus_features, run_meta_train
    from gramvl.gram.tasks import TaskConfig
    from gramvl.io import load_tensors

    bb = small_random_backbone
    job = MetaTrainJob(corpus=str(shard_dir / "{000000..000002}.tar"),
                       meta=MetaConfig(steps=2, meta_batch=1, checkpoint_every=1, host_cfg={"n_ctx": 2}),
                       tasks=TaskConfig(ways=2, shots=1, queries=1, min_ways=2, max_ways=2),
                       cmhc=CMHCConfig(k1=2, min_children=3, max_children=3, leaf_min_size=2, use_faiss=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = run_meta_train(job, tmp_path / "gram.safetensors", bb=bb, progress=False)
    t, meta = load_tensors(out)
    assert meta["steps_done"] == 2 and meta["pairs"] == 36 and torch.isfinite(t["theta.text_ctx"]).all()
    assert meta["kmeans_backend"] == "torch"  # use_faiss=False: recorded, since the backends cluster differently
    env = meta["environment"]  # the artifact's last bits depend on the CPU and the thread count: both recorded
    assert env["threads"] == torch.get_num_threads() and env["cpu"] and env["torch"] == torch.__version__
    # the same features are found in the cache; visual hosts read images back from the shards by reference
    feats = corpus_features(bb, job.corpus, progress=False)
    data = shard_batches(feats, bb, need_images=True)
    x = data.batch([1, 30])["images"]
    assert x.shape == (2, 3, bb.image_size, bb.image_size)
    ref = bb.transform(False)(next(p for i, p in enumerate(iter_shard(str(shard_dir / "000000.tar"))) if i == 1)[1])
    assert torch.allclose(x[0], ref)
    with pytest.raises(GramvlError, match="come from"):
        bb2 = type(bb).__new__(type(bb))
        bb2.__dict__.update(bb.__dict__, ident="another-model")
        corpus_features(bb2, str(next((tmp_path / "home").rglob("manifest.json")).parent), progress=False)


def test_a_shard_folder_records_how_it_was_encoded(tmp_path, shard_dir, small_random_backbone):
    """Feature shards are a cache too: their key and every shard record name the encoding (`cache_fill_tag`),
    so a folder, or a shard of a folder, encoded another way is neither served nor resumed."""
    from gramvl.gram.shards import shard_corpus_key
    from gramvl.paths import cache_fill_tag

    src = [str(p) for p in sorted(shard_dir.glob("*.tar"))]
    assert shard_corpus_key("m", src, "float16", "a") != shard_corpus_key("m", src, "float16", "b")
    w = FeatureShardWriter(tmp_path / "f", "synthetic", 4, "float32", key="k", fill="a")
    w.write(0, np.ones((2, 4)), np.ones((2, 4)), ["x", "y"], source="s.tar", source_size=1)
    assert w.done(0, "s.tar", 1) is not None
    assert FeatureShardWriter(tmp_path / "f", "synthetic", 4, "float32", key="k", fill="b").done(0, "s.tar", 1) is None

    out = tmp_path / "feats"
    with pytest.warns(UserWarning, match="skipped 3 pairs"):
        extract_shard_features(small_random_backbone, str(shard_dir), out=out, workers=0, progress=False)
    man = json.loads((out / "manifest.json").read_text())
    fill = cache_fill_tag(small_random_backbone.device)
    assert man["fill"] == fill and man["key"] == shard_corpus_key(small_random_backbone.ident, src, "float16", fill)
    assert json.loads((out / "shard-000000.json").read_text())["fill"] == fill
    man["key"], man["fill"] = "an-older-key", "cpu-threads-1"  # a folder extracted before the rows rule
    (out / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(GramvlError, match="another corpus, backbone or encoding"):
        extract_shard_features(small_random_backbone, str(shard_dir), out=out, workers=0, progress=False)
