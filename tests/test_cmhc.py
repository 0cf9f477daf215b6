"""CMHC: planted clusters are recovered at both levels, noisy pairs are filtered, labels, complexity, I/O."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gramvl.errors import GramvlError
from gramvl.gram.cmhc import (
    CMHCConfig,
    Hierarchy,
    clean_caption,
    cmhc,
    faiss_available,
    flat_clusters,
    random_hierarchy,
    spherical_kmeans,
)
from gramvl.gram.corpus import CorpusFeatures

TEMPLATES = ["a {}", "the {} drawing", "{} icon", "a photo of a {}"]


def planted(n_domains=4, n_classes=5, per_class=40, dim=32, spread=None, noise=0.05, n_noisy=0, seed=0):
    """Domains x classes on the sphere with clear margins; image and text are noisy copies of one point.

    Class centers are normalize(2 * domain + spread_d * random); `n_noisy` extra pairs get a random text.
    Returns features, domain ids, class ids (-1 for the noisy pairs) and class names.
    """
    rng = np.random.default_rng(seed)
    spread = spread or [1.0] * n_domains
    dc = rng.standard_normal((n_domains, dim))
    dc /= np.linalg.norm(dc, axis=1, keepdims=True)
    zI, zT, caps, dom, cls, names = [], [], [], [], [], []
    for d in range(n_domains):
        for c in range(n_classes):
            e = rng.standard_normal(dim)
            center = 2.0 * dc[d] + spread[d] * e / np.linalg.norm(e)
            center /= np.linalg.norm(center)
            names.append(f"thing{d}x{c}")
            for j in range(per_class):
                x = center + noise * rng.standard_normal(dim)
                zI.append(x + noise * rng.standard_normal(dim))
                zT.append(x + noise * rng.standard_normal(dim))
                caps.append(TEMPLATES[j % len(TEMPLATES)].format(names[-1]))
                dom.append(d)
                cls.append(d * n_classes + c)
    for _ in range(n_noisy):
        zI.append(zI[int(rng.integers(len(dom)))])
        zT.append(rng.standard_normal(dim))
        caps.append("some unrelated words")
        dom.append(-1)
        cls.append(-1)
    f = CorpusFeatures.from_arrays(np.array(zI), np.array(zT), caps)
    return f, np.array(dom), np.array(cls), names


def ari(a: np.ndarray, b: np.ndarray) -> float:
    """Adjusted Rand index of two labelings."""
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    m = np.zeros((ai.max() + 1, bi.max() + 1))
    np.add.at(m, (ai, bi), 1)

    def c2(x):
        return (x * (x - 1) / 2).sum()

    idx, ea, eb, n2 = c2(m), c2(m.sum(1)), c2(m.sum(0)), c2(np.array([len(a)]))
    expected = ea * eb / n2
    return float((idx - expected) / (0.5 * (ea + eb) - expected))


def purity(pred: np.ndarray, truth: np.ndarray) -> float:
    return float(sum(np.bincount(truth[pred == p]).max() for p in np.unique(pred)) / len(pred))


CFG = dict(k1=4, min_children=5, max_children=5, leaf_min_size=6, use_faiss=False)


@pytest.fixture(scope="module")
def planted_h():
    f, dom, cls, names = planted(n_noisy=60)
    return f, dom, cls, names, cmhc(f, CMHCConfig(**CFG))


def test_recovers_planted_domains_and_classes(planted_h):
    f, dom, cls, _, h = planted_h
    kept = h.kept
    assert (cls[kept] >= 0).all()
    leaf = h.leaf_of[kept]
    domain = np.array([h.domain_of(int(i)) for i in leaf])
    assert ari(domain, dom[kept]) >= 0.95 and purity(domain, dom[kept]) >= 0.95
    assert ari(leaf, cls[kept]) >= 0.95 and purity(leaf, cls[kept]) >= 0.95
    assert len(h.domains()) == 4 and len(h.leaves()) == 20
    assert all(h.depth[i] == 2 for i in h.leaves())


def test_agreement_filter_drops_the_noisy_pairs(planted_h):
    f, dom, cls, _, h = planted_h
    assert (h.leaf_of[cls == -1] == -1).all()  # every random-text pair is dropped
    assert abs(len(h.kept) - 0.9 * len(f)) <= 2  # and the filter keeps the 90% quantile
    assert h.agreement[cls == -1].max() < h.meta["agreement_threshold"]


def test_weak_labels_come_from_their_clusters(planted_h):
    f, dom, cls, names, h = planted_h
    for leaf in h.leaves():
        majority = np.bincount(cls[h.members(leaf)]).argmax()
        assert names[majority] in h.labels[leaf], (h.labels[leaf], names[majority])
        assert not h.labels[leaf].startswith(("a ", "the ", "photo"))
    for d in h.domains():  # deduplicated within a domain
        labels = [h.labels[i] for i in h.leaves(d)]
        assert len(set(labels)) == len(labels)


def test_weak_labels_are_deduplicated_within_a_domain():
    f, dom, cls, _ = planted(n_domains=2, n_classes=3, per_class=20, seed=6)
    for c, unique in ((0, "a cat"), (1, "a dog")):  # two classes of one domain share their captions but one
        members = np.flatnonzero(cls == c)
        for i in members:
            f.captions[i] = "an animal"
        f.captions[members[0]] = unique + " sitting on a very long and winding road"
        f.captions[members[1]] = unique
    h = cmhc(f, CMHCConfig(k1=2, min_children=3, max_children=3, filter_quantile=0.0, use_faiss=False))
    labels = {np.bincount(cls[h.members(leaf)]).argmax(): h.labels[leaf] for leaf in h.leaves()}
    # deduplicated, and the short caption preferred over the long one
    assert sorted([labels[0], labels[1]]) in (["animal", "cat"], ["animal", "dog"])


def test_clean_caption():
    assert clean_caption("A photo of a Red Fox.") == "red fox"
    assert clean_caption("  the  sun ") == "sun"
    assert clean_caption("a canadian coin ($.05)") == "canadian coin"


def test_nodes_know_their_members_centroids_and_sizes(planted_h):
    f, _, _, _, h = planted_h
    for d in h.domains():
        m = h.members(d)
        assert h.size[d] == len(m) == sum(h.size[c] for c in h.children_of[d])
        cen = torch.nn.functional.normalize(f.image(m).mean(0), dim=0)
        assert torch.allclose(cen, h.centroids["image"][d], atol=1e-5)
    assert h.size[0] == len(h.kept)
    assert sorted(np.concatenate([h.members(i) for i in h.leaves()]).tolist()) == h.kept.tolist()


def test_complexity_more_dispersed_domain_more_children():
    f, dom, cls, _ = planted(n_domains=3, n_classes=8, per_class=20, spread=[0.4, 1.0, 2.5], seed=1)
    h = cmhc(f, CMHCConfig(k1=3, min_children=3, max_children=12, filter_quantile=0.0, use_faiss=False))
    d_of = {d: np.bincount(dom[h.members(d)]).argmax() for d in h.domains()}
    by_spread = sorted(h.domains(), key=lambda d: d_of[d])  # planted tight -> dispersed
    disp = [h.dispersion[d] for d in by_spread]
    comp = [h.complexity[d] for d in by_spread]
    kids = [len(h.children_of[d]) for d in by_spread]
    assert disp == sorted(disp) and comp == sorted(comp) and kids == sorted(kids)
    assert kids[-1] > kids[0] and comp[-1] > comp[0]
    for leaf in h.leaves():  # a leaf's complexity is its dispersion
        assert h.complexity[leaf] == pytest.approx(h.dispersion[leaf])


def test_tiny_leaves_are_merged():
    f, *_ = planted(n_domains=2, n_classes=3, per_class=10, seed=2)
    h = cmhc(f, CMHCConfig(k1=2, min_children=8, max_children=8, leaf_min_size=9, filter_quantile=0.0,
                           use_faiss=False))
    assert all(h.size[i] >= 9 for i in h.leaves())


def test_prototype_modes(planted_h):
    *_, h = planted_h
    d = h.centroids["joint"].shape[1]
    assert h.prototypes("flat").shape == (4, d)
    assert h.prototypes("leaves", kind="image").shape == (20, d)
    nodes = h.prototype_nodes("complexity")
    med = np.median([h.complexity[i] for i in h.domains()])
    expect = sum(len(h.children_of[i]) if h.complexity[i] > med else 1 for i in h.domains())
    assert len(nodes) == expect and 4 <= expect <= 20
    p = h.prototypes("complexity", kind="text")
    assert p.shape == (expect, d) and torch.allclose(p.norm(dim=1), torch.ones(len(p)), atol=1e-5)
    with pytest.raises(GramvlError):
        h.prototypes("nope")


def test_save_load_round_trip(planted_h, tmp_path):
    *_, h = planted_h
    path = h.save(tmp_path / "hier.safetensors")
    assert (tmp_path / "hier.json").is_file()
    g = Hierarchy.load(path)
    assert np.array_equal(g.parent, h.parent) and np.array_equal(g.leaf_of, h.leaf_of)
    for k in h.centroids:
        assert torch.equal(g.centroids[k], h.centroids[k])
    assert np.allclose(g.complexity, h.complexity) and g.labels == h.labels
    assert g.top_captions == h.top_captions and g.summary() == h.summary()
    assert g.summary_dict() == h.summary_dict()
    assert torch.equal(g.prototypes(), h.prototypes())
    (tmp_path / "hier.json").unlink()
    with pytest.raises(GramvlError):
        Hierarchy.load(path)


def test_summary_is_readable(planted_h):
    *_, h = planted_h
    s = h.summary()
    assert "4 domains, 20 leaves" in s and s.count("leaf '") == 20


def test_deterministic_and_memmap_input(planted_h, tmp_path):
    f, *_, h = planted_h
    g = CorpusFeatures.load(f.save(tmp_path / "corpus"))
    assert isinstance(g.zI, np.memmap)
    # memory budget 0: the joint embedding is computed per chunk from the memmaps, in small chunks
    h2 = cmhc(g, CMHCConfig(**CFG, max_memory_mb=0, chunk=50))
    assert np.array_equal(h2.leaf_of, h.leaf_of) and h2.labels == h.labels
    assert torch.allclose(h2.centroids["joint"], h.centroids["joint"], atol=1e-5)


def test_deeper_levels():
    f, *_ = planted(n_domains=2, n_classes=4, per_class=30, seed=3)
    h = cmhc(f, CMHCConfig(k1=2, min_children=2, max_children=3, levels=3, filter_quantile=0.0,
                           use_faiss=False))
    assert set(h.depth[h.leaves()].tolist()) == {3}
    assert all(len(h.leaves(d)) >= 2 for d in h.domains())
    assert h.prototypes("complexity").shape[0] >= len(h.domains())


def test_ablations_have_the_same_shape(planted_h):
    f, dom, cls, _, h = planted_h
    fl = flat_clusters(f, cfg=CMHCConfig(**CFG), like=h)
    rnd = random_hierarchy(f, cfg=CMHCConfig(**CFG), like=h)
    for g in (fl, rnd):
        assert len(g.domains()) == 4 and len(g.leaves()) == 20 and np.array_equal(g.kept, h.kept)
    assert sorted(rnd.size[rnd.leaves()].tolist()) == sorted(h.size[h.leaves()].tolist())
    assert ari(fl.leaf_of[fl.kept], cls[fl.kept]) >= 0.95  # flat k-means still finds the classes
    assert ari(rnd.leaf_of[rnd.kept], cls[rnd.kept]) < 0.1  # a random partition does not
    assert fl.meta["method"] == "flat" and rnd.meta["method"] == "random"
    r2 = random_hierarchy(f, CMHCConfig(**CFG), n_domains=3, n_leaves=9)  # cfg second, as in cmhc()
    assert len(r2.domains()) == 3 and len(r2.leaves()) == 9
    f2 = flat_clusters(f, CMHCConfig(**CFG), k=12, n_domains=3)
    assert len(f2.domains()) == 3 and len(f2.leaves()) == 12


def test_torch_kmeans_without_faiss(monkeypatch):
    import gramvl.gram.cmhc as m

    monkeypatch.setattr(m, "_faiss", lambda: None)
    f, dom, *_ = planted(n_domains=3, n_classes=1, per_class=50, seed=4)
    lab = spherical_kmeans(f.zI, 3, use_faiss="auto")
    assert ari(lab, dom) == pytest.approx(1.0)
    with pytest.raises(GramvlError, match="faiss"):
        spherical_kmeans(f.zI, 3, use_faiss=True)


@pytest.mark.skipif(not faiss_available(), reason="faiss not installed")
def test_faiss_path_recovers_planted_clusters():
    f, dom, cls, _ = planted(seed=5)
    h = cmhc(f, CMHCConfig(**{**CFG, "use_faiss": True}, filter_quantile=0.0))
    leaf = h.leaf_of[h.kept]
    assert ari(np.array([h.domain_of(int(i)) for i in leaf]), dom[h.kept]) >= 0.95
    assert ari(leaf, cls[h.kept]) >= 0.95


def test_config_errors():
    with pytest.raises(GramvlError):
        CMHCConfig(filter_quantile=1.5)
    with pytest.raises(GramvlError):
        CMHCConfig(levels=1)
    with pytest.raises(GramvlError):
        CMHCConfig(min_children=5, max_children=3)


def test_encode_corpus_caches_memmapped_features(small_random_backbone, tmp_path, monkeypatch):
    from PIL import Image

    from gramvl.gram.corpus import encode_corpus

    monkeypatch.setenv("GRAMVL_HOME", str(tmp_path / "home"))
    rng = np.random.default_rng(0)
    pairs = []
    for i in range(6):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(p)
        pairs.append({"image": str(p), "caption": f"a picture number {i}", "source": "test"})
    bb = small_random_backbone
    f = encode_corpus(bb, pairs, batch_size=4, progress=False, workers=0)
    assert f.zI.shape == f.zT.shape == (6, bb.embed_dim) and isinstance(f.zI, np.memmap)
    assert np.allclose(np.linalg.norm(f.zI, axis=1), 1, atol=1e-5)
    assert f.captions[2] == "a picture number 2" and f.paths[0] == pairs[0]["image"] and f.ident == bb.ident
    assert torch.allclose(f.text([1]), bb.encode_texts([pairs[1]["caption"]]).float(), atol=1e-5)
    folder = tmp_path / "home" / "cache" / "corpus" / f.key
    # no temp files left behind
    assert sorted(p.name for p in folder.iterdir()) == ["corpus.json", "zI.npy", "zT.npy"]

    def boom(*a, **k):
        raise AssertionError("re-encoded a cached corpus")

    monkeypatch.setattr(bb, "encode_image", boom)
    g = encode_corpus(bb, pairs, progress=False, workers=0)  # cache hit
    assert np.array_equal(np.asarray(g.zI), np.asarray(f.zI)) and g.key == f.key
    with pytest.raises(AssertionError, match="re-encoded"):  # another pair list is another key
        encode_corpus(bb, pairs[:5], progress=False, workers=0)
    with pytest.raises(GramvlError):
        encode_corpus(bb, [], progress=False)


def test_hierarchy_cache_key_records_the_kmeans_backend(monkeypatch):
    import gramvl.gram.cmhc as m
    from gramvl.gram.pipeline import hierarchy_cache_key

    cfg = CMHCConfig()
    monkeypatch.setattr(m, "_faiss", lambda: None)
    torch_key = hierarchy_cache_key("corpus", "cmhc", cfg)
    assert hierarchy_cache_key("corpus", "cmhc", CMHCConfig(use_faiss=False)) != torch_key  # config differs
    monkeypatch.setattr(m, "_faiss", lambda: object())  # faiss importable: 'auto' now resolves to faiss
    assert hierarchy_cache_key("corpus", "cmhc", cfg) != torch_key
    assert hierarchy_cache_key("corpus", "cmhc", cfg) == hierarchy_cache_key("corpus", "cmhc", CMHCConfig())
    key = hierarchy_cache_key("corpus", "cmhc", cfg)
    monkeypatch.setattr(m, "CLUSTER_FILL", "another way")  # hierarchies clustered another way are not served
    assert hierarchy_cache_key("corpus", "cmhc", cfg) != key


@pytest.mark.parametrize("faiss", [False, pytest.param(True, marks=pytest.mark.skipif(
    not faiss_available(), reason="faiss not installed"))])
def test_clustering_runs_on_one_thread_and_assigns_chunks_in_parallel(monkeypatch, faiss):
    """A hierarchy is cached, so it must not depend on the run's thread count (float sums do): the clustering runs
    on one intra-op thread (faiss's training too), and the k-means assignment passes use the run's threads as
    that many chunks at once. The run's thread counts are restored afterwards."""
    import threading

    import gramvl.gram.cmhc as m
    import gramvl.paths as paths

    f, _, _, _ = planted(n_domains=3, n_classes=4, per_class=30)
    cfg = CMHCConfig(k1=3, min_children=4, max_children=4, leaf_min_size=5, use_faiss=faiss, chunk=50)
    seen: list[tuple[str, int, str]] = []
    chunk, kmeanspp = m._Rows.chunk, m._kmeanspp

    def spy_chunk(self, s, e):
        seen.append(("chunk", torch.get_num_threads(), threading.current_thread().name))
        run_threads.add(paths._RUN_THREADS)  # what cache_fill_map sizes its pool by inside `one_thread`
        return chunk(self, s, e)

    def spy_seed(*a):
        seen.append(("seed", torch.get_num_threads(), threading.current_thread().name))
        return kmeanspp(*a)

    monkeypatch.setattr(m._Rows, "chunk", spy_chunk)
    monkeypatch.setattr(m, "_kmeanspp", spy_seed)
    before = torch.get_num_threads()
    fs = m._faiss() if faiss else None
    try:
        out = {}
        for threads in (2, 1):
            torch.set_num_threads(threads)
            seen.clear()
            run_threads: set = set()
            omp = fs.omp_get_max_threads() if fs else None
            out[threads] = cmhc(f, cfg)
            assert fs is None or fs.omp_get_max_threads() == omp
            assert torch.get_num_threads() == threads
            assert {t for _, t, _ in seen} == {1}, seen
            assert {w for w, _, _ in seen} == {"chunk", "seed"}
            assert any(w == "chunk" and name != "MainThread" for w, _, name in seen)  # passes run in the pool ...
            assert paths._RUN_THREADS is None and run_threads == {threads}  # ... with the run's count of workers
        np.testing.assert_array_equal(out[1].leaf_of, out[2].leaf_of)
    finally:
        torch.set_num_threads(before)


def test_a_cached_hierarchy_of_another_corpus_is_an_error(tmp_path, monkeypatch):
    from gramvl.gram.pipeline import build_hierarchy, hierarchy_cache_key
    from gramvl.paths import cache_dir

    monkeypatch.setenv("GRAMVL_HOME", str(tmp_path))
    cfg = CMHCConfig(k1=2, min_children=2, max_children=2, leaf_min_size=2, use_faiss=False)
    a, _, _, _ = planted(n_domains=2, n_classes=2, per_class=10)
    b, _, _, _ = planted(n_domains=2, n_classes=2, per_class=12)
    a.key, b.key = "corpus-a", "corpus-b"
    h = build_hierarchy(a, "cmhc", cfg, progress=False)
    assert build_hierarchy(a, "cmhc", cfg, progress=False).n_pairs == h.n_pairs == len(a)  # served from the cache
    h.save(cache_dir("cmhc") / f"{hierarchy_cache_key(b.key, 'cmhc', cfg)}.safetensors")  # a broken cache entry
    with pytest.raises(GramvlError, match="built on another corpus"):
        build_hierarchy(b, "cmhc", cfg, progress=False)
