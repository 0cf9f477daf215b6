"""Meta-tasks from a CMHC hierarchy (SPEC 1.2, 1.6): a domain, N of its leaves as classes, K + Q pairs each.

Structure complexity-informed (default): a domain is drawn with weight size^0.5 x complexity, and more
complex domains get more ways (linearly in their complexity rank, from `ways` up to `max_ways`). A second,
*shifted* query set comes from a different domain. Every draw uses only the numpy Generator it is given.

Leaves with fewer than K + Q members (`small_leaves`):
- "replace" (default): the leaf's members are split once at random into a support part and a query part
  (proportional to K : Q, at least one each); K and Q are then drawn from them with replacement, so
  support and query never share a pair. Leaves with a single member are never used.
- "skip": such leaves are never used as classes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from gramvl.errors import GramvlError
from gramvl.gram.cmhc import Hierarchy

SMALL_LEAVES = ("replace", "skip")


@dataclass
class TaskConfig:
    """Task shape and sampling policy."""

    ways: int = 5  # classes per task (the least complex domains)
    shots: int = 4  # K support pairs per class
    queries: int = 4  # Q query pairs per class (also for the shifted query set)
    complexity_informed: bool = True  # weights size^p x complexity and ways by complexity rank; else uniform
    shifted_query: bool = True  # add a query set from a different domain
    max_ways: int = 10  # ways of the most complex domain
    min_ways: int = 2  # domains with fewer distinct usable leaves are not sampled
    size_power: float = 0.5
    small_leaves: str = "replace"  # "replace" | "skip" (see the module docstring)
    seed: int = 0  # for TaskSampler.sample() without an explicit generator

    def __post_init__(self) -> None:
        if self.shots < 1 or self.queries < 1:
            raise GramvlError(f"tasks need shots >= 1 and queries >= 1 (got {self.shots}, {self.queries})")
        if not 2 <= self.min_ways <= self.ways <= self.max_ways:
            raise GramvlError(f"need 2 <= min_ways <= ways <= max_ways, got {self.min_ways}, {self.ways}, "
                              f"{self.max_ways}")
        if self.small_leaves not in SMALL_LEAVES:
            raise GramvlError(f"small_leaves must be one of {', '.join(SMALL_LEAVES)}, "
                              f"not {self.small_leaves!r}")


@dataclass
class MetaTask:
    """One episode. Indices point into the corpus feature arrays; labels are 0..ways-1, class-major."""

    domain: int
    leaves: list[int]
    classnames: list[str]
    support_idx: torch.Tensor  # [N*K]
    support_labels: torch.Tensor  # [N*K]
    query_idx: torch.Tensor  # [N*Q]
    query_labels: torch.Tensor  # [N*Q]
    shift_domain: int | None = None
    shift_leaves: list[int] = field(default_factory=list)
    classnames_shift: list[str] | None = None
    shift_idx: torch.Tensor | None = None  # [N'*Q] queries of the shifted task
    shift_labels: torch.Tensor | None = None

    @property
    def ways(self) -> int:
        return len(self.classnames)

    @property
    def has_shift(self) -> bool:
        return self.shift_idx is not None


class TaskSampler:
    """Draws MetaTasks from a hierarchy; `domain_weights` and `domain_ways` show the sampling policy."""

    def __init__(self, hierarchy: Hierarchy, cfg: TaskConfig | None = None):
        self.h, self.cfg = hierarchy, cfg or TaskConfig()
        c = self.cfg
        need = c.shots + c.queries if c.small_leaves == "skip" else 2
        self._members: dict[int, np.ndarray] = {}
        self._split: dict[int, int] = {}  # support-part size of small leaves ("replace")
        usable: dict[int, list[int]] = {}
        for d in hierarchy.domains():
            leaves = []
            for leaf in hierarchy.leaves(d):
                if leaf == d or hierarchy.size[leaf] < need:
                    continue
                m = hierarchy.members(leaf)
                self._members[leaf] = m
                if len(m) < c.shots + c.queries:
                    support = round(len(m) * c.shots / (c.shots + c.queries))
                    self._split[leaf] = int(min(len(m) - 1, max(1, support)))
                leaves.append(leaf)
            if len({hierarchy.labels[i] for i in leaves}) >= c.min_ways:
                usable[d] = leaves
        if not usable:
            raise GramvlError(f"no domain of the hierarchy has {c.min_ways} leaves with distinct labels and "
                              f"enough pairs (small_leaves={c.small_leaves!r}); lower min_ways or re-cluster "
                              "with smaller leaves")
        self.usable = usable
        self.eligible = sorted(usable)
        cap = np.array([len({hierarchy.labels[i] for i in usable[d]}) for d in self.eligible])
        comp = np.array([hierarchy.complexity[d] for d in self.eligible], dtype=np.float64)
        if c.complexity_informed:
            rank = np.argsort(np.argsort(comp, kind="stable"), kind="stable")
            r = rank / max(len(rank) - 1, 1)
            ways = np.rint(c.ways + r * (c.max_ways - c.ways)).astype(np.int64)
            w = np.array([hierarchy.size[d] for d in self.eligible], dtype=np.float64) ** c.size_power * comp
            w = w if w.sum() > 0 else np.ones(len(w))
        else:
            ways = np.full(len(self.eligible), c.ways)
            w = np.ones(len(self.eligible))
        self.domain_ways = dict(zip(self.eligible, np.minimum(ways, cap).tolist(), strict=True))
        self.domain_weights = dict(zip(self.eligible, (w / w.sum()).tolist(), strict=True))
        self._rng = np.random.default_rng(c.seed)

    # ------------------------------------------------------------------------------- drawing
    def _domain(self, rng: np.random.Generator, exclude: int | None = None) -> int | None:
        doms = [d for d in self.eligible if d != exclude]
        if not doms:
            return None
        p = np.array([self.domain_weights[d] for d in doms])
        p = p / p.sum() if p.sum() > 0 else np.full(len(doms), 1.0 / len(doms))
        return doms[int(rng.choice(len(doms), p=p))]

    def _classes(self, d: int, rng: np.random.Generator) -> list[int]:
        chosen, names = [], set()
        for j in rng.permutation(len(self.usable[d])):
            leaf = self.usable[d][int(j)]
            if self.h.labels[leaf] not in names:
                chosen.append(leaf)
                names.add(self.h.labels[leaf])
                if len(chosen) == self.domain_ways[d]:
                    break
        return chosen

    def _pairs(self, leaf: int, rng: np.random.Generator, k: int, q: int) -> tuple[np.ndarray, np.ndarray]:
        m = self._members[leaf]
        if len(m) >= k + q:
            pick = m[rng.choice(len(m), k + q, replace=False)]
            return pick[:k], pick[k:]
        perm = m[rng.permutation(len(m))]
        s = self._split[leaf]
        return rng.choice(perm[:s], k, replace=True), rng.choice(perm[s:], q, replace=True)

    def _queries(self, leaf: int, rng: np.random.Generator, q: int) -> np.ndarray:
        m = self._members[leaf]
        return m[rng.choice(len(m), q, replace=len(m) < q)]

    def sample(self, rng: np.random.Generator | None = None) -> MetaTask:
        """One task; deterministic given rng (the sampler's own generator, seeded by cfg.seed, if None)."""
        rng = self._rng if rng is None else rng
        c = self.cfg
        d = self._domain(rng)
        leaves = self._classes(d, rng)
        sup, qry = zip(*(self._pairs(leaf, rng, c.shots, c.queries) for leaf in leaves), strict=True)
        n = len(leaves)
        task = MetaTask(d, leaves, [self.h.labels[i] for i in leaves],
                        torch.from_numpy(np.concatenate(sup)), torch.arange(n).repeat_interleave(c.shots),
                        torch.from_numpy(np.concatenate(qry)), torch.arange(n).repeat_interleave(c.queries))
        if c.shifted_query:
            d2 = self._domain(rng, exclude=d)
            if d2 is not None:
                leaves2 = self._classes(d2, rng)
                task.shift_domain, task.shift_leaves = d2, leaves2
                task.classnames_shift = [self.h.labels[i] for i in leaves2]
                q2 = [self._queries(i, rng, c.queries) for i in leaves2]
                task.shift_idx = torch.from_numpy(np.concatenate(q2))
                task.shift_labels = torch.arange(len(leaves2)).repeat_interleave(c.queries)
        return task

    def batch(self, n: int, rng: np.random.Generator | None = None) -> list[MetaTask]:
        """A meta-batch of n tasks."""
        return [self.sample(rng) for _ in range(n)]

    def describe(self) -> str:
        """One line per eligible domain: label, leaves, ways, sampling weight."""
        return "\n".join(f"domain {d} {self.h.labels[d]!r}: {len(self.usable[d])} usable leaves, "
                         f"{self.domain_ways[d]} ways, weight {self.domain_weights[d]:.3f}"
                         for d in self.eligible)
