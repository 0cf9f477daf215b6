"""The one dataset type every loader returns: a list of (image path, label) plus class names."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from gramvl.errors import GramvlError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SPLITS = ("train", "val", "test")


def load_image(path: str | Path) -> Image.Image:
    """Open an image as RGB; a corrupt or unreadable file is a GramvlError naming the file."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except FileNotFoundError as e:
        raise GramvlError(f"image file not found: {path}") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise GramvlError(f"corrupt or unreadable image: {path} ({e})") from e


@dataclass
class ImageDataset(torch.utils.data.Dataset):
    """Labelled images of one split. `key` identifies the dataset+split for feature caches."""

    name: str
    split: str
    classnames: list[str]
    samples: list[tuple[str, int]]
    transform: Callable | None = None
    domain: str = ""
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        img = load_image(path)
        if self.transform is not None:
            img = self.transform(img)
        return img, label

    @property
    def labels(self) -> list[int]:
        return [lab for _, lab in self.samples]

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    @property
    def key(self) -> str:
        return f"{self.name}/{self.split}"

    def with_transform(self, transform: Callable | None) -> ImageDataset:
        return ImageDataset(self.name, self.split, self.classnames, self.samples, transform, self.domain, self.extra)

    def subset(self, indices: list[int], relabel: dict[int, int] | None = None,
               classnames: list[str] | None = None, suffix: str = "") -> ImageDataset:
        """A subset of samples, optionally relabelled (base/new splits)."""
        samples = [self.samples[i] for i in indices]
        if relabel is not None:
            samples = [(p, relabel[y]) for p, y in samples]
        return ImageDataset(self.name + suffix, self.split, classnames or self.classnames, samples,
                            self.transform, self.domain, dict(self.extra))


def folder_classname(folder: str) -> str:
    """Class name of a folder: underscores read as spaces."""
    return folder.replace("_", " ").strip()


def load_folder(root: str | Path, split: str, name: str | None = None) -> ImageDataset:
    """Read `ROOT/{train,val,test}/<class_name>/*.{png,jpg,...}`; class = folder name, '_' read as ' '.

    Labels follow the sorted folder names of the train split when it exists (so every split agrees).
    """
    root = Path(root)
    if not root.is_dir():
        raise GramvlError(f"dataset folder not found: {root}")
    if split not in SPLITS:
        raise GramvlError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    present = [s for s in SPLITS if (root / s).is_dir()]
    if not present:
        raise GramvlError(
            f"wrong folder layout in {root}: expected ROOT/{{train,val,test}}/<class_name>/<images>, "
            f"found none of the split folders train/, val/, test/"
        )
    split_dir = root / split
    if not split_dir.is_dir():
        raise GramvlError(f"wrong folder layout in {root}: split folder {split_dir} is missing "
                          f"(present: {', '.join(present)})")
    ref = root / ("train" if (root / "train").is_dir() else split)
    class_dirs = sorted(d.name for d in ref.iterdir() if d.is_dir())
    if not class_dirs:
        stray = [p.name for p in ref.iterdir() if p.is_file()][:3]
        raise GramvlError(f"wrong folder layout in {ref}: no class folders found"
                          + (f" (images directly in the split folder, e.g. {stray})" if stray else ""))
    index = {c: i for i, c in enumerate(class_dirs)}
    samples: list[tuple[str, int]] = []
    for d in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        if d.name not in index:
            raise GramvlError(f"class folder {d} has no counterpart in {ref}; every split must use the same classes")
        files = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        samples.extend((str(p), index[d.name]) for p in files)
    if not samples:
        raise GramvlError(f"no images (*.png, *.jpg, ...) found under {split_dir}/<class_name>/")
    return ImageDataset(name=name or f"folder:{root}", split=split,
                        classnames=[folder_classname(c) for c in class_dirs], samples=samples)
