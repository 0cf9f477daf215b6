"""Loaders for the field's 11 standard datasets and 4 ImageNet variants, in CoOp's on-disk layout.

`root` is the folder that holds every dataset folder (CoOp's $DATA); see docs/datasets.md for the layout.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from gramvl.data.base import IMAGE_EXTENSIONS, SPLITS, ImageDataset
from gramvl.errors import GramvlError

DOCS = "docs/datasets.md"
MAX_LISTED = 5

# CoOp renames a few raw folder names; the mapping is idempotent, so split files written with either the raw
# or the renamed class names give the same result.
CALTECH101_NAMES = MappingProxyType({
    "airplanes": "airplane", "Faces": "face", "Leopards": "leopard", "Motorbikes": "motorbike",
})
EUROSAT_NAMES = MappingProxyType({
    "AnnualCrop": "Annual Crop Land",
    "Forest": "Forest",
    "HerbaceousVegetation": "Herbaceous Vegetation Land",
    "Highway": "Highway or Road",
    "Industrial": "Industrial Buildings",
    "Pasture": "Pasture Land",
    "PermanentCrop": "Permanent Crop Land",
    "Residential": "Residential Buildings",
    "River": "River",
    "SeaLake": "Sea or Lake",
})


@dataclass(frozen=True)
class MissingItem:
    """One required file or folder that is not on disk, with where to get it."""

    what: str  # e.g. "split file", "image folder"
    path: Path
    hint: str

    def message(self) -> str:
        return f"{self.what} {self.path} is missing: {self.hint}"


@dataclass(frozen=True)
class DatasetSpec:
    """Where one standard dataset lives under ROOT. Paths are candidates relative to ROOT, first preferred."""

    name: str
    title: str
    folder: str
    kind: str  # "split_json" | "fgvc_aircraft" | "imagenet" | "imagenet_variant"
    image_dirs: tuple[str, ...]
    split_files: tuple[str, ...] = ()
    classnames_files: tuple[str, ...] = ()
    splits: tuple[str, ...] = SPLITS
    split_folders: Mapping[str, str] = field(default_factory=dict)  # split -> folder under the image dir
    cname_map: Mapping[str, str] = field(default_factory=dict)
    source: str = ""
    split_source: str = ""

    def dataset_dir(self, root: str | Path) -> Path:
        return Path(root) / self.folder


def _split_json(name: str, title: str, folder: str, image_dirs: tuple[str, ...], split_file: str,
                source: str, **kw) -> DatasetSpec:
    files = tuple(f"{d}/{split_file}" for d in kw.pop("split_dirs", (folder,)))
    return DatasetSpec(name, title, folder, "split_json", image_dirs, split_files=files, source=source,
                       split_source=f"download {split_file} from the link in the {title} section of {DOCS} "
                                    f"(CoOp's DATASETS.md) and put it in {folder}/", **kw)


_IN_CLASSNAMES = ("download classnames.txt from the link in the ImageNet section of "
                  f"{DOCS} (CoOp's DATASETS.md)")

STANDARD_DATASETS: dict[str, DatasetSpec] = {s.name: s for s in [
    DatasetSpec(
        "imagenet", "ImageNet", "imagenet", "imagenet", ("imagenet/images",),
        classnames_files=("imagenet/classnames.txt",),
        split_folders={"train": "train", "val": "val", "test": "val"},
        source="extract the ILSVRC-2012 train and val sets (https://image-net.org) into imagenet/images/train and "
               "imagenet/images/val, one folder per WordNet id (n01440764, ...)",
        split_source=_IN_CLASSNAMES + " and put it in imagenet/"),
    _split_json("caltech101", "Caltech101", "caltech-101", ("caltech-101/101_ObjectCategories",),
                "split_zhou_Caltech101.json", cname_map=CALTECH101_NAMES,
                source="extract 101_ObjectCategories.tar.gz into caltech-101/"),
    _split_json("oxford_pets", "OxfordPets", "oxford_pets", ("oxford_pets/images",), "split_zhou_OxfordPets.json",
                source="extract images.tar.gz (Oxford-IIIT Pet, robots.ox.ac.uk/~vgg/data/pets) into oxford_pets/"),
    _split_json("stanford_cars", "StanfordCars", "stanford_cars", ("stanford_cars",),
                "split_zhou_StanfordCars.json",
                split_folders={"train": "cars_train", "val": "cars_train", "test": "cars_test"},
                source="extract cars_train.tgz and cars_test.tgz (Stanford Cars) into stanford_cars/"),
    _split_json("oxford_flowers", "Flowers102", "oxford_flowers", ("oxford_flowers/jpg",),
                "split_zhou_OxfordFlowers.json",
                source="extract 102flowers.tgz (robots.ox.ac.uk/~vgg/data/flowers/102) into oxford_flowers/"),
    _split_json("food101", "Food101", "food-101", ("food-101/images",), "split_zhou_Food101.json",
                source="extract food-101.tar.gz (data.vision.ee.ethz.ch/cvl/datasets_extra/food-101) into ROOT"),
    DatasetSpec(
        "fgvc_aircraft", "FGVCAircraft", "fgvc_aircraft", "fgvc_aircraft", ("fgvc_aircraft/images",),
        classnames_files=("fgvc_aircraft/variants.txt",),
        source="extract fgvc-aircraft-2013b.tar.gz, keep its data/ folder and rename it to fgvc_aircraft/",
        split_source="it ships in the data/ folder of fgvc-aircraft-2013b.tar.gz, which becomes fgvc_aircraft/"),
    _split_json("sun397", "SUN397", "sun397", ("sun397/SUN397",), "split_zhou_SUN397.json",
                source="extract SUN397.tar.gz (vision.princeton.edu/projects/2010/SUN) into sun397/"),
    _split_json("dtd", "DTD", "dtd", ("dtd/images", "dtd/dtd/images"), "split_zhou_DescribableTextures.json",
                split_dirs=("dtd", "dtd/dtd"),
                source="extract dtd-r1.0.1.tar.gz (robots.ox.ac.uk/~vgg/data/dtd) into ROOT, giving dtd/images"),
    _split_json("eurosat", "EuroSAT", "eurosat", ("eurosat/2750", "eurosat/EuroSAT_RGB"), "split_zhou_EuroSAT.json",
                cname_map=EUROSAT_NAMES,
                source="extract EuroSAT.zip (the RGB version) into eurosat/, giving eurosat/2750/<class>/"),
    _split_json("ucf101", "UCF101", "ucf101", ("ucf101/UCF-101-midframes",), "split_zhou_UCF101.json",
                source="extract UCF-101-midframes.zip (link in the UCF101 section of " + DOCS + ") into ucf101/"),
    DatasetSpec(
        "imagenet_v2", "ImageNetV2", "imagenetv2", "imagenet_variant",
        ("imagenetv2/imagenetv2-matched-frequency-format-val",),
        classnames_files=("imagenetv2/classnames.txt", "imagenet/classnames.txt"), splits=("test",),
        source="extract imagenetv2-matched-frequency.tar.gz (github.com/modestyachts/ImageNetV2) into imagenetv2/",
        split_source=_IN_CLASSNAMES + " and copy it to imagenetv2/"),
    DatasetSpec(
        "imagenet_sketch", "ImageNet-Sketch", "imagenet-sketch", "imagenet_variant", ("imagenet-sketch/images",),
        classnames_files=("imagenet-sketch/classnames.txt", "imagenet/classnames.txt"), splits=("test",),
        source="extract ImageNet-Sketch (github.com/HaohanWang/ImageNet-Sketch) so that its wnid folders sit in "
               "imagenet-sketch/images/",
        split_source=_IN_CLASSNAMES + " and copy it to imagenet-sketch/"),
    DatasetSpec(
        "imagenet_a", "ImageNet-A", "imagenet-adversarial", "imagenet_variant",
        ("imagenet-adversarial/imagenet-a",),
        classnames_files=("imagenet-adversarial/classnames.txt", "imagenet/classnames.txt"), splits=("test",),
        source="extract imagenet-a.tar (github.com/hendrycks/natural-adv-examples) into imagenet-adversarial/",
        split_source=_IN_CLASSNAMES + " and copy it to imagenet-adversarial/"),
    DatasetSpec(
        "imagenet_r", "ImageNet-R", "imagenet-rendition", "imagenet_variant", ("imagenet-rendition/imagenet-r",),
        classnames_files=("imagenet-rendition/classnames.txt", "imagenet/classnames.txt"), splits=("test",),
        source="extract imagenet-r.tar (github.com/hendrycks/imagenet-r) into imagenet-rendition/",
        split_source=_IN_CLASSNAMES + " and copy it to imagenet-rendition/"),
]}


def _norm(s: str) -> str:
    return "".join(ch for ch in s.lower() if ch.isalnum())


_ALIASES = {_norm(k): k for k in STANDARD_DATASETS} | {_norm(s.title): s.name for s in STANDARD_DATASETS.values()} \
    | {_norm(s.folder): s.name for s in STANDARD_DATASETS.values()} \
    | {"flowers102": "oxford_flowers", "describabletextures": "dtd", "imagenetadversarial": "imagenet_a",
       "imagenetrendition": "imagenet_r", "aircraft": "fgvc_aircraft", "pets": "oxford_pets"}


def resolve_name(name: str) -> str:
    """Canonical dataset name for `name` ('OxfordPets', 'caltech-101', 'imagenet-a', ... are accepted)."""
    key = _ALIASES.get(_norm(name))
    if key is None:
        raise GramvlError(f"unknown standard dataset {name!r}; expected one of {', '.join(STANDARD_DATASETS)}")
    return key


def clean_classname(name: str) -> str:
    """CoOp's class-name cleaning: underscores read as spaces, surrounding whitespace dropped."""
    return " ".join(name.replace("_", " ").split())


def _pick(root: Path, candidates: tuple[str, ...], kind: str = "any") -> Path:
    """The first candidate that exists (file or folder as `kind` asks), else the preferred one."""
    for c in candidates:
        p = root / c
        if (kind == "dir" and p.is_dir()) or (kind == "file" and p.is_file()) or (kind == "any" and p.exists()):
            return p
    return root / candidates[0]


def _also(root: Path, candidates: tuple[str, ...]) -> str:
    return f" (also looked for {', '.join(str(root / c) for c in candidates[1:])})" if len(candidates) > 1 else ""


def missing_items(name: str, root: str | Path, split: str | None = None) -> list[MissingItem]:
    """Required files and folders of dataset `name` under `root` that are absent (for one split or all)."""
    spec = STANDARD_DATASETS[resolve_name(name)]
    root = Path(root).expanduser()
    splits = spec.splits if split is None else (split,)
    out: list[MissingItem] = []
    if not spec.dataset_dir(root).is_dir():
        return [MissingItem("dataset folder", spec.dataset_dir(root), spec.source)]
    image_dir = _pick(root, spec.image_dirs, "dir")
    if not image_dir.is_dir():
        out.append(MissingItem("image folder", image_dir, spec.source + _also(root, spec.image_dirs)))
    else:
        for sub in dict.fromkeys(spec.split_folders.get(s) for s in splits):
            if sub is not None and not (image_dir / sub).is_dir():
                out.append(MissingItem("image folder", image_dir / sub, spec.source))
    for what, cands in (("split file", spec.split_files), ("class-name file", spec.classnames_files)):
        if cands and not _pick(root, cands, "file").is_file():
            out.append(MissingItem(what, root / cands[0], spec.split_source + _also(root, cands)))
    if spec.kind == "fgvc_aircraft":
        for s in splits:
            p = spec.dataset_dir(root) / f"images_variant_{s}.txt"
            if not p.is_file():
                out.append(MissingItem("split file", p, spec.split_source))
    return out


def load_standard(name: str, root: str | Path, split: str) -> ImageDataset:
    """Load split 'train', 'val' or 'test' of a standard dataset stored under `root` (CoOp's $DATA)."""
    spec = STANDARD_DATASETS[resolve_name(name)]
    root = Path(root).expanduser().absolute()
    if split not in SPLITS:
        raise GramvlError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if split not in spec.splits:
        raise GramvlError(f"{spec.title} has no {split!r} split: it is a test-only dataset (use split 'test')")
    if not root.is_dir():
        raise GramvlError(f"data root {root} does not exist or is not a folder")
    missing = missing_items(spec.name, root, split)
    if missing:
        raise GramvlError(missing[0].message() + (f" (and {len(missing) - 1} more missing item(s); "
                                                  f"run `gramvl check-data {root}`)" if len(missing) > 1 else ""))
    ds = _LOADERS[spec.kind](spec, root, split)
    if not ds.samples:
        raise GramvlError(f"{spec.title} {split} split has no images under {_pick(root, spec.image_dirs, 'dir')}")
    return ds


# ----------------------------------------------------------------------------------------------- loaders


def _check_exist(samples: list[tuple[str, int]], listed_in: Path, split: str, image_dir: Path) -> None:
    gone = [p for p, _ in samples if not os.path.isfile(p)]
    if gone:
        shown = ", ".join(os.path.relpath(p, image_dir) for p in gone[:MAX_LISTED])
        raise GramvlError(f"{len(gone)} of {len(samples)} images listed in {listed_in} ({split} split) are missing "
                          f"under {image_dir}, e.g. {shown}: the image archive is incomplete or extracted elsewhere")


def _read_json(path: Path) -> object:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise GramvlError(f"split file {path} is not valid JSON ({e}); download it again") from e
    except OSError as e:
        raise GramvlError(f"cannot read {path} ({e})") from e


def _load_split_json(spec: DatasetSpec, root: Path, split: str) -> ImageDataset:
    path = _pick(root, spec.split_files, "file")
    image_dir = _pick(root, spec.image_dirs, "dir")
    data = _read_json(path)
    if not isinstance(data, dict) or not all(isinstance(data.get(s), list) for s in SPLITS):
        raise GramvlError(f"split file {path} has the wrong format: expected a JSON object with lists "
                          f"'train', 'val' and 'test' of [image_path, label, classname]")
    names: dict[int, str] = {}
    entries: list[tuple[str, int]] = []
    for s in SPLITS:
        for i, item in enumerate(data[s]):
            if not (isinstance(item, list | tuple) and len(item) == 3 and isinstance(item[0], str)
                    and isinstance(item[2], str)):
                raise GramvlError(f"split file {path}: entry {i} of {s!r} is {item!r}; expected "
                                  f"[image_path, label, classname]")
            try:
                label = int(item[1])
            except (TypeError, ValueError) as e:
                raise GramvlError(f"split file {path}: entry {i} of {s!r} has a non-integer label {item[1]!r}") from e
            if label < 0:
                raise GramvlError(f"split file {path}: entry {i} of {s!r} has a negative label {label}")
            names.setdefault(label, item[2])
            if s == split:
                entries.append((str(image_dir / item[0]), label))
    n = max(names) + 1 if names else 0
    gaps = [y for y in range(n) if y not in names]
    if gaps:
        raise GramvlError(f"split file {path} has no class name for label(s) {gaps[:MAX_LISTED]}; download it again")
    classnames = [clean_classname(spec.cname_map.get(names[y], names[y])) for y in range(n)]
    _check_exist(entries, path, split, image_dir)
    return ImageDataset(name=spec.name, split=split, classnames=classnames, samples=entries)


def _read_lines(path: Path) -> list[str]:
    try:
        return [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    except OSError as e:
        raise GramvlError(f"cannot read {path} ({e})") from e


def _load_fgvc(spec: DatasetSpec, root: Path, split: str) -> ImageDataset:
    variants = _read_lines(_pick(root, spec.classnames_files, "file"))
    index = {c: i for i, c in enumerate(variants)}
    image_dir = _pick(root, spec.image_dirs, "dir")
    listing = spec.dataset_dir(root) / f"images_variant_{split}.txt"
    samples = []
    for line in _read_lines(listing):
        image_id, _, variant = line.partition(" ")
        if variant.strip() not in index:
            raise GramvlError(f"{listing}: variant {variant.strip()!r} of image {image_id} is not in variants.txt")
        samples.append((str(image_dir / f"{image_id}.jpg"), index[variant.strip()]))
    _check_exist(samples, listing, split, image_dir)
    return ImageDataset(name=spec.name, split=split, classnames=[clean_classname(c) for c in variants],
                        samples=samples)


def read_imagenet_classnames(path: Path) -> dict[str, str]:
    """Read CoOp's classnames.txt ('<wnid> <class name>' per line) into {wnid: class name}, sorted by wnid."""
    out: dict[str, str] = {}
    for i, line in enumerate(_read_lines(path), 1):
        wnid, _, cname = line.partition(" ")
        if not cname.strip():
            raise GramvlError(f"{path} line {i}: expected '<wnid> <class name>', got {line!r}")
        out[wnid] = clean_classname(cname)
    return dict(sorted(out.items()))


def _images_in(folder: Path) -> list[str]:
    with os.scandir(folder) as it:
        return sorted(e.path for e in it if not e.name.startswith(".") and e.is_file()
                      and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS)


def _class_folders(folder: Path) -> list[str]:
    with os.scandir(folder) as it:
        dirs = sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))
    if not dirs:
        loose = _images_in(folder)
        raise GramvlError(f"no class folders in {folder}" + (
            f": it holds {len(loose)} images directly; sort them into one folder per class "
            f"(for the ImageNet val set, one folder per WordNet id, as in images/train)" if loose else ""))
    return dirs


def _unknown_wnids(found: list[str], known: Mapping[str, str], folder: Path, cn_path: Path) -> None:
    bad = [w for w in found if w not in known]
    if bad:
        raise GramvlError(f"{len(bad)} class folder(s) in {folder} are not in {cn_path}, e.g. {bad[:MAX_LISTED]}: "
                          f"expected folders named by ImageNet WordNet id (n01440764, ...)")


def _load_imagenet(spec: DatasetSpec, root: Path, split: str) -> ImageDataset:
    cn_path = _pick(root, spec.classnames_files, "file")
    classes = read_imagenet_classnames(cn_path)
    label = {w: i for i, w in enumerate(classes)}
    folder = _pick(root, spec.image_dirs, "dir") / spec.split_folders[split]
    wnids = _class_folders(folder)
    _unknown_wnids(wnids, classes, folder, cn_path)
    samples = [(p, label[w]) for w in wnids for p in _images_in(folder / w)]
    return ImageDataset(name=spec.name, split=split, classnames=list(classes.values()), samples=samples,
                        extra={"wnids": list(classes)})


def _load_imagenet_variant(spec: DatasetSpec, root: Path, split: str) -> ImageDataset:
    cn_path = _pick(root, spec.classnames_files, "file")
    classes = read_imagenet_classnames(cn_path)
    wnids_all = list(classes)
    folder = _pick(root, spec.image_dirs, "dir")
    subdirs = _class_folders(folder)
    if spec.name == "imagenet_v2":  # folders 0..999 hold the images of ImageNet class index i
        bad = [d for d in subdirs if not d.isdigit() or int(d) >= len(wnids_all)]
        if bad:
            raise GramvlError(f"unexpected folder(s) {bad[:MAX_LISTED]} in {folder}: ImageNetV2 uses folders "
                              f"0..{len(wnids_all) - 1} named by ImageNet class index")
        samples = [(p, int(d)) for d in sorted(subdirs, key=int) for p in _images_in(folder / d)]
        return ImageDataset(name=spec.name, split=split, classnames=list(classes.values()), samples=samples,
                            extra={"wnids": wnids_all})
    _unknown_wnids(subdirs, classes, folder, cn_path)
    if spec.name == "imagenet_sketch":  # all 1000 classes, ImageNet's label space
        label = {w: i for i, w in enumerate(wnids_all)}
        samples = [(p, label[w]) for w in subdirs for p in _images_in(folder / w)]
        return ImageDataset(name=spec.name, split=split, classnames=list(classes.values()), samples=samples,
                            extra={"wnids": wnids_all})
    # ImageNet-A / -R: a 200-class subset, labelled 0..199 in wnid order; extra maps back to ImageNet labels.
    samples = [(p, i) for i, w in enumerate(subdirs) for p in _images_in(folder / w)]
    index = {w: i for i, w in enumerate(wnids_all)}
    return ImageDataset(name=spec.name, split=split, classnames=[classes[w] for w in subdirs], samples=samples,
                        extra={"wnids": subdirs, "imagenet_indices": [index[w] for w in subdirs]})


_LOADERS: dict[str, Callable[[DatasetSpec, Path, str], ImageDataset]] = {
    "split_json": _load_split_json,
    "fgvc_aircraft": _load_fgvc,
    "imagenet": _load_imagenet,
    "imagenet_variant": _load_imagenet_variant,
}
