"""Pre-training loss targets: shared captions are positives for every emoji that has them."""

import torch

from gramvl.pretrain import caption_positive_table, positive_matrix


def test_caption_positive_table_groups_identical_captions_by_concept():
    caps = ["a flag.", "flag of france", "a flag.", "flag of peru", "a dog.", "a flag."]
    owner = [0, 0, 1, 1, 2, 3]          # pairs 0..3
    concept_of_pair = [10, 11, 12, 10]  # pair 3 is another style of concept 10
    ids, members = caption_positive_table(caps, owner, concept_of_pair)
    assert ids.tolist() == [0, 1, 0, 2, 3, 0]
    assert members[0].tolist() == [10, 11] and members[1].tolist() == [10] and members[3].tolist() == [12]


def test_positive_matrix_marks_same_concept_and_shared_captions_only():
    caps = ["a flag.", "flag of france", "a flag.", "flag of peru", "a dog."]
    ids, members = caption_positive_table(caps, [0, 0, 1, 1, 2], [0, 1, 2])
    concepts = torch.tensor([0, 1, 2, 0])     # batch: images of concepts 0, 1, 2, 0
    cap_ids = ids[torch.tensor([1, 0, 4, 2])]  # texts: "flag of france", "a flag.", "a dog.", "a flag."
    pos = positive_matrix(concepts, cap_ids, members)
    expect = torch.tensor([
        [1, 1, 0, 1],  # image of concept 0: its own text, and both "a flag." texts
        [0, 1, 0, 1],  # concept 1 (peru): the "a flag." texts, not "flag of france"
        [0, 0, 1, 0],  # the dog matches only "a dog."
        [1, 1, 0, 1],
    ], dtype=torch.float32)
    assert torch.equal(pos, expect)
    concept_only = positive_matrix(concepts, cap_ids, None)
    assert torch.equal(concept_only, (concepts[:, None] == concepts[None, :]).float())
    assert concept_only[1, 3] == 0  # without caption positives "a flag." is a negative for peru


def test_sample_pairs_mixes_icons_at_the_requested_share():
    from gramvl.pretrain import sample_pairs

    g = torch.Generator().manual_seed(0)
    only = sample_pairs(g, 4096, 100, 500, 0.0)
    assert only.max() < 100
    idx = sample_pairs(torch.Generator().manual_seed(1), 4096, 100, 500, 0.4)
    share = (idx >= 100).float().mean().item()
    assert 0.37 < share < 0.43 and idx.max() < 600
    again = sample_pairs(torch.Generator().manual_seed(1), 4096, 100, 500, 0.4)
    assert torch.equal(idx, again)


def test_init_loads_a_checkpoint_and_refuses_another_architecture(tmp_path):
    import dataclasses

    import pytest

    from gramvl.backbone import build_small_clip
    from gramvl.errors import GramvlError
    from gramvl.io import save_tensors
    from gramvl.pretrain import PretrainConfig, _sidecar, load_init

    cfg = PretrainConfig(vision_layers=1, text_layers=1, vision_width=32, text_width=32, embed_dim=16,
                         text_heads=2, vision_head_width=16)
    side = _sidecar(cfg, {})
    torch.manual_seed(0)
    src = build_small_clip(side)
    save_tensors(tmp_path / "a.safetensors", {k: v for k, v in src.state_dict().items()
                                              if not k.endswith("attn_mask")}, side)
    torch.manual_seed(1)
    dst = build_small_clip(side)
    ident, meta = load_init(dst, tmp_path / "a.safetensors", side["model_cfg"])
    assert meta["model_cfg"] == side["model_cfg"]
    assert ident.startswith("a.safetensors:")
    for (k, a), b in zip(src.state_dict().items(), dst.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    other = _sidecar(dataclasses.replace(cfg, text_layers=2), {})
    with pytest.raises(GramvlError, match="another architecture"):
        load_init(build_small_clip(other), tmp_path / "a.safetensors", other["model_cfg"])
    with pytest.raises(GramvlError, match="does not exist"):
        load_init(dst, tmp_path / "missing.safetensors", side["model_cfg"])


def test_photo_augmentation_draws_objects_on_a_dark_background():
    from gramvl.pretrain import augment

    x = torch.full((64, 3, 40, 40), 255, dtype=torch.uint8)
    x[:, :, 12:28, 12:28] = 160                      # a mid-grey object on white
    plain = augment(x, 32, torch.Generator().manual_seed(0))
    again = augment(x, 32, torch.Generator().manual_seed(0), photo=0.0)
    assert torch.equal(plain, again)                 # photo = 0 keeps the packaged recipe's random stream
    photo = augment(x, 32, torch.Generator().manual_seed(0), photo=1.0)
    corners = photo[:, :, :3, :3].mean((1, 2, 3))
    centre = photo[:, :, 14:18, 14:18].mean((1, 2, 3))
    # every image that is not line art (line art: 20%) is an object lighter than its near-black background
    dark = corners < 0.15
    assert dark.float().mean() > 0.6 and (centre[dark] > corners[dark] + 0.3).all()
    assert photo.min() >= 0 and photo.max() <= 1


def _tiny_run(tmp_path, monkeypatch, steps, eval_every=None, **kw):
    """pretrain() end to end on 6 fake pairs with a 1-layer model (no world needed)."""
    from PIL import Image

    import gramvl.data.world as world
    from gramvl.pretrain import PretrainConfig, pretrain

    pairs = []
    tmp_path.mkdir(parents=True, exist_ok=True)
    for i, (name, colour) in enumerate([("red apple", "red"), ("blue car", "blue"), ("green tree", "green")] * 2):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (40, 40), colour).save(path)
        pairs.append({"image": str(path), "name": name, "hexcode": name, "keywords": name.split()})
    monkeypatch.setattr(world, "load_pretrain_pairs", lambda: pairs)
    cfg = PretrainConfig(vision_layers=1, text_layers=1, vision_width=32, text_width=32, embed_dim=16,
                         text_heads=2, vision_head_width=16, steps=steps, batch_size=4, warmup=1,
                         eval_every=eval_every or steps, threads=1, **kw)
    return pretrain(cfg, tmp_path / "run", progress=False)


def _scale(path):
    from gramvl.io import load_tensors

    return torch.exp(load_tensors(path)[0]["logit_scale"].float()).item()


def test_logit_scale_init_sets_the_learned_scale_and_a_resume_keeps_the_trained_value(tmp_path, monkeypatch):
    import pytest

    from gramvl.errors import GramvlError

    # CLIP's own start is 1/0.07; --logit-scale-init 100 starts at CLIP's clamp; Adam moves it by <= lr per step
    default = _scale(_tiny_run(tmp_path / "a", monkeypatch, 2))
    assert abs(default - 1 / 0.07) < 1 / 0.07 * 0.03
    high = _scale(_tiny_run(tmp_path / "b", monkeypatch, 2, logit_scale_init=100.0))
    assert 100 * 0.97 < high <= 100.1  # best.safetensors is fp16
    # an interrupted run resumes from last.safetensors: the re-initialisation is not applied a second time, and
    # the result is the uninterrupted run's
    import gramvl.pretrain as pt
    from gramvl.io import load_tensors

    real_loss, calls = pt.contrastive_loss, []

    def crash_at_step_3(*a):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_loss(*a)

    monkeypatch.setattr(pt, "contrastive_loss", crash_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        _tiny_run(tmp_path / "b2", monkeypatch, 4, eval_every=1, logit_scale_init=100.0)
    monkeypatch.setattr(pt, "contrastive_loss", real_loss)
    resumed = _tiny_run(tmp_path / "b2", monkeypatch, 4, eval_every=1, logit_scale_init=100.0)
    fresh = _tiny_run(tmp_path / "c", monkeypatch, 4, eval_every=1, logit_scale_init=100.0)
    last_r = load_tensors(resumed.parent / "last.safetensors")[0]
    last_f = load_tensors(fresh.parent / "last.safetensors")[0]
    assert last_r["model.logit_scale"].item() == pytest.approx(last_f["model.logit_scale"].item(), abs=1e-6)
    # the scale learns at the ceiling too (a forward clamp(max=100) once froze it there: exp(log 100) > 100 in
    # float32, and the clamp cut its gradient)
    assert last_f["model.logit_scale"].exp().item() < 100.0
    scale_slot = max(int(k.split(".")[1]) for k in last_f if k.startswith("opt."))  # the last param group
    assert last_f[f"opt.{scale_slot}.exp_avg"].abs().item() > 0
    with pytest.raises(GramvlError, match="logit-scale-init"):
        _tiny_run(tmp_path / "d", monkeypatch, 1, logit_scale_init=250.0)


def test_unaugmented_batch_keeps_the_pairs_and_only_resizes_the_images(tmp_path, monkeypatch):
    import open_clip
    from PIL import Image

    import gramvl.data.world as world
    from gramvl.pretrain import Corpus, PretrainConfig

    pairs = []
    for i, (name, colour) in enumerate([("red apple", (255, 0, 0)), ("blue car", (0, 0, 255)),
                                        ("green tree", (0, 255, 0))]):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (40, 40), colour).save(path)
        pairs.append({"image": str(path), "name": name, "hexcode": name, "keywords": name.split()})
    monkeypatch.setattr(world, "load_pretrain_pairs", lambda: pairs)
    cfg = PretrainConfig(batch_size=6, image_size=32)
    corpus = Corpus(cfg, open_clip.SimpleTokenizer(context_length=cfg.context_length), progress=False)
    aug_imgs, aug_text, aug_pos = corpus.batch(5)
    imgs, text, pos = corpus.batch(5, augmented=False)
    assert torch.equal(text, aug_text) and torch.equal(pos, aug_pos)   # the same pairs and captions
    assert imgs.shape == aug_imgs.shape == (6, 3, 32, 32)
    # a flat colour stays that colour: the normalized pixels are the colour's, and none of the style changes
    mean, std = torch.tensor(cfg.mean).view(1, 3, 1, 1), torch.tensor(cfg.std).view(1, 3, 1, 1)
    rgb = (imgs * std + mean).mean((2, 3))
    assert torch.allclose(imgs.std((2, 3)), torch.zeros(6, 3), atol=1e-5)
    assert ((rgb.max(1).values - 1.0).abs() < 1e-4).all() and (rgb.min(1).values.abs() < 1e-4).all()
    assert not torch.allclose(imgs, aug_imgs)
    # batch_index names the rows of the same batch: each image has its pair's colour
    colours = torch.tensor([[1.0, 0, 0], [0, 0, 1.0], [0, 1.0, 0]])
    assert torch.allclose(rgb, colours[corpus.batch_index(5)], atol=1e-4)
    assert [corpus.pairs[i]["name"] for i in corpus.batch_index(5).tolist()] == [
        pairs[i]["name"] for i in corpus.batch_index(5).tolist()]


def test_pool_trains_on_a_fixed_subset_and_refuses_a_pool_smaller_than_a_batch(tmp_path, monkeypatch):
    import open_clip
    import pytest
    from PIL import Image

    import gramvl.data.world as world
    from gramvl.errors import GramvlError
    from gramvl.pretrain import Corpus, PretrainConfig

    pairs = []
    for i in range(12):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (40, 40), (20 * i, 0, 0)).save(path)
        pairs.append({"image": str(path), "name": f"thing {i}", "hexcode": f"h{i}", "keywords": ["thing"]})
    monkeypatch.setattr(world, "load_pretrain_pairs", lambda: pairs)
    tok = open_clip.SimpleTokenizer(context_length=32)
    corpus = Corpus(PretrainConfig(batch_size=4, pool=5, seed=3), tok, progress=False)
    pool = set(corpus.pool.tolist())
    assert len(pool) == 5 and pool <= set(range(12))
    drawn = set()
    for s in range(40):
        idx = corpus.batch_index(s).tolist()
        assert len(idx) == len(set(idx)) == 4   # distinct rows of the pool
        drawn |= set(idx)
    assert drawn == pool
    # the pool is a function of the seed: a resumed run trains on the same pool
    again = Corpus(PretrainConfig(batch_size=4, pool=5, seed=3), tok, progress=False)
    assert torch.equal(again.pool, corpus.pool)
    assert Corpus(PretrainConfig(batch_size=4), tok, progress=False).pool is None
    with pytest.raises(GramvlError, match="at least one batch"):
        Corpus(PretrainConfig(batch_size=4, pool=3), tok, progress=False)
    with pytest.raises(GramvlError, match="only 12 pairs"):
        Corpus(PretrainConfig(batch_size=4, pool=13), tok, progress=False)


def test_a_no_augment_pool_run_never_augments_and_records_its_batch_fit(tmp_path, monkeypatch):
    import json

    import gramvl.pretrain as pt

    def no_augmentation_expected(*a, **k):
        raise AssertionError("augment() called in a --no-augment run")

    monkeypatch.setattr(pt, "augment", no_augmentation_expected)
    best = _tiny_run(tmp_path, monkeypatch, 2, eval_every=1, pool=4, augment=False)
    history = json.loads((best.parent / "history.json").read_text())
    assert [h["step"] for h in history] == [1, 2]
    assert all(0.0 <= h["batch_top1"] <= 1.0 for h in history)
    # final.safetensors is the last step's weights as a loadable small CLIP (fp16, like best.safetensors)
    from gramvl.backbone import load_backbone
    from gramvl.io import load_tensors

    final = load_backbone(str(best.parent / "final.safetensors"))
    last = load_tensors(best.parent / "last.safetensors")[0]
    for k, v in final.model.state_dict().items():
        if f"model.{k}" in last and not k.endswith("attn_mask"):
            assert torch.equal(v, last[f"model.{k}"].half().float()), k


def test_logit_scale_lr_zero_holds_the_scale_while_the_rest_trains(tmp_path, monkeypatch):
    import pytest

    from gramvl.errors import GramvlError
    from gramvl.io import load_tensors

    held = _tiny_run(tmp_path / "held", monkeypatch, 3, eval_every=1, logit_scale_init=100.0, logit_scale_lr=0.0)
    free = _tiny_run(tmp_path / "free", monkeypatch, 3, eval_every=1, logit_scale_init=100.0)
    last_h = load_tensors(held.parent / "last.safetensors")[0]
    last_f = load_tensors(free.parent / "last.safetensors")[0]
    assert last_h["model.logit_scale"].item() == pytest.approx(torch.log(torch.tensor(100.0)).item(), abs=1e-6)
    assert last_f["model.logit_scale"].exp().item() < 99.9  # the default learns it (the same three steps)
    one = load_tensors(_tiny_run(tmp_path / "held1", monkeypatch, 1, logit_scale_init=100.0,
                                 logit_scale_lr=0.0).parent / "last.safetensors")[0]
    assert one["model.logit_scale"].item() == last_h["model.logit_scale"].item()
    moved = [k for k in last_h if k.startswith("model.") and k != "model.logit_scale"
             and not torch.equal(last_h[k], one[k])]
    assert len(moved) > 10  # the rest of the model trained on between step 1 and step 3
    with pytest.raises(GramvlError, match="logit-scale-lr"):
        _tiny_run(tmp_path / "bad", monkeypatch, 1, logit_scale_lr=-1.0)


def test_a_continued_run_with_its_parents_seed_warns_that_it_re_draws_the_parents_batches(tmp_path, monkeypatch):
    import warnings

    import pytest

    parent = _tiny_run(tmp_path / "p", monkeypatch, 2)
    with pytest.warns(UserWarning, match="re-draw the batches it trained on"):
        _tiny_run(tmp_path / "same", monkeypatch, 2, init=str(parent))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _tiny_run(tmp_path / "fresh", monkeypatch, 2, init=str(parent), seed=1)  # fresh batches: no warning
        _tiny_run(tmp_path / "mix", monkeypatch, 2, init=str(parent), icons=0.5)  # another batch mix: no warning
