"""Large image-text corpora: WebDataset tar shards in, memory-mapped feature shards out.

Input (the layout CC3M / LAION subsets ship in, e.g. from img2dataset): tar files holding, per pair,
`<key>.jpg|jpeg|png|webp` and `<key>.txt` (the caption; `<key>.json` with a "caption" field is the
fallback). Shards are streamed through the `webdataset` package (optional extra `gramvl[scale]`): no shard
is ever extracted to disk. A `--corpus` value may be a directory of .tar files, a brace pattern
(`shards/{000000..000009}.tar`), a glob, or one .tar. Pairs with a corrupt image or no caption are skipped
and counted (a warning per shard; stored in the manifest); a corpus with no valid pair is an error.

Output (`extract_shard_features`): one feature shard per input shard, `shard-NNNNNN.zI.npy`,
`shard-NNNNNN.zT.npy` (L2-normalized, float16 by default) and `shard-NNNNNN.json` (captions, member names,
skip counts), each written atomically and the JSON last; `manifest.json` lists the finished shards and is
rewritten after each one. An interrupted extraction resumes at the first unfinished shard.
`load_feature_shards` opens such a folder memory-mapped as a `CorpusFeatures` whose arrays are
`ShardedArray`s (row access across shards without concatenating them).
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import re
import tarfile
import tempfile
import threading
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from gramvl.errors import GramvlError
from gramvl.gram.corpus import CorpusFeatures
from gramvl.io import write_json
from gramvl.paths import cache_dir, cache_fill_map, cache_fill_tag

if TYPE_CHECKING:
    from gramvl.backbone import Backbone

SHARDS_FORMAT = "gramvl.corpus-shards/1"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
DTYPES = ("float16", "float32")
INSTALL_HINT = "pip install 'gramvl[scale]' (or: pip install webdataset)"


# ======================================================================================= shard lists
def _is_tar(name: str) -> bool:
    return name.lower().endswith(TAR_SUFFIXES)


def is_shard_spec(spec: str) -> bool:
    """Whether a --corpus value names tar shards: a .tar file, a folder of them, a brace pattern or a glob."""
    if _is_tar(spec) or re.search(r"\{[^}]*(\.\.|,)[^}]*\}", spec) or any(c in spec for c in "*?["):
        return True
    p = Path(spec)
    return p.is_dir() and not (p / "manifest.json").is_file() and any(_is_tar(q.name) for q in p.iterdir())


def is_feature_folder(spec: str) -> bool:
    """Whether `spec` is a folder of extracted feature shards (has a gramvl manifest.json)."""
    return (Path(spec) / "manifest.json").is_file()


def expand_shards(spec: str) -> list[str]:
    """The tar files a shard spec names, in order (brace ranges and lists keep their order; a folder or a
    glob is sorted by name). Every file must exist."""
    p = Path(spec)
    if p.is_dir():
        out = sorted(str(q) for q in p.iterdir() if q.is_file() and _is_tar(q.name))
        if not out:
            raise GramvlError(f"no .tar shards in {p}")
        return out
    names = [spec]
    if re.search(r"\{[^}]*(\.\.|,)[^}]*\}", spec):
        try:
            from braceexpand import braceexpand
        except ImportError as e:
            raise GramvlError(f"brace patterns in --corpus need the `braceexpand` package: {INSTALL_HINT}") from e
        names = list(braceexpand(spec))
    out = []
    for n in names:
        if any(c in n for c in "*?["):
            hits = sorted(glob.glob(n))
            if not hits:
                raise GramvlError(f"no shard matches {n}")
            out += hits
        else:
            out.append(n)
    missing = [n for n in out if not Path(n).is_file()]
    if missing:
        raise GramvlError(f"{len(missing)} of {len(out)} shards not found, e.g. {missing[0]}")
    bad = [n for n in out if not _is_tar(n)]
    if bad:
        raise GramvlError(f"not a tar shard (.tar, .tar.gz, .tgz): {bad[0]}")
    return out


# ======================================================================================= streaming
@dataclass
class ShardStats:
    """What reading one shard found: usable pairs and skipped ones by reason."""

    pairs: int = 0
    corrupt_image: int = 0
    missing_caption: int = 0
    missing_image: int = 0
    read_errors: int = 0
    errors: list[str] = field(default_factory=list)  # the first few messages

    @property
    def skipped(self) -> int:
        return self.corrupt_image + self.missing_caption + self.missing_image

    def counts(self) -> dict[str, int]:
        return {k: v for k, v in asdict(self).items() if k != "errors"}

    def note(self, kind: str, msg: str) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        if len(self.errors) < 5:
            self.errors.append(msg[:300])


def _webdataset():
    try:
        from webdataset import tariterators
    except ImportError as e:
        raise GramvlError(f"reading WebDataset tar shards needs the optional `webdataset` package: "
                          f"{INSTALL_HINT}") from e
    return tariterators


def _caption(sample: dict) -> str:
    txt = sample.get("txt")
    if txt is not None:
        return txt.decode("utf-8", errors="replace").strip()
    if sample.get("json") is not None:
        try:
            meta = json.loads(sample["json"])
        except ValueError:
            return ""
        cap = meta.get("caption") if isinstance(meta, dict) else None
        return cap.strip() if isinstance(cap, str) else ""
    return ""


def iter_shard(path: str, stats: ShardStats | None = None) -> Iterator[tuple[str, object, str, str]]:
    """Stream the valid pairs of one tar shard: (key, RGB PIL image, caption, image member name).

    Corrupt images, missing captions or images, and unreadable tar members are counted in `stats`."""
    from PIL import Image

    tw = _webdataset()
    stats = stats if stats is not None else ShardStats()

    def handler(exn: Exception) -> bool:
        stats.note("read_errors", f"{path}: {exn!r}")
        return True  # skip what cannot be read, keep streaming

    files = tw.tar_file_expander(tw.url_opener([{"url": str(path)}], handler=handler), handler=handler)
    for sample in tw.group_by_keys(files, handler=handler):
        key = sample["__key__"]
        ext = next((e for e in IMAGE_EXTS if sample.get(e) is not None), None)
        if ext is None:
            stats.note("missing_image", f"{path}: {key} has no image ({', '.join(IMAGE_EXTS)})")
            continue
        caption = _caption(sample)
        if not caption:
            stats.note("missing_caption", f"{path}: {key} has no caption (.txt or json 'caption')")
            continue
        try:
            with Image.open(io.BytesIO(sample[ext])) as im:
                im.load()
                img = im.convert("RGB")
        except Exception as e:  # PIL raises many types for bad bytes
            stats.note("corrupt_image", f"{path}: {key}.{ext} is corrupt ({e})")
            continue
        stats.pairs += 1
        yield key, img, caption, f"{key}.{ext}"


# ======================================================================================= sharded arrays
class ShardedArray:
    """Read-only row access to several [n_i, D] arrays (memmaps) as one [sum n_i, D] array."""

    def __init__(self, parts: Sequence[np.ndarray]):
        if not parts:
            raise GramvlError("a sharded array needs at least one shard")
        dims = {p.shape[1:] for p in parts}
        if len(dims) != 1 or any(p.ndim != 2 for p in parts):
            raise GramvlError(f"feature shards disagree in shape: {sorted(dims)}")
        self.parts = list(parts)
        self.offsets = np.concatenate([[0], np.cumsum([p.shape[0] for p in parts])]).astype(np.int64)
        self.shape = (int(self.offsets[-1]), int(parts[0].shape[1]))
        self.dtype = parts[0].dtype
        self.ndim = 2

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = np.concatenate([np.asarray(p) for p in self.parts])
        return out.astype(dtype, copy=False) if dtype is not None else out

    def __getitem__(self, key) -> np.ndarray:
        n = self.shape[0]
        if isinstance(key, (int, np.integer)):
            i = int(key) + (n if key < 0 else 0)
            if not 0 <= i < n:
                raise IndexError(f"row {key} out of range for {n} rows")
            s = int(np.searchsorted(self.offsets, i, side="right")) - 1
            return np.asarray(self.parts[s][i - self.offsets[s]])
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step != 1:
                return self[np.arange(start, stop, step)]
            out = []
            for s, p in enumerate(self.parts):
                a, b = max(start, self.offsets[s]), min(stop, self.offsets[s + 1])
                if a < b:
                    out.append(np.asarray(p[a - self.offsets[s]:b - self.offsets[s]]))
            return np.concatenate(out) if out else np.zeros((0, self.shape[1]), dtype=self.dtype)
        if isinstance(key, tuple):
            raise TypeError("ShardedArray takes row indices only (use arr[rows][:, cols])")
        idx = np.asarray(key)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        idx = idx.astype(np.int64, copy=False).reshape(-1)
        idx = np.where(idx < 0, idx + n, idx)
        if len(idx) and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"row index out of range for {n} rows")
        out = np.empty((len(idx), self.shape[1]), dtype=self.dtype)
        shard = np.searchsorted(self.offsets, idx, side="right") - 1
        for s in np.unique(shard):
            pos = np.flatnonzero(shard == s)
            local = idx[pos] - self.offsets[s]
            out[pos] = self.parts[s][local]
        return out


# ======================================================================================= feature shards
def _atomic_save_npy(path: Path, arr: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.lib.format.write_array(f, np.ascontiguousarray(arr), allow_pickle=False)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _normalized(x: np.ndarray, dtype: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(dtype)


class FeatureShardWriter:
    """Writes feature shards and the manifest of one corpus folder; knows which shards are finished."""

    def __init__(self, folder: str | Path, ident: str, dim: int, dtype: str = "float16", key: str = "",
                 sources: Sequence[str] = (), fill: str = ""):
        if dtype not in DTYPES:
            raise GramvlError(f"feature dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.ident, self.dim, self.dtype, self.key = ident, int(dim), dtype, key
        self.sources = [str(s) for s in sources]
        self.fill = fill  # how the features were encoded (`cache_fill_tag`); a shard of another fill is redone

    @staticmethod
    def stem(i: int) -> str:
        return f"shard-{i:06d}"

    def done(self, i: int, source: str = "", source_size: int | None = None) -> dict | None:
        """The shard's record if shard i is finished (and was made from this source file), else None."""
        meta_path = self.folder / f"{self.stem(i)}.json"
        if not meta_path.is_file():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            shapes = [np.load(self.folder / f"{self.stem(i)}.{z}.npy", mmap_mode="r").shape for z in ("zI", "zT")]
        except (OSError, ValueError):
            return None
        ok = (meta.get("format") == SHARDS_FORMAT and meta.get("source", "") == source
              and meta.get("fill", "") == self.fill
              and (source_size is None or meta.get("source_size") == source_size)
              and all(s == (meta["n"], self.dim) for s in shapes))
        return meta if ok else None

    def write(self, i: int, zI: np.ndarray, zT: np.ndarray, captions: Sequence[str],
              paths: Sequence[str] = (), source: str = "", source_size: int | None = None,
              skipped: dict | None = None) -> dict:
        """Write shard i (features L2-normalized and cast here; .npy files first, the JSON record last)."""
        n = len(captions)
        if zI.shape != (n, self.dim) or zT.shape != (n, self.dim):
            raise GramvlError(f"shard {i}: features {zI.shape}/{zT.shape} do not match {n} captions x {self.dim}")
        for name, z in (("zI", zI), ("zT", zT)):
            _atomic_save_npy(self.folder / f"{self.stem(i)}.{name}.npy", _normalized(z, self.dtype))
        meta = {"format": SHARDS_FORMAT, "n": n, "source": source, "source_size": source_size, "fill": self.fill,
                "skipped": skipped or {}, "captions": list(captions), "paths": list(paths)}
        write_json(self.folder / f"{self.stem(i)}.json", meta)
        return meta

    def manifest(self, shards: list[dict], complete: bool) -> None:
        skipped: dict[str, int] = {}
        for s in shards:
            for k, v in (s.get("skipped") or {}).items():
                skipped[k] = skipped.get(k, 0) + int(v)
        write_json(self.folder / "manifest.json",
                   {"format": SHARDS_FORMAT, "ident": self.ident, "key": self.key, "fill": self.fill,
                    "dim": self.dim, "dtype": self.dtype, "complete": complete, "n": int(sum(s["n"] for s in shards)),
                    "sources": self.sources, "skipped": skipped,
                    "shards": [{"file": s["file"], "n": s["n"], "source": s.get("source", "")} for s in shards]})


def load_feature_shards(folder: str | Path, mmap: bool = True) -> CorpusFeatures:
    """Open a folder of feature shards as CorpusFeatures (rows memory-mapped across shards)."""
    folder = Path(folder)
    try:
        man = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError) as e:
        raise GramvlError(f"no readable feature manifest in {folder} ({e})") from e
    if man.get("format") != SHARDS_FORMAT:
        raise GramvlError(f"{folder}/manifest.json is not a gramvl feature-shard manifest")
    if not man.get("complete"):
        raise GramvlError(f"feature extraction into {folder} is unfinished ({len(man.get('shards', []))} of "
                          f"{len(man.get('sources', [])) or '?'} shards); re-run the same command to resume")
    zI, zT, captions, paths = [], [], [], []
    mode = "r" if mmap else None
    for s in man["shards"]:
        try:
            meta = json.loads((folder / f"{s['file']}.json").read_text())
            a = np.load(folder / f"{s['file']}.zI.npy", mmap_mode=mode)
            b = np.load(folder / f"{s['file']}.zT.npy", mmap_mode=mode)
        except (OSError, ValueError) as e:
            raise GramvlError(f"feature shard {s['file']} in {folder} is unreadable ({e}); delete it and "
                              "re-run the extraction (it resumes)") from e
        if a.shape != (meta["n"], man["dim"]) or b.shape != a.shape:
            raise GramvlError(f"feature shard {s['file']} in {folder} has shape {a.shape}, expected "
                              f"({meta['n']}, {man['dim']}); delete it and re-run the extraction")
        if not meta["n"]:
            continue
        zI.append(a)
        zT.append(b)
        captions += meta["captions"]
        paths += meta.get("paths") or [""] * meta["n"]
    if not zI:
        raise GramvlError(f"the feature shards in {folder} hold no pairs")
    if not any(paths):
        paths = []
    return CorpusFeatures(ShardedArray(zI), ShardedArray(zT), captions, paths, man.get("ident", ""),
                          man.get("key", ""))


def shard_corpus_key(ident: str, shards: Sequence[str], dtype: str, fill: str) -> str:
    """Cache key of a shard corpus: backbone ident, dtype, how it is encoded (`cache_fill_tag`), and each shard's
    absolute path and size."""
    h = hashlib.sha256(f"{SHARDS_FORMAT}\n{ident}\n{dtype}\n{fill}\n".encode())
    for s in shards:
        h.update(f"{os.path.abspath(s)}\t{os.path.getsize(s)}\n".encode())
    return h.hexdigest()[:24]


class _ShardStream(torch.utils.data.IterableDataset):
    """Yields ("batch", shard, images, captions, members) and ("end", shard, stats) per assigned shard."""

    def __init__(self, shards: list[tuple[int, str]], transform, batch_size: int):
        self.shards, self.transform, self.batch_size = shards, transform, batch_size

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        mine = self.shards if info is None else self.shards[info.id::info.num_workers]
        for i, path in mine:
            stats = ShardStats()
            imgs, caps, members = [], [], []
            for _, img, cap, member in iter_shard(path, stats):
                imgs.append(self.transform(img))
                caps.append(cap)
                members.append(member)
                if len(imgs) == self.batch_size:
                    yield "batch", i, torch.stack(imgs), caps, members
                    imgs, caps, members = [], [], []
            if imgs:
                yield "batch", i, torch.stack(imgs), caps, members
            yield "end", i, asdict(stats)


@torch.no_grad()
def extract_shard_features(bb: Backbone, spec: str, out: str | Path | None = None, dtype: str = "float16",
                           batch_size: int = 128, workers: int = 2, progress: bool = True) -> CorpusFeatures:
    """Encode every valid pair of the shards with the frozen backbone into feature shards; resumable.

    `out` defaults to `cache_dir('corpus')/<key>` (key: backbone, dtype, shard paths and sizes)."""
    from tqdm import tqdm

    sources = expand_shards(spec)
    _webdataset()  # fail early, before any work, when the package is missing
    fill = cache_fill_tag(bb.device)
    key = shard_corpus_key(bb.ident, sources, dtype, fill)
    folder = Path(out) if out is not None else cache_dir("corpus") / key
    man_path = folder / "manifest.json"
    if man_path.is_file():
        try:
            man = json.loads(man_path.read_text())
        except ValueError:
            man = {}
        if man.get("complete") and man.get("key") == key:
            return load_feature_shards(folder)
        if man.get("key") not in (None, key):
            raise GramvlError(f"{folder} holds features of another corpus, backbone or encoding (key "
                              f"{man.get('key')}, fill {man.get('fill', 'not recorded')!r}; expected {key}, fill "
                              f"{fill!r}); choose another output folder")
    writer = FeatureShardWriter(folder, bb.ident, bb.embed_dim, dtype, key, sources, fill)
    sizes = [os.path.getsize(s) for s in sources]
    records: dict[int, dict] = {}
    for i, s in enumerate(sources):
        rec = writer.done(i, os.path.abspath(s), sizes[i])
        if rec is not None:
            records[i] = {"file": writer.stem(i), "n": rec["n"], "source": rec["source"],
                          "skipped": rec["skipped"]}
    todo = [(i, s) for i, s in enumerate(sources) if i not in records]
    if progress and records and todo:
        print(f"resuming feature extraction at shard {todo[0][0]} ({len(records)} of {len(sources)} done)")

    def manifest(complete: bool) -> None:
        writer.manifest([records[i] for i in sorted(records)], complete)

    manifest(False)
    bb.eval()
    if todo:
        stream = _ShardStream(todo, bb.transform(False), batch_size)
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=min(workers, len(todo)))
        buf: dict[int, tuple[list, list, list, list]] = {}
        bar = tqdm(total=len(sources), initial=len(records), desc="extract shards", unit="shard",
                   disable=not progress, mininterval=2)

        def encode(item):
            if item[0] != "batch":
                return item
            _, i, x, caps, members = item
            return ("batch", i, bb.encode_image_rows(x.to(bb.device)).float().cpu().numpy(),
                    bb.encode_texts(list(caps)).float().cpu().numpy(), caps, members)

        for item in cache_fill_map(encode, loader, bb.device):  # in order; the same bytes at any thread count
            if item[0] == "batch":
                _, i, zi_, zt_, caps, members = item
                zi, zt, c, m = buf.setdefault(i, ([], [], [], []))
                zi.append(zi_)
                zt.append(zt_)
                c += caps
                m += members
                continue
            _, i, stats = item
            zi, zt, c, m = buf.pop(i, ([], [], [], []))
            d = bb.embed_dim
            src = os.path.abspath(sources[i])
            skipped = {k: v for k, v in stats.items() if k not in ("pairs", "errors") and v}
            writer.write(i, np.concatenate(zi) if zi else np.zeros((0, d)), np.concatenate(zt) if zt else
                         np.zeros((0, d)), c, [f"{src}#{name}" for name in m], src, sizes[i], skipped)
            records[i] = {"file": writer.stem(i), "n": len(c), "source": src, "skipped": skipped}
            manifest(False)
            bar.update(1)
            if skipped:
                warnings.warn(f"{sources[i]}: skipped {sum(skipped.values())} pairs ("
                              + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in skipped.items())
                              + (f"; e.g. {stats['errors'][0]}" if stats.get("errors") else "") + ")",
                              stacklevel=2)
        bar.close()
    total = sum(r["n"] for r in records.values())
    if total == 0:
        skipped = sum(sum(r["skipped"].values()) for r in records.values())
        raise GramvlError(f"no valid image-caption pair in {len(sources)} shard(s) of {spec} ({skipped} skipped: "
                          "corrupt images, missing captions or images); check the shard layout "
                          "(<key>.jpg|png|jpeg|webp + <key>.txt)")
    manifest(True)
    return load_feature_shards(folder)


# ======================================================================================= images by path
class ShardImages:
    """Random access to images stored in tar shards by `<shard path>#<member>` (visual-prompt hosts)."""

    def __init__(self):
        self._open: dict[str, tarfile.TarFile] = {}
        self._lock = threading.Lock()  # meta-tasks may run in threads; an open tar file is read one at a time

    def load(self, ref: str):
        from PIL import Image

        source, _, member = ref.rpartition("#")
        if not source:
            raise GramvlError(f"not a shard image reference (<shard>#<member>): {ref}")
        with self._lock:
            tf = self._open.get(source)
            if tf is None:
                try:
                    tf = self._open[source] = tarfile.open(source, "r:*")
                except (OSError, tarfile.TarError) as e:
                    raise GramvlError(f"cannot open shard {source} ({e})") from e
        try:
            with self._lock:
                f = tf.extractfile(member)
                if f is None:
                    raise KeyError(member)
                raw = f.read()
            with Image.open(io.BytesIO(raw)) as im:
                im.load()
                return im.convert("RGB")
        except KeyError as e:
            raise GramvlError(f"{member} not found in shard {source}") from e
        except Exception as e:
            raise GramvlError(f"corrupt or unreadable image {ref} ({e})") from e


def shard_batches(feats: CorpusFeatures, bb: Backbone, need_images: bool):
    """CorpusBatches for a shard corpus: cached features, or images read from the tar shards by reference."""
    from gramvl.gram.meta import CorpusBatches

    class _ShardCorpusBatches(CorpusBatches):
        def _image(self, i: int) -> torch.Tensor:
            if i not in self._images:
                if not self.paths:
                    raise GramvlError("visual-prompt hosts need the corpus images, and these features were "
                                      "not extracted from image shards")
                self._images[i] = self.bb.transform(False)(self._reader.load(self.paths[i]))
            return self._images[i]

    data = _ShardCorpusBatches(feats.zI, feats.paths or None, bb, need_images=need_images)
    data._reader = ShardImages()
    return data
