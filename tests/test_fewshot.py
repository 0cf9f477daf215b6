"""Few-shot sampling, its cache, the base/new class split and the harmonic mean."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from gramvl.data.base import ImageDataset
from gramvl.data.fewshot import fewshot_cache_path, harmonic_mean, sample_few_shot, split_base_new
from gramvl.errors import GramvlError


def _dataset(per_class: list[int], name: str = "toy", split: str = "train") -> ImageDataset:
    samples = [(f"/data/{name}/c{y}/{j}.png", y) for y, k in enumerate(per_class) for j in range(k)]
    return ImageDataset(name=name, split=split, classnames=[f"class {y}" for y in range(len(per_class))],
                        samples=samples)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    h = tmp_path / "home"
    monkeypatch.setenv("GRAMVL_HOME", str(h))
    return h


def test_k_per_class_and_all_of_small_classes(home: Path) -> None:
    ds = _dataset([10, 3, 7, 1])
    fs = sample_few_shot(ds, shots=4, seed=1)
    assert Counter(fs.labels) == {0: 4, 1: 3, 2: 4, 3: 1}
    assert fs.classnames == ds.classnames and fs.split == "train"
    assert set(fs.samples) <= set(ds.samples) and len(set(fs.samples)) == len(fs)
    assert fs.name != ds.name and fs.key != ds.key  # feature caches never mix the subset and the full set


def test_fixed_seed_fixed_indices_and_seeds_differ(home: Path) -> None:
    ds = _dataset([20] * 5)
    a = sample_few_shot(ds, 2, seed=1, cache=False)
    b = sample_few_shot(ds, 2, seed=1, cache=False)
    c = sample_few_shot(ds, 2, seed=2, cache=False)
    assert a.samples == b.samples and a.extra["fewshot"]["indices"] == b.extra["fewshot"]["indices"]
    assert a.samples != c.samples
    assert a.extra["fewshot"]["indices"] == sorted(a.extra["fewshot"]["indices"])
    assert not home.exists() or not list(home.rglob("*.json"))  # cache=False writes nothing


def test_all_data_when_shots_not_positive(home: Path) -> None:
    ds = _dataset([3, 4])
    assert sample_few_shot(ds, -1, seed=1).samples == ds.samples
    assert sample_few_shot(ds, 0, seed=1).samples == ds.samples


def test_cache_lives_in_gramvl_home_and_is_reused(tmp_path: Path, home: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    ds = _dataset([8, 8, 8])
    fs = sample_few_shot(ds, 2, seed=3)
    path = fewshot_cache_path(ds, 2, 3)
    assert path.is_file() and path.parent == home / "cache" / "fewshot"
    assert not list(data_dir.iterdir())
    saved = json.loads(path.read_text())
    assert saved["indices"] == fs.extra["fewshot"]["indices"]
    assert saved["shots"] == 2 and saved["seed"] == 3 and saved["num_samples"] == 24
    # the cached indices are what a later call uses
    saved["indices"] = [0, 8, 16]
    path.write_text(json.dumps(saved))
    assert sample_few_shot(ds, 2, seed=3).samples == [ds.samples[0], ds.samples[8], ds.samples[16]]
    # a different sample list gets a different cache file
    other = _dataset([8, 8, 9])
    assert fewshot_cache_path(other, 2, 3) != path
    # a corrupt cache file is redrawn, not trusted
    path.write_text("{oops")
    assert sample_few_shot(ds, 2, seed=3).samples == fs.samples


def test_negative_seed_is_refused(home: Path) -> None:
    with pytest.raises(GramvlError, match="seed"):
        sample_few_shot(_dataset([3]), 1, seed=-5)


def test_base_new_odd_class_count_and_relabelling() -> None:
    ds = _dataset([2, 1, 3, 1, 2])
    base = split_base_new(ds, "base")
    new = split_base_new(ds, "new")
    assert base.classnames == ["class 0", "class 1", "class 2"] and base.num_classes == 3
    assert new.classnames == ["class 3", "class 4"] and new.num_classes == 2
    assert sorted(set(base.labels)) == [0, 1, 2] and sorted(set(new.labels)) == [0, 1]
    assert len(base) == 6 and len(new) == 3
    assert new.samples[0] == ("/data/toy/c3/0.png", 0) and new.samples[-1] == ("/data/toy/c4/1.png", 1)
    assert base.name == "toy@base" and new.name == "toy@new"
    assert split_base_new(ds, "all").samples == ds.samples
    even = _dataset([1] * 4)
    assert split_base_new(even, "base").num_classes == 2 and split_base_new(even, "new").num_classes == 2


def test_base_new_errors() -> None:
    with pytest.raises(GramvlError, match="unknown class part"):
        split_base_new(_dataset([1, 1]), "novel")
    with pytest.raises(GramvlError, match="too few"):
        split_base_new(_dataset([3]), "new")


def test_fewshot_then_base_new(home: Path) -> None:
    fs = split_base_new(sample_few_shot(_dataset([5] * 6), 2, seed=1), "new")
    assert Counter(fs.labels) == {0: 2, 1: 2, 2: 2} and fs.name.endswith("@new")


def test_harmonic_mean() -> None:
    assert harmonic_mean(0, 0) == 0.0
    assert harmonic_mean(80.0, 80.0) == pytest.approx(80.0)
    assert harmonic_mean(60.0, 90.0) == pytest.approx(72.0)
    assert harmonic_mean(100.0, 0.0) == 0.0
    assert harmonic_mean(0.5, 0.25) == pytest.approx(1 / 3)
