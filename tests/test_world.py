"""The embedded-world builder: renderer, captions, fetch errors, dataset layout on a fake source tree."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

import gramvl.data.world as world
from gramvl.data.base import load_folder
from gramvl.data.world import build as wb
from gramvl.data.world import sources as ws
from gramvl.data.world.captions import clean_filename, clean_sentence, clean_title, normalize_classname
from gramvl.data.world.render import SPLIT_IDS, instance_seed, render_instance
from gramvl.errors import GramvlError


def _art() -> Image.Image:
    im = Image.new("RGBA", (96, 96), (0, 0, 0, 0))
    d = ImageDraw.Draw(im)
    d.ellipse([10, 20, 80, 90], fill=(230, 60, 40, 255), outline=(0, 0, 0, 255), width=3)
    d.rectangle([44, 4, 52, 24], fill=(40, 160, 40, 255))
    return im


def test_render_is_deterministic_and_splits_differ():
    art = _art()
    seeds = {s: instance_seed("emoji-x", s, "apple", 0) for s in SPLIT_IDS}
    a = np.asarray(render_instance(art, seeds["train"]))
    b = np.asarray(render_instance(art, seeds["train"]))
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, np.asarray(render_instance(art, seeds["val"])))
    assert not np.array_equal(a, np.asarray(render_instance(art, seeds["test"])))
    by_split = {s: {instance_seed("emoji-x", s, c, i) for c in ("apple", "pear") for i in range(50)}
                for s in SPLIT_IDS}
    assert not (by_split["train"] & by_split["val"] or by_split["train"] & by_split["test"]
                or by_split["val"] & by_split["test"])
    assert all(len(v) == 100 for v in by_split.values())


def test_captions_and_classnames():
    assert clean_title("Red Apple") == "a red apple"
    assert clean_title("Owl") == "an owl"
    assert clean_title("Clipart by Nicu Buculei - big house") == "a big house"
    assert clean_title("") is None and clean_title("fc23 xq") is None
    assert clean_title("Lucchetto ottone") is None  # not English
    assert clean_filename("big_house_01") == "a big house"
    assert clean_filename("lucchetto_ottone_archite_01", "Architetto Francesco Rollandin") is None
    assert clean_filename("bunny_01", "Nobody") == "a bunny"
    assert clean_sentence("A \u201cSierra Beauty\u201d apple.") == "a sierra beauty apple"
    assert clean_sentence("A frog.") == "a frog"
    assert clean_sentence("") is None
    assert normalize_classname("Pi\u00f1ata") == "pinata"
    assert normalize_classname("woman\u2019s hat") == "woman's hat"
    assert normalize_classname("flag: Japan") == "flag japan"
    assert normalize_classname("T-Rex") == "t-rex"


def test_missing_package_names_it(monkeypatch, tmp_path):
    src = ws.SOURCE_BY_NAME["openmoji"]
    monkeypatch.setattr(ws, "fetch_command",
                        lambda s: ["sh", "-c", "echo 'npm error 404 Not Found' >&2; exit 1"])
    with pytest.raises(GramvlError, match=r"openmoji@17\.0\.0.*404 Not Found.*embedded world needs it"):
        ws.fetch_source(src, tmp_path)
    monkeypatch.setattr(ws, "fetch_command", lambda s: ["gramvl-no-such-program-xyz"])
    with pytest.raises(GramvlError, match="openmoji.*not installed"):
        ws.fetch_source(src, tmp_path)
    # a download whose checksum differs from the pin is refused
    monkeypatch.setattr(ws, "fetch_command", lambda s: ["sh", "-c", "echo x > openmoji-17.0.0.tgz"])
    with pytest.raises(GramvlError, match="openmoji.*differs from the pinned"):
        ws.fetch_source(src, tmp_path)


def test_build_world_fails_cleanly_and_is_idempotent(monkeypatch, tmp_path):
    monkeypatch.setenv("GRAMVL_HOME", str(tmp_path))
    monkeypatch.setattr(ws, "fetch_command", lambda s: ["sh", "-c", f"echo 'E: no {s.name}' >&2; exit 100"])
    with pytest.raises(GramvlError, match="emoji-datasource-google"):
        world.build_world(progress=False)
    wd = tmp_path / "world"
    assert not (wd / "MANIFEST.json").exists()
    with pytest.raises(GramvlError, match="gramvl world build"):
        world.load_embedded("emoji-animals", "test")
    with pytest.raises(GramvlError, match="gramvl world build"):
        world.load_pretrain_pairs()
    (wd / "pretrain").mkdir()  # a part without PART.json is incomplete
    with pytest.raises(GramvlError, match="not built"):
        world.load_pretrain_pairs()
    (wd / "MANIFEST.json").write_text(json.dumps({"builder_version": world.BUILDER_VERSION}))
    assert world.build_world(progress=False) == wd  # returns at once: fetch would fail
    assert world.world_info()["builder_version"] == world.BUILDER_VERSION


SVG = ('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 72 72"><{shape} fill="{fill}" stroke="#000" '
       'stroke-width="2"/></svg>')
SHAPES = {"1F436": ('circle cx="36" cy="36" r="20"', "dog face"),
          "1F431": ('rect x="14" y="20" width="44" height="30"', "cat face"),
          "1F42D": ('polygon points="36,10 62,60 10,60"', "mouse face"),
          "1F98A": ('ellipse cx="36" cy="36" rx="26" ry="12"', "fox")}


def _fake_tree(root: Path) -> ws.SourceTree:
    tree = ws.SourceTree(root)
    for variant, fill in (("color", "#e85"), ("black", "none")):
        d = tree.openmoji_svg_dir(variant)
        d.mkdir(parents=True)
        for hexcode, (shape, _) in SHAPES.items():
            (d / f"{hexcode}.svg").write_text(SVG.format(shape=shape, fill=fill))
        (d / "1F436-1F3FB.svg").write_text(SVG.format(shape=SHAPES["1F436"][0], fill=fill))
    tree.openmoji_csv.parent.mkdir(parents=True)
    lines = ["emoji,hexcode,group,subgroups,annotation,tags,openmoji_tags,openmoji_author,openmoji_date,"
             "skintone,skintone_combination,skintone_base_emoji,skintone_base_hexcode,unicode,order"]
    for hexcode, (_, name) in SHAPES.items():
        lines.append(f"x,{hexcode},animals-nature,animal-mammal,{name},,,,,,,,,1,1")
    lines.append("x,1F436-1F3FB,animals-nature,animal-mammal,dog face: light skin tone,,,,,1,,,,1,1")
    lines.append("x,1F98A,extras-openmoji,animal-mammal,fox again,,,,,,,,,1,1")
    tree.openmoji_csv.write_text("\n".join(lines) + "\n")
    entries = []
    for i, (hexcode, (_, name)) in enumerate(SHAPES.items()):
        if hexcode == "1F98A":  # not in emoji-datasource: must be left out
            continue
        entries.append({"name": name.upper(), "unified": hexcode, "non_qualified": None,
                        "image": f"{hexcode.lower()}.png", "short_names": [name.split()[0]],
                        "category": "Animals & Nature", "subcategory": "animal-mammal", "sort_order": i,
                        "has_img_google": True, "has_img_twitter": True})
    for style in wb.PRETRAIN_STYLES:
        tree.emoji_json(style).parent.mkdir(parents=True)
        tree.emoji_json(style).write_text(json.dumps(entries))
        tree.emoji_png_dir(style).mkdir(parents=True)
        for e in entries:
            _art().resize((64, 64)).save(tree.emoji_png_dir(style) / e["image"])
    cldr = tree.cldr_annotation_files[0]
    cldr.parent.mkdir(parents=True)
    cldr.write_text('<ldml><annotations><annotation cp="\U0001f436">dog | face | pet</annotation>'
                    '<annotation cp="\U0001f436" type="tts">dog face</annotation></annotations></ldml>')
    return tree


def test_fake_tree_datasets_and_pretrain(tmp_path):
    tree = _fake_tree(tmp_path / "src")
    out = tmp_path / "datasets"
    counts = {"train": 2, "val": 1, "test": 2}
    defs = {"emoji-animals": wb.EMOJI_DATASETS["emoji-animals"]}
    got = wb.build_emoji_datasets(tree, out, processes=2, progress=False, counts=counts, datasets=defs)
    assert got["emoji-animals"] == {"classes": 3, "train": 6, "val": 3, "test": 6}
    for name in ("emoji-animals", "emoji-animals-lineart"):
        info = json.loads((out / name / "info.json").read_text())
        assert info["classes"] == ["cat face", "dog face", "mouse face"]
        assert info["domain"] == ("lineart" if name.endswith("lineart") else "emoji")
        for split, n in counts.items():
            ds = load_folder(out / name, split)
            assert ds.classnames == info["classes"] and len(ds) == 3 * n
        assert (out / name / "train" / "dog_face" / "0001.png").is_file()
    a = np.asarray(Image.open(out / "emoji-animals" / "train" / "dog_face" / "0000.png"))
    b = np.asarray(Image.open(out / "emoji-animals" / "test" / "dog_face" / "0000.png"))
    assert a.shape == (64, 64, 3) and not np.array_equal(a, b)

    pre = tmp_path / "pretrain"
    c = wb.build_pretrain(tree, pre, processes=1, progress=False)
    assert c["pairs"] == 6 and c["by_style"] == {"google": 3, "twitter": 3}
    rows = [json.loads(line) for line in (pre / "pairs.jsonl").read_text().splitlines()]
    dog = next(r for r in rows if r["hexcode"] == "1F436" and r["style"] == "twitter")
    assert dog["keywords"] == ["dog", "face", "pet"] and dog["name"] == "dog face"
    assert dog["image"] == "pretrain/images/twitter/1f436.png"
    assert Image.open(pre / "images" / "twitter" / "1f436.png").mode == "RGB"


def test_fake_tree_meta(tmp_path):
    tree = ws.SourceTree(tmp_path / "src")
    oc = tree.openclipart_dir / "food"
    oc.mkdir(parents=True)
    meta = '<metadata><dc:title>{t}</dc:title></metadata>'
    svg = ('<svg xmlns="http://www.w3.org/2000/svg" xmlns:dc="http://purl.org/dc/elements/1.1/" '
           'width="40" height="20">{m}<rect width="40" height="20" fill="{c}"/></svg>')
    (oc / "red_apple_01.svg").write_text(svg.format(m=meta.format(t="Red Apple"), c="red"))
    (oc / "big_house_01.svg").write_text(svg.format(m="", c="blue"))
    (oc / "broken.svg").write_text("<svg><not closed")
    (oc / "zzqx_kkv.svg").write_text(svg.format(m="", c="green"))  # garbage name: dropped
    tp = tree.tuxpaint_dir / "animals"
    tp.mkdir(parents=True)
    _art().save(tp / "frog.png")
    (tp / "frog.txt").write_text("A frog.\nde.utf8=Ein Frosch.\n")
    c = wb.build_meta(tree, tmp_path / "meta", processes=1, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "meta" / "pairs.jsonl").read_text().splitlines()]
    assert sorted(r["caption"] for r in rows) == ["a big house", "a frog", "a red apple"]
    assert c["pairs"] == 3 and c["by_source"] == {"tuxpaint": 1, "openclipart": 2}
    for r in rows:
        im = Image.open(tmp_path / r["image"])
        assert im.size == (64, 64) and im.mode == "RGB"
    # the broken file is not in the pinned skip list: skipped, but counted and named
    broken = "openclipart-svg/usr/share/openclipart/svg/food/broken.svg"
    assert c["unexpected_failures"] == 1 and c["unexpected_failed_files"] == [broken]
    # pinned files are skipped without rendering (a valid one too), and the rest keep their image names
    apple = "openclipart-svg/usr/share/openclipart/svg/food/red_apple_01.svg"
    c2 = wb.build_meta(tree, tmp_path / "meta2", processes=1, progress=False, skip={broken, apple})
    rows2 = [json.loads(line) for line in (tmp_path / "meta2" / "pairs.jsonl").read_text().splitlines()]
    assert c2["skipped_pinned"] == 2 and c2["unexpected_failures"] == 0 and c2["pairs"] == 2
    assert sorted(r["caption"] for r in rows2) == ["a big house", "a frog"]
    assert {r["image"] for r in rows2} < {r["image"] for r in rows}


def test_meta_skip_list_is_packaged_and_a_missing_one_is_named(tmp_path):
    pinned = wb.read_meta_skip()
    assert len(pinned) > 100 and all(p.startswith(("openclipart-svg/", "tuxpaint-stamps-default/")) for p in pinned)
    with pytest.raises(GramvlError, match="skipped clip art is missing"):
        wb.read_meta_skip(tmp_path / "none.txt")


def test_real_world_if_built():
    try:
        names = world.embedded_dataset_names()
    except GramvlError:
        pytest.skip("the embedded world is not built (gramvl world build)")
    infos = {n: json.loads((world.world_dir() / "datasets" / n / "info.json").read_text()) for n in names}
    colour = [n for n, i in infos.items() if i["domain"] == "emoji" and len(i["classes"]) >= 40]
    assert len(colour) >= 6
    for n in colour:
        assert infos[f"{n}-lineart"]["classes"] == infos[n]["classes"]
        assert infos[f"{n}-lineart"]["domain"] == "lineart"
    fm = world.load_embedded("fashion-mnist", "test")
    assert fm.num_classes == 10 and len(fm) == 10000 and fm.domain == "photo"
    assert "ankle boot" in fm.classnames and "t-shirt" in fm.classnames


def test_icon_names_become_captions_or_are_skipped():
    assert wb.icon_caption("tshirt-crew-outline") == "tshirt crew"
    assert wb.icon_caption("chelsea-boot") == "chelsea boot"
    assert wb.icon_caption("shirt-filled") == "shirt"
    assert wb.icon_caption("bag-personal-plus") is None      # a user-interface overlay, not a thing
    assert wb.icon_caption("shirt-off") is None
    assert wb.icon_caption("a-b-2") is None                  # letters
    assert wb.icon_caption("brand-github") is None           # logos
    assert wb.icon_caption("numeric-1-box") is None
    # scoped npm names map to the archive file name npm pack writes
    assert ws.archive_stem("@iconify-json/mdi") == "iconify-json-mdi"
    assert ws._archive_glob(ws.SOURCE_BY_NAME["@iconify-json/mdi"]) == "iconify-json-mdi-*.tgz"
    assert ws.archive_stem("openmoji") == "openmoji"


def _fake_iconify(tree: ws.SourceTree, name: str, icons: dict, categories: dict | None = None) -> None:
    path = tree.iconify_json(name)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"prefix": name.rsplit("/", 1)[1], "icons": icons, "width": 24, "height": 24}))
    if categories:
        tree.iconify_metadata(name).write_text(json.dumps({"categories": categories}))


def test_fake_icon_sets_build_captioned_pictograms(tmp_path):
    tree = ws.SourceTree(tmp_path / "src")
    square = '<path fill="currentColor" d="M4 4h16v16H4z"/>'
    ring = '<circle cx="12" cy="12" r="8" fill="none" stroke="currentColor" stroke-width="2"/>'
    _fake_iconify(tree, "@iconify-json/aa", {"shirt": {"body": square}, "shirt-outline": {"body": ring},
                                             "shirt-thin": {"body": square},  # a third variant: over the cap
                                             "shirt-off": {"body": square}, "empty": {"body": "<g/>"},
                                             "smile": {"body": square}},
                  {"Clothing": ["shirt", "shirt-outline"], "Emoji": ["smile"]})
    _fake_iconify(tree, "@iconify-json/bb", {"shirt": {"body": ring, "width": 48, "height": 24}})
    out = tmp_path / "icons"
    c = wb.build_icons(tree, out, ["@iconify-json/aa", "@iconify-json/bb"], processes=1, progress=False)
    rows = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    # names are taken in sorted order, at most two variants of one name per set ("shirt-thin" sorts last)
    assert [(r["style"], r["icon"]) for r in rows] == [("aa", "shirt"), ("aa", "shirt-outline"), ("bb", "shirt")]
    assert {r["concept"] for r in rows} == {"icon:shirt"}          # one concept across variants and sets
    assert rows[0]["keywords"] == ["clothing"] and rows[2]["keywords"] == []
    assert c == {"pairs": 3, "concepts": 1, "by_set": {"aa": 2, "bb": 1}, "failed_renders": 1}  # "empty"
    im = np.asarray(Image.open(tmp_path / rows[0]["image"]))
    assert im.shape == (64, 64, 3) and im.min() == 0 and im.max() == 255   # black drawing on white
    (tree.iconify_json("@iconify-json/bb")).write_text("{}")
    with pytest.raises(GramvlError, match="not an iconify icon set"):
        wb.build_icons(tree, tmp_path / "icons2", ["@iconify-json/bb"], processes=1, progress=False)


def test_icon_corpus_not_built_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("GRAMVL_HOME", str(tmp_path))
    with pytest.raises(GramvlError, match=r"icon corpus is not built.*gramvl world build --icons"):
        world.load_icon_pairs()


_JOBS_SEEN: list[int] = []


def _count_job(x: int) -> int:
    """How many jobs this process ran before this one (its state as a later job sees it)."""
    _JOBS_SEEN.append(x)
    return len(_JOBS_SEEN) - 1


def test_fresh_jobs_see_no_state_left_by_earlier_jobs():
    # ordinary workers keep state from job to job; fresh ones start from this process's state every time
    assert sorted(wb.run_jobs(_count_job, list(range(6)), processes=1, progress=False)) == [0, 1, 2, 3, 4, 5]
    _JOBS_SEEN.clear()
    for processes in (1, 2):
        assert wb.run_jobs(_count_job, list(range(6)), processes=processes, progress=False, fresh=True) == [0] * 6
    assert _JOBS_SEEN == []


def test_svg_text_is_detected(tmp_path):
    cases = {"t.svg": '<svg><text x="1">A</text></svg>', "n.svg": '<svg:svg><svg:text>A</svg:text></svg:svg>',
             "p.svg": '<svg><path d="M0 0"/><g id="textured"/></svg>', "x.png": "<text>"}
    for name, body in cases.items():
        (tmp_path / name).write_text(body)
    found = {n for n in cases if wb._has_svg_text(str(tmp_path / n))}
    assert found == {"t.svg", "n.svg"}
