"""The embedded world: pre-training pairs, meta-training pairs and downstream datasets built from packages.

`build_world()` fetches seven pinned npm/Debian packages and builds everything under
`gramvl.paths.world_dir()`; the loaders below read the result. See docs/data.md.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
from pathlib import Path

from gramvl.data.base import ImageDataset, load_folder
from gramvl.data.world.build import (
    BUILDER_VERSION,
    PART_VERSIONS,
    build_datasets,
    build_icons,
    build_meta,
    build_pretrain,
    log,
    swap_in,
)
from gramvl.data.world.sources import (
    ICON_SOURCES,
    SOURCE_BY_NAME,
    SOURCES,
    SourceTree,
    archive_stem,
    extract_source,
    fetch_source,
)
from gramvl.errors import GramvlError
from gramvl.io import write_json
from gramvl.paths import world_dir

__all__ = ["BUILDER_VERSION", "build_icon_part", "build_world", "embedded_dataset_names", "load_embedded",
           "load_icon_pairs", "load_meta_pairs", "load_pretrain_pairs", "world_info"]

MANIFEST = "MANIFEST.json"
PART_FILE = "PART.json"
# part -> (builder, the packages it reads); built in this order (pretrain first: the CLIP trains on it)
PARTS = {
    "pretrain": (build_pretrain, ("emoji-datasource-google", "emoji-datasource-twitter", "unicode-cldr-core")),
    "datasets": (build_datasets, ("openmoji", "emoji-datasource-google", "emoji-datasource-twitter",
                                  "dataset-fashion-mnist")),
    "meta": (build_meta, ("openclipart-svg", "tuxpaint-stamps-default")),
}


def _not_built(world: Path) -> GramvlError:
    return GramvlError(f"the embedded world is not built (no {world / MANIFEST}); run `gramvl world build`")


def _read_json(path: Path) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _part_done(world: Path, part: str) -> dict | None:
    info = _read_json(world / part / PART_FILE)
    return info if info and info.get("part_version") == PART_VERSIONS[part] else None


def _build_part(world: Path, part: str, build, info: dict) -> dict:
    """Build one part in `world/.tmp-<part>` (build(tmp) -> counts), write its PART.json, rename it into place."""
    tmp = world / f".tmp-{part}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t = time.time()
    counts = build(tmp)
    write_json(tmp / PART_FILE, {"part_version": PART_VERSIONS[part], **info, "counts": counts,
                                 "seconds": round(time.time() - t, 1)})
    swap_in(tmp, world / part)
    return counts


@contextlib.contextmanager
def _build_lock(world: Path):
    world.mkdir(parents=True, exist_ok=True)
    with open(world / ".build.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            raise GramvlError(f"another `gramvl world build` is running on {world}; wait for it to finish") from e
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build_world(force: bool = False, progress: bool = True, processes: int = 2) -> Path:
    """Build the embedded world under world_dir() (returns at once when it is already built); return its path.

    Each part is built in a temp folder and renamed into place; MANIFEST.json is written last.
    """
    world = world_dir()
    manifest = _read_json(world / MANIFEST)
    if not force and manifest and manifest.get("builder_version") == BUILDER_VERSION:
        return world
    say = log if progress else (lambda msg: None)
    with _build_lock(world):
        t0 = time.time()
        (world / MANIFEST).unlink(missing_ok=True)
        recorded = {k: v.get("sha256") for k, v in ((manifest or {}).get("sources") or {}).items()
                    if k in SOURCE_BY_NAME and v.get("version") == SOURCE_BY_NAME[k].version}
        work = world / ".build"
        shutil.rmtree(work, ignore_errors=True)
        tree = SourceTree(work / "src")
        archives: dict[str, Path] = {}
        digests: dict[str, str] = {}

        def need(names: tuple[str, ...], extract: bool) -> None:
            for n in names:
                src = SOURCE_BY_NAME[n]
                if n not in archives:
                    digests[n] = recorded.get(n) or src.sha256  # fetch_source verifies the archive against it
                    archives[n] = fetch_source(src, world / "sources", digests[n], say)
                if extract and not (tree.root / archive_stem(n)).is_dir():
                    say(f"world: unpacking {archives[n].name}")
                    extract_source(src, archives[n], tree.root)

        parts: dict[str, dict] = {}
        for part, (builder, names) in PARTS.items():
            done = None if force else _part_done(world, part)
            if done:
                say(f"world: {part} already built, kept")
                parts[part] = done["counts"]
                continue
            need(names, extract=True)
            t = time.time()
            parts[part] = _build_part(world, part, lambda tmp, b=builder: b(tree, tmp, processes=processes,
                                                                              progress=progress),
                                      {"builder_version": BUILDER_VERSION})
            say(f"world: {part} built in {time.time() - t:.0f} s")
        need(tuple(s.name for s in SOURCES), extract=False)  # record every archive, even of reused parts
        shutil.rmtree(work, ignore_errors=True)
        write_json(world / MANIFEST, {
            "builder_version": BUILDER_VERSION,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "build_seconds": round(time.time() - t0, 1),
            "sources": {s.name: {"kind": s.kind, "version": s.version, "archive": f"sources/{archives[s.name].name}",
                                 "sha256": digests[s.name], "license": s.license, "role": s.role} for s in SOURCES},
            "parts": parts,
        })
        say(f"world: built in {time.time() - t0:.0f} s at {world}")
    return world


def build_icon_part(force: bool = False, progress: bool = True, processes: int = 2) -> Path:
    """Build the optional icon corpus (world/icons) from the pinned iconify packages; return its folder.

    It widens the small CLIP's pre-training corpus (`gramvl pretrain --icons`); the default world does not
    need it. Its PART.json records the packages with their sha256 and licences."""
    world = world_dir()
    if not force and _part_done(world, "icons"):
        return world / "icons"
    say = log if progress else (lambda msg: None)
    with _build_lock(world):
        t0 = time.time()
        work = world / ".build-icons"
        shutil.rmtree(work, ignore_errors=True)
        tree = SourceTree(work / "src")
        sources = {}
        for src in ICON_SOURCES:
            archive = fetch_source(src, world / "sources", src.sha256, say)
            extract_source(src, archive, tree.root)
            sources[src.name] = {"kind": src.kind, "version": src.version, "archive": f"sources/{archive.name}",
                                 "sha256": src.sha256, "license": src.license, "role": src.role}
        names = [s.name for s in ICON_SOURCES]
        counts = _build_part(world, "icons", lambda tmp: build_icons(tree, tmp, names, processes=processes,
                                                                     progress=progress), {"sources": sources})
        shutil.rmtree(work, ignore_errors=True)
        say(f"world: icons built in {time.time() - t0:.0f} s ({counts['pairs']} icons)")
    return world / "icons"


def world_info() -> dict:
    """The manifest of the built world (builder version, sources with sha256, per-part counts)."""
    world = world_dir()
    info = _read_json(world / MANIFEST)
    if info is None:
        raise _not_built(world)
    return info


def embedded_dataset_names() -> list[str]:
    """Names of the built world's downstream datasets, sorted."""
    world = world_dir()
    _require_part(world, "datasets")
    root = world / "datasets"
    return sorted(d.name for d in root.iterdir() if (d / "info.json").is_file())


def load_embedded(name: str, split: str) -> ImageDataset:
    """One split of an embedded downstream dataset (name and domain from its info.json)."""
    names = embedded_dataset_names()
    if name not in names:
        raise GramvlError(f"unknown embedded dataset {name!r}; available: {', '.join(names)}")
    root = world_dir() / "datasets" / name
    info = _read_json(root / "info.json") or {}
    ds = load_folder(root, split, name=name)
    ds.domain = info.get("domain", "")
    ds.extra = {"style": info.get("style", ""), "description": info.get("description", "")}
    return ds


def _require_part(world: Path, part: str) -> None:
    """Each part is usable once it is in place, even while another part is being (re)built."""
    if not _part_done(world, part):
        raise GramvlError(f"the {part} part of the embedded world is not built (no current {world / part / PART_FILE}); "
                          "run `gramvl world build`")


def _load_pairs(part: str) -> list[dict]:
    world = world_dir()
    _require_part(world, part)
    rows = []
    with open(world / part / "pairs.jsonl", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                r["image"] = os.fspath(world / r["image"])
                rows.append(r)
    return rows


def load_pretrain_pairs() -> list[dict]:
    """The pre-training pairs (emoji images in two styles, names, keywords); image paths absolute."""
    return _load_pairs("pretrain")


def load_icon_pairs() -> list[dict]:
    """The optional icon corpus (named pictograms; `gramvl world build --icons`); image paths absolute."""
    world = world_dir()
    if not _part_done(world, "icons"):
        raise GramvlError(f"the icon corpus is not built (no current {world / 'icons' / PART_FILE}); "
                          "run `gramvl world build --icons`")
    return _load_pairs("icons")


def load_meta_pairs() -> list[dict]:
    """The meta-training pairs (clip art and stamps with captions); image paths absolute."""
    return _load_pairs("meta")
