"""Standard dataset loaders and `check_data`, on tiny fixture trees in CoOp's on-disk layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from gramvl.data.base import load_image
from gramvl.data.check import check_data, format_report
from gramvl.data.standard import STANDARD_DATASETS, load_standard, resolve_name
from gramvl.errors import GramvlError


def _img(path: Path, color: tuple[int, int, int] = (200, 10, 10)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), color).save(path, format="PNG" if path.suffix == ".png" else "JPEG")


def _split_json_dataset(root: Path, folder: str, image_dir: str, split_file: str,
                        classes: list[tuple[str, str]], per_split: tuple[int, int, int] = (2, 1, 1),
                        ext: str = ".jpg") -> None:
    """classes: (folder name on disk, class name written in the split file)."""
    split: dict[str, list] = {"train": [], "val": [], "test": []}
    for label, (cdir, cname) in enumerate(classes):
        for s, k in zip(("train", "val", "test"), per_split, strict=True):
            for j in range(k):
                rel = f"{cdir}/{s}_{j}{ext}"
                _img(root / image_dir / rel)
                split[s].append([rel, label, cname])
    (root / folder).mkdir(parents=True, exist_ok=True)
    (root / folder / split_file).write_text(json.dumps(split))


def make_pets(root: Path) -> None:
    _split_json_dataset(root, "oxford_pets", "oxford_pets/images", "split_zhou_OxfordPets.json",
                        [("abyssinian", "abyssinian"), ("american_bulldog", "american_bulldog"),
                         ("boxer", "boxer")])


def make_caltech(root: Path) -> None:
    _split_json_dataset(root, "caltech-101", "caltech-101/101_ObjectCategories", "split_zhou_Caltech101.json",
                        [("accordion", "accordion"), ("airplanes", "airplane"), ("Faces", "Faces"),
                         ("yin_yang", "yin_yang")])


def make_eurosat(root: Path, raw_names: bool = False) -> None:
    names = [("AnnualCrop", "Annual Crop Land"), ("Forest", "Forest"), ("SeaLake", "Sea or Lake")]
    _split_json_dataset(root, "eurosat", "eurosat/2750", "split_zhou_EuroSAT.json",
                        [(d, d if raw_names else n) for d, n in names])


def make_dtd(root: Path, nested: bool = False) -> None:
    base = "dtd/dtd" if nested else "dtd"
    _split_json_dataset(root, base, f"{base}/images", "split_zhou_DescribableTextures.json",
                        [("banded", "banded"), ("blotchy", "blotchy")], per_split=(3, 2, 2))


def make_cars(root: Path) -> None:
    split: dict[str, list] = {"train": [], "val": [], "test": []}
    for label, cname in enumerate(["2012 Tesla Model S", "2000 AM General Hummer SUV"]):
        for s, d in (("train", "cars_train"), ("val", "cars_train"), ("test", "cars_test")):
            rel = f"{d}/{s}{label:05d}.jpg"
            _img(root / "stanford_cars" / rel)
            split[s].append([rel, label, cname])
    (root / "stanford_cars" / "split_zhou_StanfordCars.json").write_text(json.dumps(split))


def make_aircraft(root: Path) -> None:
    d = root / "fgvc_aircraft"
    variants = ["707-320", "A300B4", "Cessna 172"]
    (d / "images").mkdir(parents=True)
    (d / "variants.txt").write_text("\n".join(variants) + "\n")
    n = 0
    for s, k in (("train", 2), ("val", 1), ("test", 1)):
        lines = []
        for v in variants:
            for _ in range(k):
                n += 1
                image_id = f"{1000000 + n:07d}"
                _img(d / "images" / f"{image_id}.jpg")
                lines.append(f"{image_id} {v}")
        (d / f"images_variant_{s}.txt").write_text("\n".join(lines) + "\n")


IMAGENET = [("n01440764", "tench"), ("n01443537", "goldfish"), ("n01484850", "great white shark"),
            ("n01491361", "tiger shark")]


def _classnames_txt(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # deliberately not sorted: labels follow sorted WordNet ids, as in CoOp
    path.write_text("".join(f"{w} {c}\n" for w, c in reversed(IMAGENET)))


def make_imagenet(root: Path) -> None:
    _classnames_txt(root / "imagenet" / "classnames.txt")
    for s, k in (("train", 3), ("val", 2)):
        for w, _ in IMAGENET:
            for j in range(k):
                _img(root / "imagenet" / "images" / s / w / f"{w}_{j}.JPEG")


def make_imagenet_a(root: Path) -> None:
    d = root / "imagenet-adversarial"
    _classnames_txt(d / "classnames.txt")
    for w in ("n01443537", "n01491361"):
        for j in range(2):
            _img(d / "imagenet-a" / w / f"{j}.jpg")
    (d / "imagenet-a" / "README.txt").write_text("readme\n")


def make_imagenet_v2(root: Path) -> None:
    d = root / "imagenetv2" / "imagenetv2-matched-frequency-format-val"
    for i in range(len(IMAGENET)):
        _img(d / str(i) / f"{i}a.jpeg")


# ------------------------------------------------------------------------------------------------- loading


def test_oxford_pets_loads_with_clean_classnames(tmp_path: Path) -> None:
    make_pets(tmp_path)
    ds = load_standard("oxford_pets", tmp_path, "train")
    assert ds.name == "oxford_pets" and ds.split == "train"
    assert ds.classnames == ["abyssinian", "american bulldog", "boxer"]
    assert len(ds) == 6 and sorted(set(ds.labels)) == [0, 1, 2]
    assert all(Path(p).is_file() for p, _ in ds.samples)
    img, label = ds[0]
    assert img.size == (4, 4) and label == 0
    assert len(load_standard("OxfordPets", tmp_path, "test")) == 3  # CoOp's name is accepted too


def test_caltech_and_eurosat_use_coop_classnames(tmp_path: Path) -> None:
    make_caltech(tmp_path)
    make_eurosat(tmp_path)
    cal = load_standard("caltech101", tmp_path, "val")
    assert cal.classnames == ["accordion", "airplane", "face", "yin yang"]
    assert len(cal) == 4
    eu = load_standard("eurosat", tmp_path, "test")
    assert eu.classnames == ["Annual Crop Land", "Forest", "Sea or Lake"]


def test_eurosat_raw_folder_names_are_mapped(tmp_path: Path) -> None:
    make_eurosat(tmp_path, raw_names=True)
    assert load_standard("eurosat", tmp_path, "train").classnames == ["Annual Crop Land", "Forest", "Sea or Lake"]


@pytest.mark.parametrize("nested", [False, True])
def test_dtd_both_layouts(tmp_path: Path, nested: bool) -> None:
    make_dtd(tmp_path, nested=nested)
    ds = load_standard("dtd", tmp_path, "train")
    assert ds.classnames == ["banded", "blotchy"] and len(ds) == 6


def test_stanford_cars_paths_relative_to_dataset_folder(tmp_path: Path) -> None:
    make_cars(tmp_path)
    ds = load_standard("stanford_cars", tmp_path, "test")
    assert ds.classnames == ["2012 Tesla Model S", "2000 AM General Hummer SUV"]
    assert all("/stanford_cars/cars_test/" in p for p, _ in ds.samples)


def test_fgvc_aircraft(tmp_path: Path) -> None:
    make_aircraft(tmp_path)
    tr = load_standard("fgvc_aircraft", tmp_path, "train")
    assert tr.classnames == ["707-320", "A300B4", "Cessna 172"]
    assert len(tr) == 6 and tr.labels == [0, 0, 1, 1, 2, 2]
    assert len(load_standard("fgvc_aircraft", tmp_path, "test")) == 3


def test_imagenet_train_val_test(tmp_path: Path) -> None:
    make_imagenet(tmp_path)
    tr = load_standard("imagenet", tmp_path, "train")
    assert tr.classnames == ["tench", "goldfish", "great white shark", "tiger shark"]
    assert len(tr) == 12 and tr.labels[:3] == [0, 0, 0] and tr.labels[-1] == 3
    te = load_standard("imagenet", tmp_path, "test")
    va = load_standard("imagenet", tmp_path, "val")
    assert len(te) == len(va) == 8 and te.samples == va.samples  # CoOp: the val set is the test set
    assert load_image(te.samples[0][0]).size == (4, 4)


def test_imagenet_a_subset_maps_to_imagenet_names(tmp_path: Path) -> None:
    make_imagenet_a(tmp_path)
    ds = load_standard("imagenet_a", tmp_path, "test")
    assert ds.classnames == ["goldfish", "tiger shark"]
    assert ds.labels == [0, 0, 1, 1]
    assert ds.extra["imagenet_indices"] == [1, 3]
    with pytest.raises(GramvlError, match="test-only"):
        load_standard("imagenet_a", tmp_path, "train")


def test_imagenet_v2_falls_back_to_imagenet_classnames(tmp_path: Path) -> None:
    make_imagenet_v2(tmp_path)
    with pytest.raises(GramvlError, match=r"imagenetv2/classnames\.txt is missing"):
        load_standard("imagenet_v2", tmp_path, "test")
    _classnames_txt(tmp_path / "imagenet" / "classnames.txt")
    ds = load_standard("imagenet-v2", tmp_path, "test")
    assert ds.num_classes == 4 and ds.labels == [0, 1, 2, 3]


def test_imagenet_flat_val_folder_is_explained(tmp_path: Path) -> None:
    _classnames_txt(tmp_path / "imagenet" / "classnames.txt")
    _img(tmp_path / "imagenet" / "images" / "train" / "n01440764" / "a.JPEG")
    _img(tmp_path / "imagenet" / "images" / "val" / "ILSVRC2012_val_00000001.JPEG")
    with pytest.raises(GramvlError, match="holds 1 images directly"):
        load_standard("imagenet", tmp_path, "val")


SPLIT_JSON = [n for n, s in STANDARD_DATASETS.items() if s.kind == "split_json" and n != "stanford_cars"]


@pytest.mark.parametrize("name", SPLIT_JSON)
def test_every_split_file_dataset_loads_in_its_documented_layout(tmp_path: Path, name: str) -> None:
    spec = STANDARD_DATASETS[name]
    _split_json_dataset(tmp_path, spec.folder, spec.image_dirs[0], Path(spec.split_files[0]).name,
                        [("class_a", "class_a"), ("b", "b")], ext=".png")
    sizes = {s: len(load_standard(name, tmp_path, s)) for s in ("train", "val", "test")}
    assert sizes == {"train": 4, "val": 2, "test": 2}
    assert load_standard(name, tmp_path, "train").classnames[1] == "b"


@pytest.mark.parametrize(("name", "folder"), [("imagenet_sketch", "imagenet-sketch/images"),
                                              ("imagenet_r", "imagenet-rendition/imagenet-r")])
def test_sketch_and_rendition(tmp_path: Path, name: str, folder: str) -> None:
    _classnames_txt(tmp_path / folder.split("/")[0] / "classnames.txt")
    for w in ("n01440764", "n01484850"):
        _img(tmp_path / folder / w / "x.jpg")
    ds = load_standard(name, tmp_path, "test")
    if name == "imagenet_sketch":  # ImageNet's 1000-class label space
        assert ds.num_classes == 4 and ds.labels == [0, 2]
    else:  # 200-class subset, relabelled
        assert ds.classnames == ["tench", "great white shark"] and ds.labels == [0, 1]


# --------------------------------------------------------------------------------------------- failures


def test_missing_split_file_names_the_file(tmp_path: Path) -> None:
    make_pets(tmp_path)
    split = tmp_path / "oxford_pets" / "split_zhou_OxfordPets.json"
    split.unlink()
    with pytest.raises(GramvlError) as e:
        load_standard("oxford_pets", tmp_path, "train")
    msg = str(e.value)
    assert f"split file {split} is missing" in msg and "docs/datasets.md" in msg


def test_missing_image_folder_names_the_folder(tmp_path: Path) -> None:
    make_eurosat(tmp_path)
    (tmp_path / "eurosat" / "2750").rename(tmp_path / "eurosat" / "elsewhere")
    with pytest.raises(GramvlError, match=r"image folder .*eurosat/2750 is missing"):
        load_standard("eurosat", tmp_path, "train")


def test_missing_dataset_folder(tmp_path: Path) -> None:
    with pytest.raises(GramvlError, match=r"dataset folder .*caltech-101 is missing"):
        load_standard("caltech101", tmp_path, "train")


def test_image_listed_but_absent_is_reported_with_count(tmp_path: Path) -> None:
    make_pets(tmp_path)
    gone = sorted((tmp_path / "oxford_pets" / "images" / "boxer").glob("train_*.jpg"))
    for p in gone:
        p.unlink()
    with pytest.raises(GramvlError) as e:
        load_standard("oxford_pets", tmp_path, "train")
    msg = str(e.value)
    assert "2 of 6 images listed in" in msg and "boxer/train_0.jpg" in msg
    assert len(load_standard("oxford_pets", tmp_path, "test")) == 3  # other splits still load


def test_malformed_split_file(tmp_path: Path) -> None:
    make_pets(tmp_path)
    (tmp_path / "oxford_pets" / "split_zhou_OxfordPets.json").write_text('{"train": [["a.jpg", 0]]}')
    with pytest.raises(GramvlError, match="wrong format"):
        load_standard("oxford_pets", tmp_path, "train")
    (tmp_path / "oxford_pets" / "split_zhou_OxfordPets.json").write_text("{not json")
    with pytest.raises(GramvlError, match="not valid JSON"):
        load_standard("oxford_pets", tmp_path, "train")


def test_unknown_name_and_split(tmp_path: Path) -> None:
    with pytest.raises(GramvlError, match="unknown standard dataset"):
        resolve_name("mnist")
    make_pets(tmp_path)
    with pytest.raises(GramvlError, match="unknown split"):
        load_standard("oxford_pets", tmp_path, "trainval")


def test_registry_has_the_fifteen_canonical_names() -> None:
    assert list(STANDARD_DATASETS) == [
        "imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101", "fgvc_aircraft",
        "sun397", "dtd", "eurosat", "ucf101", "imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r"]


# ------------------------------------------------------------------------------------------- check_data


def test_check_data_reports_ok_missing_and_absent(tmp_path: Path) -> None:
    make_pets(tmp_path)
    make_imagenet(tmp_path)
    make_dtd(tmp_path)
    (tmp_path / "dtd" / "split_zhou_DescribableTextures.json").unlink()
    make_aircraft(tmp_path)
    (tmp_path / "fgvc_aircraft" / "images" / "1000001.jpg").unlink()
    reports = {r.name: r for r in check_data(tmp_path)}
    assert len(reports) == 15
    pets = reports["oxford_pets"]
    assert pets.status == "ok" and pets.counts == {"train": 6, "val": 3, "test": 3} and pets.num_classes == 3
    assert reports["imagenet"].counts == {"train": 12, "val": 8, "test": 8}
    dtd = reports["dtd"]
    assert dtd.status == "incomplete"
    assert [m.what for m in dtd.missing] == ["split file"]
    assert dtd.missing[0].path == tmp_path / "dtd" / "split_zhou_DescribableTextures.json"
    assert reports["fgvc_aircraft"].status == "error" and "1000001.jpg" in reports["fgvc_aircraft"].error
    assert reports["sun397"].status == "not found"
    text = format_report(list(reports.values()))
    assert "OxfordPets" in text and "2 of 15 datasets ready" in text
    assert "split_zhou_DescribableTextures.json is missing" in text
    assert "Not found:" in text and "SUN397 (sun397/)" in text


def test_check_data_missing_root(tmp_path: Path) -> None:
    with pytest.raises(GramvlError, match="does not exist"):
        check_data(tmp_path / "nope")
