"""The seven source packages of the embedded world: pinned versions, fetching, checksums, extraction."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gramvl.errors import GramvlError


@dataclass(frozen=True)
class Source:
    """One pinned package: npm tarball or Debian .deb."""

    name: str
    kind: str  # "npm" | "deb"
    version: str
    sha256: str
    license: str
    role: str

    @property
    def spec(self) -> str:
        return f"{self.name}@{self.version}" if self.kind == "npm" else f"{self.name}={self.version}"


SOURCES: tuple[Source, ...] = (
    Source("emoji-datasource-google", "npm", "16.0.0",
           "fb5fd131b362aab7a55542d2a147a79708cce0a8b1c1bbacd470172708b5c438",
           "images: Apache-2.0 (Noto Emoji); data and code: MIT (Cal Henderson)", "pretrain"),
    Source("emoji-datasource-twitter", "npm", "16.0.0",
           "f64a530c63bca463bd8317fdc4615ce63a53a0c65018e4ce2d848aaba7a28877",
           "images: CC-BY-4.0 (Twemoji); data and code: MIT (Cal Henderson)", "pretrain"),
    Source("unicode-cldr-core", "deb", "41-0.1",
           "35d30d5d3bee4d8244e95236259c4c2a0db06e21bad696515751fcfeee4d0260",
           "Unicode-DFS-2016 (Unicode, Inc.)", "pretrain keywords"),
    Source("openmoji", "npm", "17.0.0",
           "55ee7d13485dec86e9f38c1f3a645a13382d33ff97c0cd845ee824b0aef45e68",
           "graphics: CC-BY-SA-4.0 (OpenMoji); code: LGPL-3.0", "downstream"),
    Source("dataset-fashion-mnist", "deb", "0.0~git20200523.55506a9-1",
           "39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0",
           "MIT/Expat (Zalando SE)", "downstream"),
    Source("openclipart-svg", "deb", "1:0.18+dfsg-19",
           "989712d90d57dfa3230049f553bb43b76c30ee4d4b8c5f6e106e33f7db5cbdc5",
           "public domain (Creative Commons Public Domain Dedication)", "meta"),
    Source("tuxpaint-stamps-default", "deb", "2022.06.04-1",
           "6db6c1bfc870a47f1499d6203b083522eacb57c5f9c87d468f2e92eb6d9d5f34",
           "GPL-2+ (Bill Kendrick and Tux Paint contributors)", "meta"),
)
# The optional icon corpus (`gramvl world build --icons`): named monochrome pictograms that widen the small
# CLIP's pre-training corpus (docs/data.md). Not part of the default world, so its build and tests need none.
ICON_SOURCES: tuple[Source, ...] = (
    Source("@iconify-json/game-icons", "npm", "1.2.4",
           "f5758efb34d91c4f50b941f355f16ee73938625e5996fabc25171288404460a4",
           "icons: CC-BY-3.0 (game-icons.net authors: Lorc, Delapouite and contributors); packaging: MIT (Iconify)",
           "pretrain icons"),
    Source("@iconify-json/mdi", "npm", "1.2.3",
           "ddd817a7213f91de51147943915c0cda8c8b818a53c92b5c068cfa9883c6d7ac",
           "icons: Apache-2.0 (Pictogrammers, Material Design Icons); packaging: MIT (Iconify)", "pretrain icons"),
    Source("@iconify-json/tabler", "npm", "1.2.41",
           "3bf99af156d28d05568aff524a35ed1ba238df640a7835a5e02e1f8e439685f6",
           "icons: MIT (Paweł Kuna, Tabler Icons); packaging: MIT (Iconify)", "pretrain icons"),
)
SOURCE_BY_NAME = {s.name: s for s in SOURCES + ICON_SOURCES}


def archive_stem(name: str) -> str:
    """The file-name form of a package name (`npm pack` writes @scope/name as scope-name-VERSION.tgz)."""
    return name.lstrip("@").replace("/", "-")


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_command(src: Source) -> list[str]:
    """The command that downloads `src` into the current directory (tests monkeypatch this)."""
    if src.kind == "npm":
        return ["npm", "pack", "--silent", src.spec]
    return ["apt-get", "download", "-q", src.spec]


def _archive_glob(src: Source) -> str:
    return f"{archive_stem(src.name)}-*.tgz" if src.kind == "npm" else f"{src.name}_*.deb"


def _fail(src: Source, what: str) -> GramvlError:
    hint = "; if apt cannot locate it, run `apt-get update` first" if src.kind == "deb" else ""
    return GramvlError(f"could not fetch {src.kind} package {src.name}@{src.version} ({what}); "
                       f"the embedded world needs it{hint}")


def fetch_source(src: Source, dest: Path, expected_sha256: str | None = None,
                 log: Callable[[str], None] = print) -> Path:
    """Download `src` into `dest` unless a copy with the expected sha256 is already there; return its path."""
    expected = expected_sha256 or src.sha256
    dest.mkdir(parents=True, exist_ok=True)
    for old in sorted(dest.glob(_archive_glob(src))):
        if sha256_file(old) == expected:
            return old
        log(f"world: {old.name} does not match its recorded sha256; downloading it again")
        old.unlink()
    cmd = fetch_command(src)
    log(f"world: downloading {src.kind} package {src.spec}")
    with tempfile.TemporaryDirectory(dir=dest, prefix=".fetch-") as tmp:
        try:
            proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=600)
        except FileNotFoundError as e:
            raise _fail(src, f"`{' '.join(cmd)}` failed: {cmd[0]} is not installed") from e
        except subprocess.TimeoutExpired as e:
            raise _fail(src, f"`{' '.join(cmd)}` timed out") from e
        got = sorted(Path(tmp).iterdir())
        if proc.returncode != 0 or len(got) != 1:
            msg = (proc.stderr or proc.stdout or "").strip().splitlines()
            tail = msg[-1] if msg else f"exit status {proc.returncode}, {len(got)} files written"
            raise _fail(src, f"`{' '.join(cmd)}` failed: {tail}")
        digest = sha256_file(got[0])
        if digest != expected:
            raise _fail(src, f"sha256 {digest} of {got[0].name} differs from the pinned {expected}")
        target = dest / got[0].name
        shutil.move(str(got[0]), target)
    return target


# Which members of each archive the builder needs (paths inside the archive, without a leading "./").
def _wanted(src: Source) -> Callable[[str], bool]:
    n = src.name
    if n.startswith("emoji-datasource-"):
        style = n.rsplit("-", 1)[1]
        return lambda p: (p in ("package/emoji.json", "package/LICENSE", "package/README.md")
                          or (p.startswith(f"package/img/{style}/64/") and p.endswith(".png")))
    if n.startswith("@iconify-json/"):
        return lambda p: p in ("package/icons.json", "package/info.json", "package/metadata.json",
                               "package/package.json")
    if n == "openmoji":
        return lambda p: (p in ("package/data/openmoji.csv", "package/LICENSE.txt", "package/README.md")
                          or (p.startswith(("package/color/svg/", "package/black/svg/")) and p.endswith(".svg")))
    if n == "unicode-cldr-core":
        return lambda p: p in ("usr/share/unicode/cldr/common/annotations/en.xml",
                               "usr/share/unicode/cldr/common/annotationsDerived/en.xml",
                               "usr/share/doc/unicode-cldr-core/copyright")
    if n == "dataset-fashion-mnist":
        return lambda p: (p.startswith("usr/share/datasets/fashion-mnist/") and p.endswith(".gz")
                          or p == "usr/share/doc/dataset-fashion-mnist/copyright")
    if n == "openclipart-svg":
        return lambda p: (p.startswith("usr/share/openclipart/svg/") and p.endswith(".svg")
                          or p == "usr/share/doc/openclipart-svg/copyright")
    if n == "tuxpaint-stamps-default":
        return lambda p: (p.startswith("usr/share/tuxpaint/stamps/") and p.endswith((".png", ".svg", ".txt"))
                          or p == "usr/share/doc/tuxpaint-stamps-default/copyright")
    return lambda p: True


def _extract_stream(tf: tarfile.TarFile, out: Path, wanted: Callable[[str], bool]) -> int:
    n = 0
    for m in tf:
        name = m.name[2:] if m.name.startswith("./") else m.name
        if not m.isfile() or not wanted(name):  # links (duplicates in openclipart) and folders are skipped
            continue
        m.name = name
        tf.extract(m, out, filter="data")
        n += 1
    return n


def extract_source(src: Source, archive: Path, out: Path) -> Path:
    """Extract the members the builder needs from `archive` into `out/<package name>/`; return that folder."""
    root = out / archive_stem(src.name)
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    wanted = _wanted(src)
    try:
        if src.kind == "npm":
            with tarfile.open(archive, "r:gz") as tf:
                _extract_stream(tf, root, wanted)
        else:
            proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(archive)], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE)
            with tarfile.open(fileobj=proc.stdout, mode="r|*") as tf:
                _extract_stream(tf, root, wanted)
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            if proc.wait() != 0:
                raise GramvlError(f"could not unpack {archive} (dpkg-deb --fsys-tarfile failed: {err.strip()})")
    except FileNotFoundError as e:
        raise GramvlError(f"could not unpack {archive}: dpkg-deb is not installed") from e
    except (tarfile.TarError, OSError, EOFError) as e:
        raise GramvlError(f"could not unpack {archive} ({e}); delete it and build again") from e
    return root


@dataclass(frozen=True)
class SourceTree:
    """Where the builder reads the unpacked sources: `root/<package name>/<paths as in the archive>`."""

    root: Path

    def emoji_json(self, style: str) -> Path:
        return self.root / f"emoji-datasource-{style}" / "package" / "emoji.json"

    def emoji_png_dir(self, style: str) -> Path:
        return self.root / f"emoji-datasource-{style}" / "package" / "img" / style / "64"

    @property
    def openmoji_csv(self) -> Path:
        return self.root / "openmoji" / "package" / "data" / "openmoji.csv"

    def openmoji_svg_dir(self, variant: str) -> Path:
        return self.root / "openmoji" / "package" / variant / "svg"

    @property
    def cldr_annotation_files(self) -> list[Path]:
        base = self.root / "unicode-cldr-core" / "usr" / "share" / "unicode" / "cldr" / "common"
        return [base / "annotations" / "en.xml", base / "annotationsDerived" / "en.xml"]

    @property
    def fashion_mnist_dir(self) -> Path:
        return self.root / "dataset-fashion-mnist" / "usr" / "share" / "datasets" / "fashion-mnist"

    @property
    def openclipart_dir(self) -> Path:
        return self.root / "openclipart-svg" / "usr" / "share" / "openclipart" / "svg"

    def iconify_json(self, name: str) -> Path:
        return self.root / archive_stem(name) / "package" / "icons.json"

    def iconify_metadata(self, name: str) -> Path:
        return self.root / archive_stem(name) / "package" / "metadata.json"

    @property
    def tuxpaint_dir(self) -> Path:
        return self.root / "tuxpaint-stamps-default" / "usr" / "share" / "tuxpaint" / "stamps"
