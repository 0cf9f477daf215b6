"""Cross-Modal Hierarchical Clustering (CMHC, SPEC 1.1 and 1.6): image-caption pairs -> domains -> classes.

1. agreement filter: drop the pairs whose cos(zI, zT) is below the `filter_quantile` quantile (noisy pairs);
2. joint embedding u = normalize(zI + zT);
3. level 1: spherical k-means on u into `k1` domains; level 2 (and deeper): k-means inside each node, the
   number of children set by the node's provisional complexity (its dispersion, rescaled across the nodes
   of its level into [min_children, max_children]); children smaller than `leaf_min_size` are merged into
   their nearest sibling;
4. complexity(node) = dispersion x max(1, entropy in bits of its children's sizes) (1 for a leaf), where
   dispersion = mean (1 - cos) of the members to the node's joint centroid = 1 - ||mean u||;
5. each leaf gets a weak text label: the cleaned caption, among its members, nearest its text centroid.

k-means runs through faiss when importable (`use_faiss`), else in torch with chunked distances, so memory
stays bounded and memory-mapped features work. The result is a `Hierarchy`, saved as safetensors + JSON.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gramvl.errors import GramvlError
from gramvl.gram.corpus import CorpusFeatures
from gramvl.io import load_tensors, save_tensors
from gramvl.paths import cache_fill_map, one_thread

HIERARCHY_FORMAT = "gramvl.hierarchy/1"
CLUSTER_FILL = "threads-1"  # how a hierarchy is computed (`_pinned`); part of its cache key
CENTROID_KINDS = ("joint", "image", "text")


@dataclass
class CMHCConfig:
    """Clustering settings; the defaults are ours (see docs/method.md)."""

    filter_quantile: float = 0.10  # drop pairs below this quantile of cos(zI, zT); 0 keeps all
    k1: int = 8  # domains (level 1)
    min_children: int = 4  # sub-clusters of the least dispersed node of a level
    max_children: int = 24  # ... of the most dispersed
    leaf_min_size: int = 6  # smaller children are merged into their nearest sibling
    levels: int = 2  # 2 = domains -> classes; deeper levels by recursion
    seed: int = 0
    iters: int = 25  # Lloyd iterations (at most)
    n_init: int = 3  # k-means restarts (best objective wins)
    tol: float = 1e-4  # stop when fewer than this fraction of points change cluster
    use_faiss: bool | str = "auto"  # "auto" | True | False
    init_sample: int = 20000  # k-means++ seeds on at most this many points
    chunk: int = 65536  # rows per distance block
    max_memory_mb: int = 2048  # materialize the joint embedding when it fits, else compute it per chunk
    label_words: int = 6  # weak labels: prefer captions of at most this many words
    top_captions: int = 5  # captions kept per node in the summary

    def __post_init__(self) -> None:
        if not 0.0 <= self.filter_quantile < 1.0:
            raise GramvlError(f"filter_quantile must be in [0, 1), not {self.filter_quantile}")
        if self.k1 < 1 or self.levels < 2:
            raise GramvlError(f"CMHC needs k1 >= 1 and levels >= 2 (got k1={self.k1}, levels={self.levels})")
        if not 1 <= self.min_children <= self.max_children:
            raise GramvlError(f"need 1 <= min_children <= max_children, got {self.min_children}.."
                              f"{self.max_children}")
        if self.leaf_min_size < 1 or self.iters < 1:
            raise GramvlError("leaf_min_size and iters must be >= 1")
        if self.use_faiss not in ("auto", True, False):
            raise GramvlError(f"use_faiss must be 'auto', True or False, not {self.use_faiss!r}")


# ======================================================================================= k-means
def _faiss():
    try:
        import faiss  # noqa: PLC0415

        return faiss
    except ImportError:
        return None


def faiss_available() -> bool:
    """Whether faiss can be imported (CMHC then uses it for k-means when use_faiss='auto')."""
    return _faiss() is not None


def _want_faiss(use_faiss: bool | str):
    if use_faiss is False:
        return None
    fs = _faiss()
    if fs is None and use_faiss is True:
        raise GramvlError("use_faiss=True but faiss is not installed; `pip install faiss-cpu` or set "
                          "use_faiss='auto'")
    return fs


class _Rows:
    """Row access to an [n, D] float32 matrix that may live in RAM or be computed per chunk."""

    def __init__(self, n: int, dim: int, get: Callable[[int, int], np.ndarray],
                 gather: Callable[[np.ndarray], np.ndarray]):
        self.n, self.dim, self._get, self._gather = n, dim, get, gather

    def chunk(self, s: int, e: int) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self._get(s, e), dtype=np.float32))

    def take(self, positions: np.ndarray) -> torch.Tensor:
        """Rows at the given (sorted) positions."""
        return torch.from_numpy(np.ascontiguousarray(self._gather(positions), dtype=np.float32))


def _rows_from_array(x: np.ndarray) -> _Rows:
    return _Rows(x.shape[0], x.shape[1], lambda s, e: x[s:e], lambda p: x[p])


def _pinned(fn):
    """Run fn with torch on one intra-op thread (`one_thread`): the clustering, which is cached, is then the same
    at any thread count. The k-means assignment passes still use the run's threads, one chunk per thread."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        with one_thread():
            return fn(*args, **kwargs)

    return run


def _kmeanspp(x: torch.Tensor, k: int, rng: np.random.Generator) -> torch.Tensor:
    """Greedy k-means++ seeding on unit vectors (distance 1 - cos); deterministic given rng."""
    n = x.shape[0]
    trials = 2 + int(math.log(k))
    centers = [int(rng.integers(n))]
    d = (1.0 - x @ x[centers[0]]).clamp_min_(0).double()
    for _ in range(1, k):
        total = float(d.sum())
        if total <= 1e-12:  # every point coincides with a center: pick any unused point
            cand = rng.choice(n, size=min(trials, n), replace=False)
        else:
            p = (d / total).numpy()
            cand = rng.choice(n, size=trials, p=p / p.sum())
        dc = (1.0 - x[torch.as_tensor(cand)] @ x.T).clamp_min_(0).double()  # [trials, n]
        dc = torch.minimum(dc, d.unsqueeze(0))
        best = int(torch.argmin(dc.sum(1)))
        centers.append(int(cand[best]))
        d = dc[best]
    return x[torch.as_tensor(centers)].clone()


def _assign_pass(rows: _Rows, c: torch.Tensor, chunk: int, want_sums: bool = True):
    """Nearest centroid of every row; per-cluster sums (float64) and counts. The chunks run on one intra-op thread
    each, as many at once as the run has threads, and are summed in order (`cache_fill_map`): the same result at
    any thread count."""
    k, dim = c.shape
    assign = np.empty(rows.n, dtype=np.int64)
    best = np.empty(rows.n, dtype=np.float32)
    sums = torch.zeros(k, dim, dtype=torch.float64)

    def nearest(s: int):
        x = rows.chunk(s, min(s + chunk, rows.n))
        b, a = (x @ c.T).max(1)
        part = None
        if want_sums:  # float32 per chunk (one-hot matmul for small k), accumulated in float64
            if k <= 256:
                part = torch.zeros(len(a), k).scatter_(1, a[:, None], 1.0).T @ x
            else:
                part = torch.zeros(k, dim).index_add_(0, a, x)
        return s, a, b, part

    for s, a, b, part in cache_fill_map(nearest, range(0, rows.n, chunk), "cpu"):
        assign[s:s + len(a)] = a.numpy()
        best[s:s + len(a)] = b.numpy()
        if part is not None:
            sums += part.double()
    counts = np.bincount(assign, minlength=k)
    return assign, best, sums, counts


def _spherical_kmeans_rows(rows: _Rows, k: int, iters: int = 25, seed=0, tol: float = 1e-4,
                           use_faiss: bool | str = "auto", init_sample: int = 20000, chunk: int = 65536,
                           n_init: int = 3, ram_bytes: int = 256 << 20) -> tuple[np.ndarray, np.ndarray]:
    n = rows.n
    k = max(1, min(k, n))
    if k == 1:
        return np.zeros(n, dtype=np.int64), np.ones(1, dtype=np.int64) * n
    rng = np.random.default_rng(seed)
    if rows.n * rows.dim * 4 <= ram_bytes:  # small enough: gather once, iterate in RAM
        x_all = torch.cat([rows.chunk(s, min(s + chunk, n)) for s in range(0, n, chunk)])
        rows = _rows_from_array(x_all.numpy())
    sample = np.sort(rng.choice(n, size=min(n, max(init_sample, 4 * k)), replace=False))
    xs = rows.take(sample)
    fs = _want_faiss(use_faiss)
    if fs is not None:  # faiss Lloyd on the sample from k-means++ seeds (best of n_init), then one full pass
        # (measured: k-means++ seeds raise leaf purity on 200k planted pairs from 0.82 to 0.90)
        train = xs if len(sample) >= 256 * k or len(sample) == n else \
            rows.take(np.sort(rng.choice(n, size=min(n, 256 * k), replace=False)))
        tn = np.ascontiguousarray(train.numpy(), dtype=np.float32)
        best_obj, c = -math.inf, None
        omp = fs.omp_get_max_threads()
        fs.omp_set_num_threads(1)  # on the sample only; one thread, so the same centroids at any thread count
        try:
            for _ in range(max(1, n_init)):
                km = fs.Kmeans(rows.dim, k, niter=iters, nredo=1, seed=int(rng.integers(2**31 - 1)),
                               spherical=True, verbose=False, min_points_per_centroid=1,
                               max_points_per_centroid=-(-len(tn) // k))
                km.train(tn, init_centroids=_kmeanspp(train, k, rng).numpy())
                if c is None or float(km.obj[-1]) > best_obj:  # spherical: sum of cosines, higher is better
                    best_obj, c = float(km.obj[-1]), np.asarray(km.centroids, dtype=np.float32).copy()
        finally:
            fs.omp_set_num_threads(omp)
        c = F.normalize(torch.from_numpy(c), dim=1)
        assign, _, _, counts = _assign_pass(rows, c, chunk, want_sums=False)
        return assign, counts
    best_run = None
    for _ in range(max(1, n_init)):
        run = _lloyd(rows, _kmeanspp(xs, k, rng), iters, tol, chunk)
        if best_run is None or run[2] > best_run[2] + 1e-9:
            best_run = run
    return best_run[0], best_run[1]


def _lloyd(rows: _Rows, c: torch.Tensor, iters: int, tol: float,
           chunk: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Lloyd iterations from centroids c; returns labels, counts and the objective (sum of cosines)."""
    prev = None
    for it in range(iters):
        assign, best, sums, counts = _assign_pass(rows, c, chunk)
        changed = 1.0 if prev is None else float(np.mean(assign != prev))
        prev = assign
        c = F.normalize(sums.float(), dim=1)
        empty = np.flatnonzero(counts == 0)
        if len(empty):  # re-seed empty clusters with the points farthest from their centroid
            far = np.argsort(best, kind="stable")
            far = far[counts[assign[far]] > 1][: len(empty)]
            for j, p in zip(empty, far, strict=False):
                c[j] = rows.take(np.array([p]))[0]
            continue
        if it > 0 and changed <= tol:
            break
    return assign, counts, float(best.astype(np.float64).sum())


@_pinned
def spherical_kmeans(x: np.ndarray | torch.Tensor, k: int, iters: int = 25, seed: int = 0,
                     use_faiss: bool | str = "auto", tol: float = 1e-4, chunk: int = 65536,
                     n_init: int = 3) -> np.ndarray:
    """Cluster the rows of x (array, memmap or tensor; normalized here) into at most k groups; labels [n]."""
    x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x
    rows = _Rows(x.shape[0], x.shape[1], lambda s, e: _unit(x[s:e]), lambda p: _unit(x[p]))
    assign, _ = _spherical_kmeans_rows(rows, k, iters, seed, tol, use_faiss, chunk=chunk, n_init=n_init)
    return assign


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


# ======================================================================================= feature access
class _Features:
    """The kept pairs' joint embedding, materialized when it fits `max_memory_mb`, else computed per chunk."""

    def __init__(self, feats: CorpusFeatures, cfg: CMHCConfig):
        self.f, self.cfg, self.dim = feats, cfg, feats.dim
        self.u = None

    def joint(self, idx: np.ndarray) -> np.ndarray:
        if self.u is not None:
            return self.u[idx]
        zi = np.asarray(self.f.zI[idx], dtype=np.float32)
        return _unit(zi + np.asarray(self.f.zT[idx], dtype=np.float32))

    def materialize(self, kept: np.ndarray) -> None:
        if len(self.f) * self.dim * 4 <= self.cfg.max_memory_mb << 20:
            u = np.zeros((len(self.f), self.dim), dtype=np.float32)
            for s in range(0, len(kept), self.cfg.chunk):
                ix = kept[s:s + self.cfg.chunk]
                u[ix] = self.joint(ix)
            self.u = u

    def joint_rows(self, idx: np.ndarray) -> _Rows:
        return _Rows(len(idx), self.dim, lambda s, e: self.joint(idx[s:e]), lambda p: self.joint(idx[p]))


def agreement(feats: CorpusFeatures, chunk: int = 65536) -> np.ndarray:
    """cos(zI, zT) of every pair [N] (float32), computed in chunks."""
    out = np.empty(len(feats), dtype=np.float32)
    for s in range(0, len(feats), chunk):
        a = np.asarray(feats.zI[s:s + chunk], dtype=np.float32)
        b = np.asarray(feats.zT[s:s + chunk], dtype=np.float32)
        out[s:s + chunk] = (a * b).sum(1)
    return out


def _filter(feats: CorpusFeatures, cfg: CMHCConfig) -> tuple[np.ndarray, np.ndarray, float]:
    if len(feats) == 0:
        raise GramvlError("the corpus is empty: nothing to cluster")
    agr = agreement(feats, cfg.chunk)
    thr = float(np.quantile(agr, cfg.filter_quantile)) if cfg.filter_quantile > 0 else -math.inf
    kept = np.flatnonzero(agr >= thr)
    return agr, kept, thr


# ======================================================================================= the hierarchy
@dataclass
class Node:
    """A read-only view of one node: domains have depth 1, leaves (weakly labeled classes) no children."""

    id: int
    parent: int
    depth: int
    children: list[int]
    size: int
    complexity: float
    dispersion: float
    label: str
    top_captions: list[str] = field(default_factory=list)

    @property
    def is_leaf(self) -> bool:
        return not self.children


class Hierarchy:
    """A tree over the corpus pairs: root (0) -> domains (depth 1) -> ... -> leaves; node ids in BFS order."""

    def __init__(self, parent: np.ndarray, leaf_of: np.ndarray, centroids: dict[str, torch.Tensor],
                 dispersion: np.ndarray, labels: list[str], top_captions: list[list[str]],
                 agreement: np.ndarray, meta: dict):
        self.parent = np.asarray(parent, dtype=np.int64)
        self.leaf_of = np.asarray(leaf_of, dtype=np.int64)  # [N] leaf id per corpus pair, -1 = filtered out
        self.centroids = {k: v.float() for k, v in centroids.items()}
        self.dispersion = np.asarray(dispersion, dtype=np.float64)
        self.labels = list(labels)
        self.top_captions = [list(t) for t in top_captions]
        self.agreement = np.asarray(agreement, dtype=np.float32)
        self.meta = dict(meta)
        m = len(self.parent)
        self.children_of: list[list[int]] = [[] for _ in range(m)]
        for i in range(1, m):
            self.children_of[int(self.parent[i])].append(i)
        self.depth = np.zeros(m, dtype=np.int64)
        for i in range(1, m):
            self.depth[i] = self.depth[self.parent[i]] + 1
        # members of each leaf (sorted corpus indices), from one stable argsort
        order = np.argsort(self.leaf_of, kind="stable")
        ids, starts = np.unique(self.leaf_of[order], return_index=True)
        ends = np.append(starts[1:], len(order))
        self._leaf_members = {int(i): order[s:e] for i, s, e in zip(ids, starts, ends, strict=True) if i >= 0}
        self.size = np.zeros(m, dtype=np.int64)
        for i in reversed(range(m)):
            self.size[i] += len(self._leaf_members.get(i, ())) if not self.children_of[i] else 0
            if i > 0:
                self.size[self.parent[i]] += self.size[i]
        self.complexity = np.array([self.dispersion[i] * _entropy_factor(self.size[self.children_of[i]])
                                    for i in range(m)])

    # ------------------------------------------------------------------------------- structure
    def __len__(self) -> int:
        return len(self.parent)

    @property
    def n_pairs(self) -> int:
        return len(self.leaf_of)

    @property
    def kept(self) -> np.ndarray:
        """Corpus indices that passed the agreement filter."""
        return np.flatnonzero(self.leaf_of >= 0)

    def domains(self) -> list[int]:
        """The domain ids (depth 1)."""
        return list(self.children_of[0])

    def leaves(self, node: int = 0) -> list[int]:
        """The leaf ids under `node` (the node itself if it is a leaf), in id order."""
        out, stack = [], [node]
        while stack:
            i = stack.pop()
            if self.children_of[i]:
                stack.extend(reversed(self.children_of[i]))
            else:
                out.append(i)
        return sorted(out)

    def members(self, node: int) -> np.ndarray:
        """Sorted corpus indices of a node's pairs."""
        parts = [self._leaf_members.get(i, np.zeros(0, dtype=np.int64)) for i in self.leaves(node)]
        return np.sort(np.concatenate(parts)) if len(parts) > 1 else parts[0]

    def domain_of(self, node: int) -> int:
        while node > 0 and self.depth[node] > 1:
            node = int(self.parent[node])
        return node

    def node(self, i: int) -> Node:
        return Node(i, int(self.parent[i]), int(self.depth[i]), list(self.children_of[i]),
                    int(self.size[i]), float(self.complexity[i]), float(self.dispersion[i]), self.labels[i],
                    self.top_captions[i])

    @property
    def nodes(self) -> list[Node]:
        return [self.node(i) for i in range(len(self))]

    def check_corpus(self, feats: CorpusFeatures) -> None:
        """Raise a GramvlError unless the hierarchy was built on this corpus (same size and cache key)."""
        key = self.meta.get("corpus_key", "")
        if len(feats) != self.n_pairs or (key and feats.key and key != feats.key):
            raise GramvlError(f"the hierarchy was built on another corpus ({self.n_pairs} pairs, key "
                              f"{key!r}); this one has {len(feats)} pairs, key {feats.key!r}: re-run the "
                              "clustering")

    # ------------------------------------------------------------------------------- prototypes
    def prototype_nodes(self, mode: str = "complexity") -> list[int]:
        """Node ids behind `prototypes(mode)`."""
        if mode == "flat":
            return self.domains()
        if mode == "leaves":
            return self.leaves()
        if mode != "complexity":
            raise GramvlError(f"prototype mode must be complexity, flat or leaves, not {mode!r}")
        med = {d: float(np.median(self.complexity[self.depth == d])) for d in set(self.depth.tolist())}
        out, stack = [], list(reversed(self.domains()))
        while stack:  # a complex node (above its level's median) is replaced by its children, recursively
            i = stack.pop()
            if self.children_of[i] and self.complexity[i] > med[int(self.depth[i])]:
                stack.extend(reversed(self.children_of[i]))
            else:
                out.append(i)
        return out

    def prototypes(self, mode: str = "complexity", kind: str = "joint") -> torch.Tensor:
        """Prototype centroids [P, D]: 'complexity' (simple domains once, complex ones by their children),
        'flat' (one per domain) or 'leaves'; kind = joint | image | text centroids."""
        if kind not in CENTROID_KINDS:
            raise GramvlError(f"prototype kind must be one of {', '.join(CENTROID_KINDS)}, not {kind!r}")
        return self.centroids[kind][torch.as_tensor(self.prototype_nodes(mode), dtype=torch.long)].clone()

    # ------------------------------------------------------------------------------- save / load
    def summary_dict(self) -> dict:
        nodes = [{"id": n.id, "parent": n.parent, "depth": n.depth, "size": n.size,
                  "complexity": round(n.complexity, 6), "dispersion": round(n.dispersion, 6),
                  "label": n.label, "children": n.children, "top_captions": n.top_captions}
                 for n in self.nodes]
        return {"format": HIERARCHY_FORMAT, **self.meta, "n_pairs": self.n_pairs,
                "n_kept": int(len(self.kept)), "n_domains": len(self.domains()),
                "n_leaves": len(self.leaves()), "nodes": nodes}

    def save(self, path: str | Path) -> Path:
        """Write `path` (safetensors: centroids, parent, leaf_of, dispersion, complexity, agreement) and
        `path`.json (config and every node: parent, depth, size, complexity, label, top captions)."""
        path = Path(path)
        tensors = {f"centroid_{k}": v.contiguous() for k, v in self.centroids.items()}
        tensors.update(parent=torch.from_numpy(self.parent), depth=torch.from_numpy(self.depth),
                       size=torch.from_numpy(self.size), leaf_of=torch.from_numpy(self.leaf_of),
                       dispersion=torch.from_numpy(self.dispersion),
                       complexity=torch.from_numpy(self.complexity),
                       agreement=torch.from_numpy(self.agreement))
        save_tensors(path, tensors, self.summary_dict())
        return path

    @classmethod
    def load(cls, path: str | Path) -> Hierarchy:
        """Load a saved hierarchy (never unpickles anything)."""
        t, side = load_tensors(path)
        if side is None or side.get("format") != HIERARCHY_FORMAT:
            raise GramvlError(f"{path} is not a gramvl hierarchy (missing or foreign JSON sidecar)")
        try:
            nodes = side["nodes"]
            meta = {k: v for k, v in side.items()
                    if k not in ("format", "nodes", "n_pairs", "n_kept", "n_domains", "n_leaves")}
            return cls(t["parent"].numpy(), t["leaf_of"].numpy(),
                       {k: t[f"centroid_{k}"] for k in CENTROID_KINDS}, t["dispersion"].numpy(),
                       [n["label"] for n in nodes], [n["top_captions"] for n in nodes],
                       t["agreement"].numpy(), meta)
        except KeyError as e:
            raise GramvlError(f"{path} is an incomplete hierarchy file (missing {e})") from e

    def summary(self, max_children: int = 30) -> str:
        """A human-readable tree: one line per node with size, complexity and label."""
        m = self.meta
        thr = m.get("agreement_threshold")
        thr_s = f", agreement >= {thr:.3f}" if isinstance(thr, float) and math.isfinite(thr) else ""
        lines = [f"{m.get('method', 'cmhc')} hierarchy: {self.n_pairs} pairs, {len(self.kept)} kept{thr_s}; "
                 f"{len(self.domains())} domains, {len(self.leaves())} leaves"]

        def walk(i: int, indent: int) -> None:
            n = self.node(i)
            kind = "domain" if n.depth == 1 else ("leaf" if n.is_leaf else f"node@{n.depth}")
            eg = f"  e.g. {' | '.join(n.top_captions[:3])}" if n.top_captions else ""
            sub = f" {len(n.children)} children" if n.children else ""
            lines.append(f"{'  ' * indent}[{i}] {kind} {n.label!r} size={n.size} "
                         f"complexity={n.complexity:.3f} dispersion={n.dispersion:.3f}{sub}{eg}")
            for c in n.children[:max_children]:
                walk(c, indent + 1)
            if len(n.children) > max_children:
                lines.append(f"{'  ' * (indent + 1)}... {len(n.children) - max_children} more")

        for d in self.domains():
            walk(d, 1)
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"Hierarchy({self.meta.get('method', 'cmhc')}: {len(self.kept)}/{self.n_pairs} pairs, "
                f"{len(self.domains())} domains, {len(self.leaves())} leaves)")


def _entropy_factor(sizes: list[int]) -> float:
    """max(1, entropy in bits of the children's sizes); 1 for a leaf."""
    s = np.asarray([x for x in sizes if x > 0], dtype=np.float64)
    if len(s) < 2:
        return 1.0
    p = s / s.sum()
    return max(1.0, float(-(p * np.log2(p)).sum()))


# ======================================================================================= weak labels
_PREFIX = re.compile(r"^(?:(?:a|an)\s+)?(?:photo|picture|image|drawing|illustration|clip ?art|icon|sketch)s?"
                     r"\s+of\s+")
_ARTICLE = re.compile(r"^(?:a|an|the)\s+")
_PAREN = re.compile(r"\([^)]*\)|\[[^\]]*\]")


def clean_caption(caption: str) -> str:
    """Lower-case, drop parentheses, 'a photo of'-style prefixes, leading articles and edge punctuation."""
    s = _PAREN.sub(" ", caption.lower())
    s = re.sub(r"\s+", " ", s).strip(" \t\n.,;:!?\"'`-_/")
    s = _ARTICLE.sub("", _PREFIX.sub("", s))
    return s.strip(" .,;:!?\"'`-_/")


def _ranked(captions: list[str], idx: np.ndarray, sim: np.ndarray, limit: int = 256) -> np.ndarray:
    """Member indices by decreasing similarity to the node's text centroid (at most `limit`)."""
    if len(idx) > limit:
        part = np.argpartition(-sim[idx], limit - 1)[:limit]
        idx = idx[part]
    return idx[np.argsort(-sim[idx], kind="stable")]


def _pick_label(captions: list[str], ranked: np.ndarray, used: set[str], max_words: int) -> str:
    cands = []
    for i in ranked:
        c = clean_caption(captions[int(i)])
        if c and c not in cands:
            cands.append(c)
    if not cands:
        return "unnamed"
    short = [c for c in cands if len(c.split()) <= max_words]
    for c in short:
        if c not in used:
            return c
    for c in cands:
        if c not in used:
            return " ".join(c.split()[:max_words])
    return short[0] if short else " ".join(cands[0].split()[:max_words])


def _top_captions(captions: list[str], ranked: np.ndarray, n: int) -> list[str]:
    out: list[str] = []
    for i in ranked:
        c = captions[int(i)].strip()
        if c not in out:
            out.append(c)
            if len(out) >= n:
                break
    return out


# ======================================================================================= assembling
def _assemble(feats: CorpusFeatures, fx: _Features, parent: list[int], leaf_of: np.ndarray, agr: np.ndarray,
              thr: float, cfg: CMHCConfig, method: str, extra: dict | None = None) -> Hierarchy:
    """Centroids (chunked sums per leaf, aggregated upwards), dispersion, labels, top captions."""
    m, dim = len(parent), feats.dim
    kept = np.flatnonzero(leaf_of >= 0)
    sums = {k: torch.zeros(m, dim, dtype=torch.float64) for k in CENTROID_KINDS}
    for s in range(0, len(kept), cfg.chunk):
        ix = kept[s:s + cfg.chunk]
        lab = torch.from_numpy(leaf_of[ix])
        for k, z in (("image", feats.zI), ("text", feats.zT)):
            sums[k].index_add_(0, lab, torch.from_numpy(np.asarray(z[ix], dtype=np.float32)).double())
        sums["joint"].index_add_(0, lab, torch.from_numpy(fx.joint(ix)).double())
    counts = np.bincount(leaf_of[kept], minlength=m).astype(np.float64)
    for i in reversed(range(1, m)):
        for k in CENTROID_KINDS:
            sums[k][parent[i]] += sums[k][i]
        counts[parent[i]] += counts[i]
    disp = 1.0 - sums["joint"].norm(dim=1).numpy() / np.maximum(counts, 1)
    disp = np.where(counts > 0, np.clip(disp, 0.0, 2.0), 0.0)
    cents = {k: F.normalize(v, dim=1).float() for k, v in sums.items()}
    h = Hierarchy(np.asarray(parent), leaf_of, cents, disp, [""] * m, [[] for _ in range(m)], agr,
                  {"method": method, "config": asdict(cfg), "agreement_threshold": thr,
                   "corpus_ident": feats.ident, "corpus_key": feats.key, "cluster_fill": CLUSTER_FILL,
                   **(extra or {})})
    # text similarity of every kept pair to the text centroid of its ancestor at each depth
    caps = feats.captions
    anc = leaf_of.copy()
    maxd = int(h.depth.max())
    by_depth = {}
    for d in range(maxd, 0, -1):
        sim = np.full(len(leaf_of), -np.inf, dtype=np.float32)
        for s in range(0, len(kept), cfg.chunk):
            ix = kept[s:s + cfg.chunk]
            t = torch.from_numpy(np.asarray(feats.zT[ix], dtype=np.float32))
            sim[ix] = (t * cents["text"][torch.from_numpy(anc[ix])]).sum(1).numpy()
        by_depth[d] = sim
        nxt = anc.copy()
        sel = kept[h.depth[anc[kept]] == d]
        nxt[sel] = h.parent[anc[sel]]
        anc = nxt
    labels, tops = [""] * m, [[] for _ in range(m)]
    for d in range(1, maxd + 1):
        nodes_d = [i for i in range(m) if h.depth[i] == d]
        groups: dict[int, list[int]] = {}
        for i in nodes_d:  # deduplicate labels within a domain (domains among themselves)
            groups.setdefault(h.domain_of(i) if d > 1 else 0, []).append(i)
        for group in groups.values():
            used: set[str] = set()
            for i in sorted(group, key=lambda j: (-h.size[j], j)):
                if h.size[i] == 0:
                    labels[i] = "empty"
                    continue
                ranked = _ranked(caps, h.members(i), by_depth[d])
                labels[i] = _pick_label(caps, ranked, used, cfg.label_words)
                used.add(labels[i])
                tops[i] = _top_captions(caps, ranked, cfg.top_captions)
    labels[0] = "root"
    h.labels, h.top_captions = labels, tops
    return h


def _order_children(groups: list[np.ndarray]) -> list[np.ndarray]:
    """Children by decreasing size, ties by first member: a deterministic, readable order."""
    return sorted(groups, key=lambda g: (-len(g), int(g[0]) if len(g) else -1))


def _merge_small(groups: list[np.ndarray], fx: _Features, min_size: int) -> list[np.ndarray]:
    """Merge children smaller than min_size into the sibling with the nearest joint centroid."""
    groups = [g for g in groups if len(g)]
    if len(groups) < 2:
        return groups
    sums = [_joint_sum(fx, g, fx.cfg.chunk) for g in groups]
    while len(groups) > 1:
        sizes = [len(g) for g in groups]
        j = int(np.argmin(sizes))
        if sizes[j] >= min_size:
            break
        c = F.normalize(torch.stack(sums).float(), dim=1)
        sim = c @ c[j]
        sim[j] = -math.inf
        t = int(torch.argmax(sim))
        groups[t] = np.sort(np.concatenate([groups[t], groups[j]]))
        sums[t] = sums[t] + sums[j]
        del groups[j], sums[j]
    return groups


def _split(fx: _Features, idx: np.ndarray, k: int, cfg: CMHCConfig, seed) -> list[np.ndarray]:
    k = max(1, min(k, len(idx) // cfg.leaf_min_size if len(idx) >= cfg.leaf_min_size else 1))
    if k == 1:
        return [idx]
    assign, counts = _spherical_kmeans_rows(fx.joint_rows(idx), k, cfg.iters, seed, cfg.tol, cfg.use_faiss,
                                            cfg.init_sample, cfg.chunk, cfg.n_init,
                                            min(256, cfg.max_memory_mb) << 20)
    order = np.argsort(assign, kind="stable")
    groups = [g for g in np.split(idx[order], np.cumsum(counts)[:-1]) if len(g)]
    return _order_children(_merge_small(groups, fx, cfg.leaf_min_size))


def _children_counts(disp: np.ndarray, sizes: np.ndarray, cfg: CMHCConfig) -> np.ndarray:
    """Provisional complexity (dispersion) rescaled over a level into [min_children, max_children]."""
    lo, hi = float(disp.min()), float(disp.max())
    r = (disp - lo) / (hi - lo) if hi - lo > 1e-9 else np.full(len(disp), 0.5)
    k = np.rint(cfg.min_children + r * (cfg.max_children - cfg.min_children)).astype(np.int64)
    return np.maximum(1, np.minimum(k, sizes // cfg.leaf_min_size))


def _joint_sum(fx: _Features, idx: np.ndarray, chunk: int) -> torch.Tensor:
    s = torch.zeros(fx.dim, dtype=torch.float64)
    for a in range(0, len(idx), chunk):
        s += torch.from_numpy(fx.joint(idx[a:a + chunk])).double().sum(0)
    return s


def _dispersion(fx: _Features, idx: np.ndarray, chunk: int) -> float:
    """Mean (1 - cos) of the members to their normalized mean = 1 - ||mean u||."""
    return float(1.0 - _joint_sum(fx, idx, chunk).norm() / max(len(idx), 1))


def _prepare(feats: CorpusFeatures, cfg: CMHCConfig):
    agr, kept, thr = _filter(feats, cfg)
    if len(kept) < 2:
        raise GramvlError(f"only {len(kept)} pairs pass the agreement filter; need a larger corpus")
    fx = _Features(feats, cfg)
    fx.materialize(kept)
    return agr, kept, thr, fx


def _tree_to_arrays(tree: list[tuple[int, np.ndarray, bool]], n: int) -> tuple[list[int], np.ndarray]:
    """(parent, members, is_leaf) per node in BFS order -> parent list and leaf_of [n]."""
    leaf_of = np.full(n, -1, dtype=np.int64)
    for i, (_, members, is_leaf) in enumerate(tree):
        if is_leaf:
            leaf_of[members] = i
    return [p for p, _, _ in tree], leaf_of


@_pinned
def cmhc(features: CorpusFeatures, cfg: CMHCConfig | None = None, progress: bool = False) -> Hierarchy:
    """Cluster the corpus into domains and weakly labeled classes (SPEC 1.1, 1.6)."""
    from tqdm import tqdm

    cfg = cfg or CMHCConfig()
    agr, kept, thr, fx = _prepare(features, cfg)
    tree: list[tuple[int, np.ndarray, bool]] = [(-1, kept, False)]
    level = [0]
    for depth in range(1, cfg.levels + 1):
        last = depth == cfg.levels
        if depth == 1:
            ks = np.array([cfg.k1])
        else:
            disp = np.array([_dispersion(fx, tree[i][1], cfg.chunk) for i in level])
            ks = _children_counts(disp, np.array([len(tree[i][1]) for i in level]), cfg)
        nxt = []
        for i, k in tqdm(list(zip(level, ks, strict=True)), desc=f"cmhc level {depth}", disable=not progress,
                         leave=False):
            groups = _split(fx, tree[i][1], int(k), cfg, [cfg.seed, depth, i])
            for g in groups:
                tree.append((i, g, last))
                nxt.append(len(tree) - 1)
        level = nxt
    parent, leaf_of = _tree_to_arrays(tree, len(features))
    return _assemble(features, fx, parent, leaf_of, agr, thr, cfg, "cmhc")


# ======================================================================================= ablations
def _group_leaves(leaves: list[np.ndarray], n_domains: int, rng: np.random.Generator,
                  kept: np.ndarray, n: int) -> tuple[list[int], np.ndarray]:
    """Leaves dealt into n_domains random domains -> (parent, leaf_of) in BFS order."""
    n_domains = max(1, min(n_domains, len(leaves)))
    perm = rng.permutation(len(leaves))
    doms = [sorted(p.tolist()) for p in np.array_split(perm, n_domains)]
    tree: list[tuple[int, np.ndarray, bool]] = [(-1, kept, False)]
    dom_ids = []
    for d in doms:
        tree.append((0, np.sort(np.concatenate([leaves[j] for j in d])), False))
        dom_ids.append(len(tree) - 1)
    for di, d in zip(dom_ids, doms, strict=True):
        for j in d:
            tree.append((di, leaves[j], True))
    return _tree_to_arrays(tree, n)


def _shape_of(like: Hierarchy | None, n_leaves: int | None, n_domains: int | None,
              cfg: CMHCConfig) -> tuple[int, int]:
    if like is not None:
        return len(like.leaves()), len(like.domains())
    per = (cfg.min_children + cfg.max_children) // 2
    return (n_leaves or cfg.k1 * per), (n_domains or cfg.k1)


@_pinned
def flat_clusters(features: CorpusFeatures, cfg: CMHCConfig | None = None, k: int | None = None,
                  n_domains: int | None = None, like: Hierarchy | None = None) -> Hierarchy:
    """Ablation: flat k-means into k leaves, dealt into random domains (the shape of `like` when given;
    else k = k1 x (min_children + max_children) // 2 leaves in k1 domains)."""
    cfg = cfg or CMHCConfig()
    k, n_domains = _shape_of(like, k, n_domains, cfg)
    agr, kept, thr, fx = _prepare(features, cfg)
    leaves = _split(fx, kept, k, cfg, [cfg.seed, 0, 0])
    rng = np.random.default_rng([cfg.seed, 1])
    parent, leaf_of = _group_leaves(leaves, n_domains, rng, kept, len(features))
    return _assemble(features, fx, parent, leaf_of, agr, thr, cfg, "flat")


@_pinned
def random_hierarchy(features: CorpusFeatures, cfg: CMHCConfig | None = None, n_domains: int | None = None,
                     n_leaves: int | None = None, like: Hierarchy | None = None) -> Hierarchy:
    """Ablation: a random partition of the filtered pairs (the shape and leaf sizes of `like` when given;
    else the default shape of flat_clusters)."""
    cfg = cfg or CMHCConfig()
    rng = np.random.default_rng([cfg.seed, 2])
    if like is not None:
        agr, kept, thr, fx = _prepare(features, cfg)
        if len(kept) != len(like.kept):
            raise GramvlError("random_hierarchy(like=...) needs the same corpus and filter as `like`")
        perm = rng.permutation(kept)
        tree: list[tuple[int, np.ndarray, bool]] = [(-1, kept, False)]
        offs, dom_slots = 0, []
        leaf_parts: list[tuple[int, np.ndarray]] = []
        for d in like.domains():
            dmem = []
            for leaf in like.leaves(d):
                part = np.sort(perm[offs:offs + int(like.size[leaf])])
                offs += len(part)
                dmem.append(part)
            tree.append((0, np.sort(np.concatenate(dmem)), False))
            dom_slots.append(len(tree) - 1)
            leaf_parts.extend((len(tree) - 1, p) for p in dmem)
        tree.extend((p, m, True) for p, m in leaf_parts)
        parent, leaf_of = _tree_to_arrays(tree, len(features))
        return _assemble(features, fx, parent, leaf_of, agr, thr, cfg, "random")
    k, n_domains = _shape_of(None, n_leaves, n_domains, cfg)
    agr, kept, thr, fx = _prepare(features, cfg)
    k = max(1, min(k, len(kept)))
    leaves = [np.sort(p) for p in np.array_split(rng.permutation(kept), k)]
    parent, leaf_of = _group_leaves(leaves, n_domains, rng, kept, len(features))
    return _assemble(features, fx, parent, leaf_of, agr, thr, cfg, "random")
