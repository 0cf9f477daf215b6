"""`gramvl check-data ROOT`: which standard datasets under ROOT are ready, which are missing what."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from gramvl.data.standard import STANDARD_DATASETS, MissingItem, load_standard, missing_items
from gramvl.errors import GramvlError

OK, NOT_FOUND, INCOMPLETE, ERROR = "ok", "not found", "incomplete", "error"


@dataclass
class DatasetReport:
    """The state of one standard dataset under ROOT: status, image counts per split, what is missing."""

    name: str
    title: str
    folder: Path
    status: str  # "ok" | "not found" | "incomplete" | "error"
    counts: dict[str, int] = field(default_factory=dict)
    num_classes: int | None = None
    missing: list[MissingItem] = field(default_factory=list)
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == OK


def check_dataset(name: str, root: str | Path) -> DatasetReport:
    """Inspect one standard dataset under `root`; never raises for problems with the data itself."""
    spec = STANDARD_DATASETS[name]
    root = Path(root).expanduser().absolute()
    rep = DatasetReport(spec.name, spec.title, spec.dataset_dir(root), OK)
    missing = missing_items(spec.name, root)
    if missing:
        rep.status = NOT_FOUND if missing[0].what == "dataset folder" else INCOMPLETE
        rep.missing = missing
        return rep
    loaded: dict[str, int] = {}
    errors: list[str] = []
    for split in spec.splits:
        same = spec.split_folders.get(split, split) if spec.kind == "imagenet" else split  # ImageNet: val = test
        try:
            if same not in loaded:
                ds = load_standard(spec.name, root, split)
                loaded[same] = len(ds)
                rep.num_classes = ds.num_classes
            rep.counts[split] = loaded[same]
        except (GramvlError, OSError) as e:
            errors.append(f"{split}: {e}")
    if errors:
        rep.status, rep.error = ERROR, "\n".join(errors)
    return rep


def check_data(root: str | Path) -> list[DatasetReport]:
    """Inspect every standard dataset under `root` (CoOp's $DATA) and report its state."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise GramvlError(f"data root {root} does not exist or is not a folder")
    return [check_dataset(name, root) for name in STANDARD_DATASETS]


def _count(rep: DatasetReport, split: str) -> str:
    if split in rep.counts:
        return str(rep.counts[split])
    return "-" if rep.status != OK else "n/a"


def format_report(reports: list[DatasetReport]) -> str:
    """A readable table of `check_data` results, followed by what is missing and where to get it."""
    header = ("dataset", "folder", "status", "train", "val", "test", "classes")
    rows = [header] + [(r.title, r.folder.name + "/", r.status, _count(r, "train"), _count(r, "val"),
                        _count(r, "test"), "-" if r.num_classes is None else str(r.num_classes)) for r in reports]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    right = {3, 4, 5, 6}

    def fmt(row: tuple[str, ...]) -> str:
        cells = zip(row, widths, strict=True)
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(cells)).rstrip()

    lines = [fmt(rows[0]), fmt(tuple("-" * w for w in widths))] + [fmt(r) for r in rows[1:]]
    ready = sum(r.ok for r in reports)
    if reports:
        lines.append("")
        lines.append(f"{ready} of {len(reports)} datasets ready (n/a: split not defined for the dataset).")
    problems = [r for r in reports if r.status in (INCOMPLETE, ERROR)]
    absent = [r for r in reports if r.status == NOT_FOUND]
    for r in problems:
        lines.append("")
        lines.append(f"{r.title} ({r.folder}): {r.status}")
        lines.extend(f"  - {m.message()}" for m in r.missing)
        lines.extend(f"  - {e}" for e in r.error.splitlines())
    if absent:
        lines.append("")
        lines.append("Not found: " + ", ".join(f"{r.title} ({r.folder.name}/)" for r in absent)
                     + ". See docs/datasets.md for the layout and where to get each dataset.")
    return "\n".join(lines)
