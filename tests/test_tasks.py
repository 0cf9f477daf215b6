"""Meta-task sampler: classes are distinct leaves of one domain, disjoint support/query, shifted domain,
determinism, complexity-informed weights and ways, small-leaf policy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_cmhc import planted

from gramvl.errors import GramvlError
from gramvl.gram.cmhc import CMHCConfig, cmhc, random_hierarchy
from gramvl.gram.tasks import TaskConfig, TaskSampler


@pytest.fixture(scope="module")
def hier():
    # three domains, planted tight -> dispersed, so complexity grows with the domain's spread
    f, dom, cls, _ = planted(n_domains=3, n_classes=8, per_class=20, spread=[0.4, 1.0, 2.5], seed=1)
    return cmhc(f, CMHCConfig(k1=3, min_children=3, max_children=12, filter_quantile=0.0, use_faiss=False))


def test_classes_are_distinct_leaves_of_one_domain(hier):
    s = TaskSampler(hier, TaskConfig(ways=3, max_ways=3, shots=2, queries=3))
    rng = np.random.default_rng(0)
    for _ in range(50):
        t = s.sample(rng)
        assert len(set(t.leaves)) == t.ways == 3 and len(set(t.classnames)) == 3
        assert all(hier.domain_of(i) == t.domain for i in t.leaves)
        assert t.classnames == [hier.labels[i] for i in t.leaves]
        assert t.support_idx.shape == (3 * 2,) and t.query_idx.shape == (3 * 3,)
        assert t.support_labels.tolist() == [0, 0, 1, 1, 2, 2] and t.query_labels.dtype == torch.long
        for idx, lab in ((t.support_idx, t.support_labels), (t.query_idx, t.query_labels)):
            for i, y in zip(idx.tolist(), lab.tolist(), strict=True):
                assert hier.leaf_of[i] == t.leaves[y]
        assert not set(t.support_idx.tolist()) & set(t.query_idx.tolist())
        assert len(set(t.support_idx.tolist())) == 6  # leaves are large: no repeats


def test_shifted_task_comes_from_another_domain(hier):
    s = TaskSampler(hier, TaskConfig(ways=2, max_ways=4, queries=3))
    rng = np.random.default_rng(1)
    for _ in range(30):
        t = s.sample(rng)
        assert t.has_shift and t.shift_domain != t.domain
        assert all(hier.domain_of(i) == t.shift_domain for i in t.shift_leaves)
        assert t.shift_idx.shape == (len(t.shift_leaves) * 3,) == t.shift_labels.shape
        assert [hier.leaf_of[i] for i in t.shift_idx.tolist()] == \
               [t.shift_leaves[y] for y in t.shift_labels.tolist()]
        assert t.classnames_shift == [hier.labels[i] for i in t.shift_leaves]
    t = TaskSampler(hier, TaskConfig(shifted_query=False)).sample(np.random.default_rng(0))
    assert not t.has_shift and t.shift_idx is None


def test_deterministic_per_seed(hier):
    s = TaskSampler(hier)
    a = [s.sample(np.random.default_rng(7)) for _ in range(2)]
    b = TaskSampler(hier).batch(5, np.random.default_rng(7))
    c = TaskSampler(hier).batch(5, np.random.default_rng(8))
    for x in (a[1], b[0]):
        assert x.leaves == a[0].leaves and torch.equal(x.support_idx, a[0].support_idx)
        assert torch.equal(x.query_idx, a[0].query_idx) and torch.equal(x.shift_idx, a[0].shift_idx)
    assert any(not torch.equal(x.support_idx, y.support_idx) for x, y in zip(b, c, strict=True))
    # the sampler's own generator (cfg.seed) is reproducible too
    assert torch.equal(TaskSampler(hier).sample().query_idx, TaskSampler(hier).sample().query_idx)


def test_complexity_informed_prefers_complex_domains(hier):
    doms = sorted(hier.domains(), key=lambda d: hier.complexity[d])  # simple -> complex
    s = TaskSampler(hier, TaskConfig(ways=3, max_ways=7))
    w = [s.domain_weights[d] for d in doms]
    assert w == sorted(w) and w[-1] > 2 * w[0]
    ways = [s.domain_ways[d] for d in doms]
    assert ways == sorted(ways) and ways[0] == 3 and ways[-1] == min(7, len(hier.leaves(doms[-1])))
    rng = np.random.default_rng(0)
    counts = {d: 0 for d in doms}
    n = 2000
    for _ in range(n):
        counts[s.sample(rng).domain] += 1
    freq = [counts[d] / n for d in doms]
    assert freq[-1] > freq[0] + 0.2
    assert np.allclose(freq, w, atol=0.04)  # draws follow size^0.5 * complexity
    u = TaskSampler(hier, TaskConfig(ways=3, complexity_informed=False))
    assert set(u.domain_ways.values()) == {3} and np.allclose(list(u.domain_weights.values()), 1 / 3)
    counts = {d: 0 for d in doms}
    for _ in range(n):
        counts[u.sample(rng).domain] += 1
    assert np.allclose([counts[d] / n for d in doms], 1 / 3, atol=0.04)


def test_small_leaves_replace_or_skip():
    f, *_ = planted(n_domains=2, n_classes=3, per_class=20, seed=2)
    # 2 domains x 12 leaves of 5 pairs: fewer than K + Q = 8
    h = random_hierarchy(f, n_domains=2, n_leaves=24, cfg=CMHCConfig(filter_quantile=0.0))
    assert set(h.size[h.leaves()].tolist()) == {5}
    s = TaskSampler(h, TaskConfig(ways=4, max_ways=4, small_leaves="replace"))
    t = s.sample(np.random.default_rng(0))
    assert t.support_idx.shape == (16,) and t.query_idx.shape == (16,)
    assert not set(t.support_idx.tolist()) & set(t.query_idx.tolist())  # disjoint even with repeats
    with pytest.raises(GramvlError, match="no domain"):
        TaskSampler(h, TaskConfig(small_leaves="skip"))
    s = TaskSampler(h, TaskConfig(shots=2, queries=3, small_leaves="skip"))  # 5 pairs suffice for 2 + 3
    assert s.sample(np.random.default_rng(0)).ways >= 2


def test_ways_never_exceed_the_domain_leaves(hier):
    s = TaskSampler(hier, TaskConfig(ways=5, max_ways=50))
    for d in s.eligible:
        assert s.domain_ways[d] <= len(hier.leaves(d))
    assert "ways" in s.describe()


def test_config_errors():
    with pytest.raises(GramvlError):
        TaskConfig(ways=1, min_ways=1)
    with pytest.raises(GramvlError):
        TaskConfig(ways=12, max_ways=10)
    with pytest.raises(GramvlError):
        TaskConfig(small_leaves="maybe")
