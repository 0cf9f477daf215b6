"""Building the three parts of the embedded world from an unpacked SourceTree (no network here)."""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import os
import re
import shutil
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable, Iterable
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image

from gramvl.data.world.captions import clean_filename, clean_sentence, clean_title, normalize_classname
from gramvl.data.world.render import instance_seed, load_art, on_white, render_instance
from gramvl.data.world.sources import SourceTree
from gramvl.errors import GramvlError
from gramvl.io import write_json

# bumped when a part's output changes; build_world rebuilds only the parts whose version differs
# (the optional icons part is built on its own and is not in BUILDER_VERSION: the default world needs none)
PART_VERSIONS = {"pretrain": 1, "datasets": 1, "meta": 4, "icons": 1}
BUILDER_VERSION = "1." + ".".join(str(PART_VERSIONS[p]) for p in ("pretrain", "datasets", "meta"))
PRETRAIN_STYLES = ("google", "twitter")
SPLIT_COUNTS = {"train": 20, "val": 5, "test": 15}
META_MAX_PAIRS = 12000          # cap on the meta corpus (all usable pairs fit under it today)
META_MAX_PER_CAPTION = 8        # at most this many images share one caption (e.g. 1,378 "a star" files)
SVG_TIMEOUT_S = 2.0             # per-file render limit for icons (slower files are skipped)
# The meta corpus does not depend on how busy the machine is: the clip art that failed or took longer than 2 s
# to render on the reference build is pinned in META_SKIP_FILE and skipped everywhere; every other file gets
# META_RENDER_TIMEOUT_S, and one that still fails is reported (counts["unexpected_failures"]), never hidden.
META_SKIP_FILE = Path(__file__).with_name("meta_skip.txt")
META_RENDER_TIMEOUT_S = 60.0
SVG_MAX_BYTES = 400_000         # larger clip-art files are skipped without trying
FASHION_VAL_SIZE = 5000
FASHION_VAL_SEED = 0
FASHION_PUBLISHED = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                     "Ankle boot"]
FASHION_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle boot"]


def _animal(g: str, sg: str) -> bool:
    return g == "animals-nature" and sg.startswith("animal-")


def _nature(g: str, sg: str) -> bool:
    return (g == "animals-nature" and sg.startswith("plant-")) or (g == "travel-places" and sg == "sky-weather")


# name -> (description, predicate on (openmoji group, subgroup))
EMOJI_DATASETS: dict[str, tuple[str, Callable[[str, str], bool]]] = {
    "emoji-animals": ("animals (OpenMoji group animals-nature, subgroups animal-*)", _animal),
    "emoji-nature": ("plants and weather (animals-nature plant-*, travel-places sky-weather)", _nature),
    "emoji-food": ("food and drink (OpenMoji group food-drink)", lambda g, sg: g == "food-drink"),
    "emoji-travel": ("places, buildings, vehicles, time (travel-places except sky-weather)",
                     lambda g, sg: g == "travel-places" and sg != "sky-weather"),
    "emoji-objects": ("everyday objects (OpenMoji group objects)", lambda g, sg: g == "objects"),
    "emoji-activities": ("sports, games, events, arts (OpenMoji group activities)",
                         lambda g, sg: g == "activities"),
    "emoji-faces": ("faces, hearts and emotions (OpenMoji group smileys-emotion)",
                    lambda g, sg: g == "smileys-emotion"),
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_jobs(func: Callable, jobs: list, processes: int = 2, progress: bool = True, desc: str = "",
             chunksize: int = 1, fresh: bool = False) -> list:
    """Map `func` over `jobs` in a process pool (serially when processes <= 1), with a tqdm bar.

    `fresh`: every job runs in a new process forked from this one (no state left by earlier jobs), whatever
    `processes` is; for work whose result depends on process state (this process must not have done such
    work itself: the world build renders only in workers).
    """
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), desc=desc, unit="job", file=sys.stderr, dynamic_ncols=True)
    out = []
    try:
        if not fresh and (processes <= 1 or len(jobs) <= 1):
            for j in jobs:
                out.append(func(j))
                if bar is not None:
                    bar.update(1)
        elif jobs:
            with get_context("fork").Pool(max(1, processes), maxtasksperchild=1 if fresh else None) as pool:
                for r in pool.imap_unordered(func, jobs, chunksize=1 if fresh else chunksize):
                    out.append(r)
                    if bar is not None:
                        bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return out


def _write_jsonl(path: Path, rows: Iterable[dict]) -> int:
    n = 0
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    return n


def _read_json(path: Path) -> object:
    if not path.is_file():
        raise GramvlError(f"source file missing: {path} (the source package is incomplete; rebuild with force=True)")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# ---------------------------------------------------------------- pre-training corpus (emoji-datasource + CLDR)

def unified_to_char(unified: str) -> str:
    """'1F44D-1F3FB' -> the emoji string."""
    return "".join(chr(int(h, 16)) for h in unified.split("-"))


def read_cldr_keywords(files: list[Path]) -> dict[str, dict]:
    """CLDR English annotations: emoji string -> {'keywords': [...], 'tts': name} (files read in order)."""
    out: dict[str, dict] = {}
    for path in files:
        if not path.is_file():
            continue
        for el in ET.parse(path).getroot().iter("annotation"):
            cp, text = el.get("cp"), (el.text or "").strip()
            if not cp or not text:
                continue
            rec = out.setdefault(cp, {"keywords": [], "tts": ""})
            if el.get("type") == "tts":
                rec["tts"] = text
            else:
                rec["keywords"] = [k.strip() for k in text.split("|") if k.strip()]
    return out


def _cldr_lookup(cldr: dict[str, dict], unified: str) -> dict:
    ch = unified_to_char(unified)
    return cldr.get(ch) or cldr.get(ch.replace("\ufe0f", "")) or {"keywords": [], "tts": ""}


def _pretrain_job(job: tuple[str, str]) -> bool:
    src, dst = job
    with Image.open(src) as im:
        on_white(im).save(dst)
    return True


def build_pretrain(tree: SourceTree, out: Path, processes: int = 2, progress: bool = True) -> dict:
    """world/pretrain: both styles' 64 px base emoji on white + pairs.jsonl with names and CLDR keywords."""
    cldr = read_cldr_keywords(tree.cldr_annotation_files)
    rows, jobs = [], []
    for style in PRETRAIN_STYLES:
        entries = _read_json(tree.emoji_json(style))
        img_dir = tree.emoji_png_dir(style)
        (out / "images" / style).mkdir(parents=True, exist_ok=True)
        for e in sorted(entries, key=lambda e: e.get("sort_order", 0)):
            if e.get("category") == "Component" or not e.get(f"has_img_{style}", False):
                continue
            src = img_dir / e["image"]
            if not src.is_file():
                continue
            rel = f"pretrain/images/{style}/{e['unified'].lower()}.png"
            jobs.append((str(src), str(out / "images" / style / f"{e['unified'].lower()}.png")))
            kw = _cldr_lookup(cldr, e["unified"])
            rows.append({"image": rel, "style": style, "hexcode": e["unified"],
                         "name": (e.get("name") or kw["tts"] or e.get("short_name", "")).lower(),
                         "cldr_name": kw["tts"], "short_names": list(e.get("short_names") or []),
                         "keywords": kw["keywords"], "category": e.get("category", ""),
                         "subcategory": e.get("subcategory", "")})
    if not rows:
        raise GramvlError(f"no emoji images found under {tree.root} (emoji-datasource packages incomplete)")
    run_jobs(_pretrain_job, jobs, processes, progress, "world: pretrain images", chunksize=64)
    _write_jsonl(out / "pairs.jsonl", rows)
    by_style = Counter(r["style"] for r in rows)
    return {"pairs": len(rows), "by_style": dict(by_style),
            "with_keywords": sum(1 for r in rows if r["keywords"])}


# ---------------------------------------------------------------- optional icon corpus (iconify icon sets)

ICONS_PER_CONCEPT = 2   # at most this many variants (e.g. filled and outline) of one name per icon set
# trailing name tokens that mark a drawing variant of the same thing ("shirt-filled", "a-b-2")
_ICON_VARIANT = {"outline", "outlined", "filled", "fill", "solid", "alt", "variant", "sharp", "rounded", "thin",
                 "bold", "line", "multiple", "box", "circle", "square"}
# tokens that mark a user-interface overlay on a thing ("bag-personal-plus", "shirt-off"): such icons are skipped
_ICON_OVERLAY = {"off", "plus", "minus", "remove", "check", "alert", "cancel", "edit", "lock", "unlock", "sync",
                 "search", "cog", "settings", "question", "exclamation", "x", "share", "import", "export",
                 "refresh", "clock", "dollar", "discount", "pause", "play", "code", "bolt", "pin", "up", "down",
                 "left", "right", "arrow", "star", "heart", "tag", "move", "back", "network", "marker", "eye",
                 "wrench", "account", "sort", "filter", "open", "closed", "on", "auto", "cloud", "percent",
                 "spark", "hexagon", "dots", "minimal", "pen", "bookmark", "link", "message"}
# whole icon sets' categories (mdi metadata) that hold letters, logos, text formatting or smiley faces
_ICON_SKIP_CATEGORIES = {"Alpha / Numeric", "Brand / Logo", "Social Media", "Text / Content / Format",
                         "Developer / Languages", "Emoji", "Form", "Tooltip", "Vector", "View", "Arrange"}
_ICON_SKIP_PREFIX = ("brand-", "alpha-", "numeric-", "format-", "language-", "letter-", "number-", "math-",
                     "emoticon", "mood-", "file-", "folder-", "arrow", "chevron", "caret", "sort-", "align-")


def icon_caption(name: str) -> str | None:
    """The caption words of an icon name, or None for icons that are not a depictable thing.

    'tshirt-crew-outline' -> 'tshirt crew'; 'bag-personal-plus' -> None (an overlay); 'a-b-2' -> None."""
    if name.startswith(_ICON_SKIP_PREFIX):
        return None
    toks = name.lower().split("-")
    while len(toks) > 1 and (toks[-1] in _ICON_VARIANT or toks[-1].isdigit()):
        toks.pop()
    if any(t in _ICON_OVERLAY for t in toks[1:]) or toks[0] in _ICON_OVERLAY:
        return None
    if any(len(t) < 2 or any(ch.isdigit() for ch in t) for t in toks):
        return None
    return " ".join(toks)


def icon_svg(body: str, width: float, height: float) -> bytes:
    """A standalone SVG of one iconify icon body, drawn in black (the sets use currentColor)."""
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" '
            f'height="{height}" color="#000000">{body}</svg>').encode()


def iconify_items(tree: SourceTree, package: str) -> list[dict]:
    """Captioned icons of one iconify package (aliases skipped: they repeat an icon under another name)."""
    path = tree.iconify_json(package)
    data = _read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("icons"), dict):
        raise GramvlError(f"{path} is not an iconify icon set (no 'icons' object)")
    skip: set[str] = set()
    category_of: dict[str, str] = {}
    meta = tree.iconify_metadata(package)
    if meta.is_file():
        for cat, names in (_read_json(meta) or {}).get("categories", {}).items():
            for n in names:
                category_of.setdefault(n, cat)
                if cat in _ICON_SKIP_CATEGORIES:
                    skip.add(n)
    prefix = str(data.get("prefix") or package.rsplit("/", 1)[-1])
    per_caption: Counter = Counter()
    items = []
    for name in sorted(data["icons"]):
        icon = data["icons"][name]
        if name in skip or icon.get("hidden"):
            continue
        cap = icon_caption(name)
        if cap is None or per_caption[cap] >= ICONS_PER_CONCEPT:
            continue
        per_caption[cap] += 1
        cat = category_of.get(name, "")
        items.append({"set": prefix, "icon": name, "name": cap,
                      "keywords": [cat.split(" / ")[0].lower()] if cat else [],
                      "body": icon["body"], "width": icon.get("width", data.get("width", 16)),
                      "height": icon.get("height", data.get("height", 16))})
    return items


def _icon_job(job: tuple[bytes, str]) -> str | None:
    from gramvl.data.world.render import fit_square, rasterize_svg, time_limit

    svg, dst = job
    try:
        with time_limit(SVG_TIMEOUT_S):
            art = fit_square(rasterize_svg(svg, 128), 64, 2)
        if art.getbbox() is None:
            return None
        on_white(art).save(dst)
        return dst
    except Exception:  # unrenderable or empty: skipped
        return None


def build_icons(tree: SourceTree, out: Path, packages: Iterable[str], processes: int = 2,
                progress: bool = True) -> dict:
    """world/icons: named pictograms, 64x64 black on white, with pairs.jsonl (name, concept, keywords)."""
    items = [it for pkg in packages for it in iconify_items(tree, pkg)]
    (out / "images").mkdir(parents=True, exist_ok=True)
    jobs = []
    for it in items:
        it["image"] = f"icons/images/{it['set']}/{it['icon']}.png"
        (out / "images" / it["set"]).mkdir(exist_ok=True)
        jobs.append((icon_svg(it["body"], it["width"], it["height"]),
                     str(out / "images" / it["set"] / f"{it['icon']}.png")))
    done = set(run_jobs(_icon_job, jobs, processes, progress, "world: icon images", chunksize=64))
    rows = [{"image": it["image"], "style": it["set"], "icon": it["icon"], "name": it["name"],
             "concept": f"icon:{it['name']}", "keywords": it["keywords"]}
            for it, job in zip(items, jobs, strict=True) if job[1] in done]
    if not rows:
        raise GramvlError(f"no icons could be rendered from {tree.root}")
    _write_jsonl(out / "pairs.jsonl", rows)
    return {"pairs": len(rows), "concepts": len({r["concept"] for r in rows}),
            "by_set": dict(Counter(r["style"] for r in rows)), "failed_renders": len(items) - len(rows)}


# ---------------------------------------------------------------- meta-training corpus (openclipart + tuxpaint)

_DC_TITLE = re.compile(r"<dc:title>(.*?)</dc:title>", re.S)
_SVG_TITLE = re.compile(r"<title[^>]*>(.*?)</title>", re.S)
_DC_CREATOR = re.compile(r"<dc:creator>.*?<dc:title>(.*?)</dc:title>", re.S)
_TAGS = re.compile(r"<[^>]+>")


def _svg_title(text: str) -> tuple[str, str]:
    m = _DC_TITLE.search(text) or _SVG_TITLE.search(text)
    c = _DC_CREATOR.search(text)
    title = _TAGS.sub(" ", m.group(1)).strip() if m else ""
    return title, (_TAGS.sub(" ", c.group(1)).strip() if c else "")


def openclipart_items(root: Path, max_bytes: int = SVG_MAX_BYTES) -> list[dict]:
    """Captioned openclipart SVGs: title (unless shared by >= 4 files: a collection name), else the file name."""
    recs, seen = [], set()
    for p in sorted(root.rglob("*.svg")):
        if p.is_symlink() or not p.is_file() or p.stat().st_size > max_bytes:
            continue
        data = p.read_bytes()
        digest = hashlib.sha1(data).hexdigest()
        if digest in seen:  # the package holds some files twice
            continue
        seen.add(digest)
        title, creator = _svg_title(data.decode("utf-8", errors="replace"))
        recs.append((p, title, creator))
    title_count = Counter(t.lower() for _, t, _ in recs if t)
    items = []
    for p, title, creator in recs:
        cap = clean_title(title) if title and title_count[title.lower()] < 4 else None
        if cap is None:
            cap = clean_filename(p.stem, creator)
        if cap is None:
            continue
        category = p.parent.relative_to(root).as_posix()
        if category.startswith("recreation/games/cards"):
            cap = "a playing card"
        elif category.startswith("signs_and_symbols/flags") and "flag" not in cap:
            cap = "the flag of " + re.sub(r"^(a|an) ", "", cap)
        items.append({"src": str(p), "caption": cap, "source": "openclipart", "category": category})
    return items


def _first_line(path: Path) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.readline().strip()


def tuxpaint_items(root: Path) -> list[dict]:
    """Tux Paint stamps (PNG preferred over SVG) with the English line of their .txt description."""
    items = []
    for txt in sorted(root.rglob("*.txt")):
        img = next((txt.with_suffix(s) for s in (".png", ".svg") if txt.with_suffix(s).is_file()), None)
        if img is None:
            continue
        line = _first_line(txt)
        if ".utf8=" in line or "=" in line:
            continue
        cap = clean_sentence(line)
        if cap:
            items.append({"src": str(img), "caption": cap, "source": "tuxpaint",
                          "category": txt.parent.relative_to(root).as_posix()})
    return items


def _meta_job(job: tuple[str, str, float]) -> str | None:
    src, dst, timeout = job
    try:
        art = load_art(src, 64, timeout=timeout, margin=2)
        on_white(art).save(dst)
        return dst
    except Exception:  # unrenderable, too slow, empty: skipped
        return None


_SVG_TEXT = re.compile(rb"<(?:[A-Za-z_][\w.-]*:)?text[\s/>]")


def _has_svg_text(path: str) -> bool:
    """Whether a file is an SVG with a text element (cairo's text output depends on process state)."""
    return path.lower().endswith(".svg") and _SVG_TEXT.search(Path(path).read_bytes()) is not None


def meta_candidates(tree: SourceTree) -> tuple[int, list[dict]]:
    """(number of captioned files, the meta corpus's candidate pairs in build order: at most
    META_MAX_PER_CAPTION per caption)."""
    items = tuxpaint_items(tree.tuxpaint_dir) + openclipart_items(tree.openclipart_dir)
    per_caption: Counter = Counter()
    kept = []
    for it in items:
        if per_caption[it["caption"]] >= META_MAX_PER_CAPTION:
            continue
        per_caption[it["caption"]] += 1
        kept.append(it)
    return len(items), kept


def read_meta_skip(path: Path = META_SKIP_FILE) -> set[str]:
    """Source files (relative to the source tree) that the meta build skips without rendering."""
    if not path.is_file():
        raise GramvlError(f"the pinned list of skipped clip art is missing: {path} (reinstall gramvl)")
    return {ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip() and not ln.startswith("#")}


def build_meta(tree: SourceTree, out: Path, processes: int = 2, progress: bool = True,
               max_pairs: int = META_MAX_PAIRS, timeout: float = META_RENDER_TIMEOUT_S,
               skip: set[str] | None = None) -> dict:
    """world/meta: clip art and stamps, 64x64 RGB on white, with cleaned captions in pairs.jsonl.

    Files in `skip` (default: the pinned META_SKIP_FILE; paths relative to the source tree) are not rendered;
    any other file that fails is skipped too but counted and named in the returned counts."""
    total, kept = meta_candidates(tree)
    kept = kept[:max_pairs]
    skip = read_meta_skip() if skip is None else skip
    (out / "images").mkdir(parents=True, exist_ok=True)
    prefix = {"openclipart": "oc", "tuxpaint": "tp"}
    for i, it in enumerate(kept):
        it["image"] = f"meta/images/{prefix[it['source']]}{i:05d}.png"
    rel = [Path(it["src"]).relative_to(tree.root).as_posix() for it in kept]
    dst = [str(out / "images" / Path(it["image"]).name) for it in kept]
    jobs = [(it["src"], d, timeout) for it, r, d in zip(kept, rel, dst, strict=True) if r not in skip]
    pinned = len(kept) - len(jobs)
    # cairo renders SVG text differently depending on the fonts that earlier renders in the same process
    # loaded, so the clip art with text is drawn in fresh processes (the rest in long-lived workers)
    has_text = [_has_svg_text(j[0]) for j in jobs]
    text = [j for j, t in zip(jobs, has_text, strict=True) if t]
    plain = [j for j, t in zip(jobs, has_text, strict=True) if not t]
    done = set(run_jobs(_meta_job, plain, processes, progress, "world: meta images", chunksize=16))
    import cairosvg  # noqa: F401  (imported, not used, here: the fresh processes then need not import it)

    done |= set(run_jobs(_meta_job, text, processes, progress, "world: meta images with text", fresh=True))
    rows, unexpected = [], []
    for it, r, d in zip(kept, rel, dst, strict=True):
        if d in done:
            rows.append({"image": it["image"], "caption": it["caption"], "source": it["source"],
                         "category": it["category"]})
        elif r not in skip:
            unexpected.append(r)
    if not rows:
        raise GramvlError(f"no meta-training pairs could be made from {tree.root}")
    if unexpected:
        log(f"world: warning: {len(unexpected)} clip-art file(s) outside the pinned skip list failed to render "
            f"(e.g. {unexpected[0]}); the meta corpus differs from the reference build")
    _write_jsonl(out / "pairs.jsonl", rows)
    return {"pairs": len(rows), "by_source": dict(Counter(r["source"] for r in rows)),
            "candidates": total, "skipped_pinned": pinned, "unexpected_failures": len(unexpected),
            "unexpected_failed_files": unexpected[:50]}


# ---------------------------------------------------------------- downstream datasets

def read_openmoji(tree: SourceTree) -> list[dict]:
    """Rows of openmoji.csv."""
    if not tree.openmoji_csv.is_file():
        raise GramvlError(f"source file missing: {tree.openmoji_csv}")
    with open(tree.openmoji_csv, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def datasource_hexcodes(tree: SourceTree) -> set[str]:
    """Every unified / non-qualified code point sequence of emoji-datasource (upper case)."""
    codes: set[str] = set()
    for style in PRETRAIN_STYLES:
        path = tree.emoji_json(style)
        if not path.is_file():
            continue
        for e in _read_json(path):
            for k in ("unified", "non_qualified"):
                if e.get(k):
                    codes.add(e[k].upper())
    return codes


def emoji_classes(tree: SourceTree, datasets: dict | None = None) -> dict[str, list[tuple[str, str]]]:
    """Dataset name -> sorted [(class name, hexcode)]: base OpenMoji emoji also in emoji-datasource,
    named by their CLDR annotation, first occurrence kept when two normalize to one name."""
    datasets = EMOJI_DATASETS if datasets is None else datasets
    rows = read_openmoji(tree)
    codes = datasource_hexcodes(tree)
    color, black = tree.openmoji_svg_dir("color"), tree.openmoji_svg_dir("black")
    out = {}
    for name, (_, pred) in datasets.items():
        classes: dict[str, str] = {}
        for r in rows:
            g, sg, hexcode = r.get("group", ""), r.get("subgroups", ""), r.get("hexcode", "")
            if r.get("skintone") or g.startswith("extras") or hexcode.upper() not in codes or not pred(g, sg):
                continue
            cname = normalize_classname(r.get("annotation", ""))
            if not cname or cname in classes:
                continue
            if not (color / f"{hexcode}.svg").is_file() or not (black / f"{hexcode}.svg").is_file():
                continue
            classes[cname] = hexcode
        out[name] = sorted(classes.items(), key=lambda kv: kv[0].replace(" ", "_"))
    return out


def _emoji_job(job: dict) -> tuple[str, str, int, str]:
    try:
        art = load_art(job["svg"], timeout=30.0)
    except Exception as e:
        return job["dataset"], job["classname"], 0, f"{job['svg']}: {type(e).__name__}: {e}"
    n = 0
    for split, count in job["counts"].items():
        d = Path(job["root"]) / split / job["classname"].replace(" ", "_")
        d.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            seed = instance_seed(job["seed_name"], split, job["classname"], i)
            render_instance(art, seed, light_only=job["light_only"]).save(d / f"{i:04d}.png")
            n += 1
    return job["dataset"], job["classname"], n, ""


def _split_text(counts: dict[str, int]) -> str:
    return (f"{counts['train']} train / {counts['val']} val / {counts['test']} test random renderings per class of "
            "the class's single artwork (rasterized once at 96 px), each with its own seed "
            "sha256(dataset|split|class|index) whose top bits hold the split id, so train, val and test "
            "seeds are disjoint; random scale 0.55-1.0, position, rotation +-25 deg, background (white, solid, "
            "two-colour gradient), occluding rectangle up to 15% area (p=0.5), Gaussian noise sigma 0-6.")


def build_emoji_datasets(tree: SourceTree, out: Path, processes: int = 2, progress: bool = True,
                         counts: dict[str, int] | None = None, datasets: dict | None = None,
                         min_classes: int = 2) -> dict:
    """OpenMoji colour datasets and their black line-art twins in `out/<name>/` (folder layout + info.json)."""
    counts = dict(SPLIT_COUNTS if counts is None else counts)
    defs = EMOJI_DATASETS if datasets is None else datasets
    classes = emoji_classes(tree, defs)
    jobs, infos = [], {}
    for base, cls in classes.items():
        if len(cls) < min_classes:
            log(f"world: skipping {base}: only {len(cls)} classes")
            continue
        for variant, suffix, domain, light in (("color", "", "emoji", False), ("black", "-lineart", "lineart", True)):
            name = base + suffix
            infos[name] = {
                "name": name,
                "description": f"OpenMoji {'colour emoji' if variant == 'color' else 'black line-art emoji'}: "
                               f"{defs[base][0]}; class = CLDR annotation",
                "domain": domain, "style": f"openmoji-{variant}",
                "classes": [c for c, _ in cls],
                "hexcodes": [h for _, h in cls],
                "counts": {s: n * len(cls) for s, n in counts.items()},
                "splits": _split_text(counts) + (" Same seeds as the colour twin " + base
                                                 + " (identical geometry and occluders), backgrounds light only."
                                                 if light else ""),
            }
            for cname, hexcode in cls:
                jobs.append({"dataset": name, "seed_name": base, "classname": cname, "counts": counts,
                             "svg": str(tree.openmoji_svg_dir(variant) / f"{hexcode}.svg"),
                             "root": str(out / name), "light_only": light})
    results = run_jobs(_emoji_job, jobs, processes, progress, "world: emoji datasets")
    errors = [r[3] for r in results if r[3]]
    if errors:
        raise GramvlError(f"{len(errors)} OpenMoji artworks could not be rendered, e.g. {errors[0]}")
    for name, info in infos.items():
        write_json(out / name / "info.json", info)
    return {n: {"classes": len(i["classes"]), **i["counts"]} for n, i in infos.items()}


def read_idx(path: Path) -> np.ndarray:
    """An idx(.gz) file (MNIST format) as a uint8 array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 8:
        raise GramvlError(f"{path} is not an unsigned-byte idx file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise GramvlError(f"{path} is truncated")
    return arr.reshape(shape)


def _png_job(job: tuple[np.ndarray, list[str]]) -> int:
    images, paths = job
    for im, p in zip(images, paths, strict=True):
        Image.fromarray(im, "L").save(p)
    return len(paths)


def build_fashion_mnist(tree: SourceTree, out: Path, processes: int = 2, progress: bool = True) -> dict:
    """fashion-mnist: published test split; val = fixed seeded 5,000 of the published train; train = the rest."""
    d = tree.fashion_mnist_dir
    x_tr, y_tr = read_idx(d / "train-images-idx3-ubyte.gz"), read_idx(d / "train-labels-idx1-ubyte.gz")
    x_te, y_te = read_idx(d / "t10k-images-idx3-ubyte.gz"), read_idx(d / "t10k-labels-idx1-ubyte.gz")
    val_idx = np.sort(np.random.default_rng(FASHION_VAL_SEED).permutation(len(x_tr))[:FASHION_VAL_SIZE])
    is_val = np.zeros(len(x_tr), dtype=bool)
    is_val[val_idx] = True
    splits = {"train": (x_tr[~is_val], y_tr[~is_val]), "val": (x_tr[is_val], y_tr[is_val]), "test": (x_te, y_te)}
    folders = [c.replace(" ", "_") for c in FASHION_CLASSES]
    jobs, counts = [], {}
    for split, (x, y) in splits.items():
        counts[split] = int(len(y))
        paths = []
        seen = Counter()
        for lab in y:
            folder = folders[int(lab)]
            paths.append(str(out / split / folder / f"{seen[folder]:04d}.png"))
            seen[folder] += 1
        for f in folders:
            (out / split / f).mkdir(parents=True, exist_ok=True)
        for s in range(0, len(y), 2000):
            jobs.append((x[s:s + 2000], paths[s:s + 2000]))
    run_jobs(_png_job, jobs, processes, progress, "world: fashion-mnist")
    order = sorted(folders)
    info = {"name": "fashion-mnist",
            "description": "Fashion-MNIST (Zalando): 28x28 greyscale photos of clothing, light item on dark "
                           "background, as published",
            "domain": "photo", "style": "greyscale-photo",
            "classes": [f.replace("_", " ") for f in order],
            "published_labels": {FASHION_CLASSES[i]: f"{i} ({FASHION_PUBLISHED[i]})" for i in range(10)},
            "counts": counts,
            "splits": f"test = the published 10,000-image test set; val = the {FASHION_VAL_SIZE} published-train "
                      f"images at positions numpy.random.default_rng({FASHION_VAL_SEED}).permutation(60000)"
                      f"[:{FASHION_VAL_SIZE}]; train = the other 55,000. Files are numbered per class in "
                      "published order."}
    write_json(out / "info.json", info)
    return {"classes": 10, **counts}


def build_datasets(tree: SourceTree, out: Path, processes: int = 2, progress: bool = True) -> dict:
    """world/datasets: the OpenMoji colour and line-art datasets and fashion-mnist."""
    out.mkdir(parents=True, exist_ok=True)
    counts = build_emoji_datasets(tree, out, processes, progress)
    counts["fashion-mnist"] = build_fashion_mnist(tree, out / "fashion-mnist", processes, progress)
    return counts


def swap_in(tmp: Path, final: Path) -> None:
    """Replace `final` by the finished folder `tmp` (renames; the old one is removed afterwards)."""
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
