"""`gramvl cache`: what $GRAMVL_HOME/cache holds, and which entries no run serves any more.

Cache keys record how an entry was made (`paths.cache_fill_tag`, `cmhc.CLUSTER_FILL`), so when the rules change
(sessions 15 and 16) the old entries are never served again, but they stay on disk. Each entry's own record says
how it was made: the feature and corpus sidecars and the feature-shard manifests name their `fill`, hierarchies
their `cluster_fill`, test-time view folders their `recipe.json`. An entry whose record names the current rules is
current; one that names other rules, or none, is stale, and `--prune` deletes it. Few-shot indices do not depend
on the rules and are always current; files gramvl does not know are listed as unknown and never deleted.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from gramvl.paths import gramvl_home


@dataclass
class Entry:
    kind: str
    paths: list[Path]  # what deleting the entry removes
    size: int  # bytes
    state: str  # current | stale | unknown
    why: str = ""


def current_fill(fill: str | None) -> bool:
    """Whether a feature cache's recorded fill is one the current code writes (on the CPU or any device)."""
    from gramvl.backbone import MIN_ROWS
    from gramvl.paths import cache_fill_tag

    if not fill:
        return False
    return fill == cache_fill_tag("cpu") or (fill.endswith(f"-rows{MIN_ROWS}") and not fill.startswith("cpu"))


def _size(p: Path) -> int:
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return p.stat().st_size if p.exists() else 0


def _read(p: Path) -> dict | None:
    try:
        d = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None


def current_cluster_fill(fill: str | None) -> bool:
    """Whether a hierarchy's recorded `cluster_fill` is the one the current code clusters with."""
    from gramvl.gram.cmhc import CLUSTER_FILL

    return fill == CLUSTER_FILL


def _fill_state(record: dict | None, field: str, is_current) -> tuple[str, str]:
    if record is None:
        return "stale", "no readable record of how it was made"
    fill = record.get(field)
    if is_current(fill):
        return "current", ""
    return "stale", f"{field} {fill!r}" if fill else f"no {field} recorded"


def _first_record(folder: Path) -> dict | None:
    """The folder's record: corpus.json (a corpus), manifest.json (feature shards) or recipe.json (test-time views)."""
    for name in ("corpus.json", "manifest.json", "recipe.json"):
        if (folder / name).exists():
            return _read(folder / name)
    return None


def _pairs(folder: Path, kind: str, field: str, is_current) -> list[Entry]:
    """<key>.safetensors + <key>.json entries (features, hierarchies)."""
    out = []
    for st in sorted(folder.glob("*.safetensors")):
        side = st.with_suffix(".json")
        state, why = _fill_state(_read(side), field, is_current)
        paths = [st] + ([side] if side.exists() else [])
        out.append(Entry(kind, paths, sum(_size(p) for p in paths), state, why))
    known = {p for e in out for p in e.paths}
    out += [Entry(kind, [p], _size(p), "unknown", "not a cache entry gramvl writes")
            for p in sorted(folder.iterdir()) if p not in known and not p.name.startswith(".")]
    return out


def scan(home: Path | None = None) -> list[Entry]:
    """Every entry under `home`/cache (default $GRAMVL_HOME) with its state."""
    root = (home or gramvl_home()) / "cache"
    if not root.is_dir():
        return []
    out: list[Entry] = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        kind = folder.name
        if kind == "features":
            out += _pairs(folder, kind, "fill", current_fill)
        elif kind == "cmhc":
            out += _pairs(folder, kind, "cluster_fill", current_cluster_fill)
        elif kind in ("corpus", "tta-views"):
            for d in sorted(folder.iterdir()):
                if not d.is_dir():
                    out.append(Entry(kind, [d], _size(d), "unknown", "not a cache entry gramvl writes"))
                    continue
                state, why = _fill_state(_first_record(d), "fill", current_fill)
                shards = kind == "corpus" and (d / "manifest.json").exists()
                out.append(Entry("corpus shards" if shards else kind, [d], _size(d), state, why))
        elif kind == "fewshot":
            out += [Entry(kind, [p], _size(p), "current") for p in sorted(folder.iterdir())]
        else:
            out.append(Entry(kind, [folder], _size(folder), "unknown", "not a cache gramvl writes"))
    return out


def prune(entries: list[Entry]) -> int:
    """Delete the stale entries; returns the bytes freed."""
    freed = 0
    for e in entries:
        if e.state != "stale":
            continue
        for p in e.paths:
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)
        freed += e.size
    return freed


def summary(entries: list[Entry]) -> list[list]:
    """Rows per kind: entries, current, stale, stale MB, unknown."""
    rows = []
    for kind in sorted({e.kind for e in entries}):
        es = [e for e in entries if e.kind == kind]
        stale = [e for e in es if e.state == "stale"]
        rows.append([kind, len(es), sum(e.state == "current" for e in es), len(stale),
                     f"{sum(e.size for e in stale) / 1e6:.1f}", sum(e.state == "unknown" for e in es)])
    return rows
