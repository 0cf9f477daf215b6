"""PromptSRC: its loss is CE plus the three weighted self-regulating terms, and the run ends on the Gaussian
aggregate of its prompts over epochs, also when it is interrupted and resumed."""

import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from gramvl.engine.evaluate import ENSEMBLE_TEMPLATES, zeroshot_weights
from gramvl.errors import GramvlError
from gramvl.prompts import build_host
from gramvl.prompts.base import Recipe
from gramvl.prompts.promptsrc import gpa_weights

NAMES = ["cat", "golden retriever", "t-shirt"]


def images(bb, n: int = 3, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"images": torch.randn(n, 3, bb.image_size, bb.image_size, generator=g)}


def test_loss_is_ce_plus_the_weighted_l1_and_kl_terms_against_the_frozen_model(small_random_backbone):
    bb = small_random_backbone
    host = build_host("promptsrc", bb, NAMES, {"src_text_weight": 3.0, "src_image_weight": 2.0,
                                                "src_logit_weight": 5.0})
    assert host.cfg.templates == list(ENSEMBLE_TEMPLATES)  # textual diversity: the teacher is an ensemble
    batch, labels = images(bb), torch.tensor([0, 1, 2])
    host.train()
    logits = host.logits(batch)
    loss = host.loss(logits, labels, batch)
    with torch.no_grad():
        img = host.image_features(batch)
        deep = list(host.text_deep.unbind(0))
        text = host.encode_classes(host.text_ctx, deep)
        teacher = zeroshot_weights(bb, NAMES, ENSEMBLE_TEMPLATES)
        frozen = F.normalize(bb.encode_image(batch["images"]), dim=-1)
        zs_logits = bb.logit_scale * frozen @ teacher.t()
        kl = F.kl_div(F.log_softmax(logits, 1), F.log_softmax(zs_logits, 1), reduction="sum",
                      log_target=True) / logits.numel()
        want = (F.cross_entropy(logits, labels) + 3.0 * F.l1_loss(text, teacher) + 2.0 * F.l1_loss(img, frozen)
                + 5.0 * kl)
    assert float(kl) > 0 and float(F.l1_loss(img, frozen)) > 0
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in host.slots().values())
    # with the three weights at zero it is IVLP's cross-entropy
    plain = build_host("promptsrc", bb, NAMES, {"src_text_weight": 0.0, "src_image_weight": 0.0,
                                                 "src_logit_weight": 0.0})
    plain.train()
    lg = plain.logits(batch)
    assert plain.loss(lg, labels, batch).item() == pytest.approx(F.cross_entropy(lg, labels).item(), rel=1e-6)


def test_loss_without_the_features_of_its_logits_is_a_clear_error(small_random_backbone):
    host = build_host("promptsrc", small_random_backbone, NAMES)
    batch = images(small_random_backbone)
    host.eval()
    with pytest.raises(GramvlError, match="needs the features behind its logits"):
        host.loss(host.logits(batch), torch.tensor([0, 1, 2]), batch)
    host.train()
    with pytest.raises(GramvlError, match="needs the features behind its logits"):
        host.loss(host.logits(batch).float() * 1.0, torch.tensor([0, 1, 2]), batch)  # not logits()'s tensor


def test_loss_uses_the_features_of_the_logits_it_is_given(small_random_backbone):
    # each logits tensor carries its own features: a second forward does not change the first one's loss, and the
    # host keeps no features once the logits are gone (GRAM's meta-training never calls loss())
    import gc
    import weakref

    bb = small_random_backbone
    host = build_host("promptsrc", bb, NAMES)
    host.train()
    b1, b2, labels = images(bb, seed=1), images(bb, seed=2), torch.tensor([0, 1, 2])
    want = host.loss(host.logits(b1), labels, b1).item()
    first = host.logits(b1)
    host.logits(b2)
    assert host.loss(first, labels, b1).item() == pytest.approx(want, rel=1e-6)
    img_ref = weakref.ref(first._src_features[0])
    del first
    gc.collect()
    assert img_ref() is None


def test_gpa_weights_are_a_normal_density_over_the_epochs_summing_to_one():
    w = gpa_weights(20, 0.75, 0.05)  # the paper's base-to-new setting: epoch 15, std 1
    assert sum(w) == pytest.approx(1.0) and max(range(20), key=w.__getitem__) == 14
    assert w[13] / w[14] == pytest.approx(math.exp(-0.5)) and w[15] / w[14] == pytest.approx(math.exp(-0.5))
    flat = gpa_weights(4, 0.5, 100.0)
    assert max(flat) - min(flat) < 1e-4  # a wide spread is nearly a plain average
    with pytest.raises(GramvlError, match="gpa_std > 0"):
        gpa_weights(5, 0.5, 0.0)
    with pytest.raises(GramvlError, match="zero weight"):
        gpa_weights(5, 100.0, 0.001)


def _toy(tmp_path):
    from gramvl.data.base import ImageDataset

    rows = []
    for i in range(6):
        p = tmp_path / f"{i}.png"
        Image.new("RGB", (16, 16), (40 * i, 255 - 30 * i, 90)).save(p)
        rows.append((str(p), i % 3))
    return ImageDataset("toy", "train", NAMES, rows)


class Stop(Exception):
    pass


def _train(bb, ds, ckpt, seen: list, stop_at: int | None = None) -> dict:
    """Three epochs of PromptSRC; `seen` gets the prompts of each epoch before aggregation."""
    from gramvl.engine.train import Trainer

    host = build_host("promptsrc", bb, NAMES, {"gpa_mean": 0.5, "gpa_std": 0.4})
    own = host.epoch_end

    def record(epoch, epochs):
        seen.append((epoch, {k: v.clone() for k, v in host.trainable_state().items()}))
        own(epoch, epochs)

    host.epoch_end = record

    def on_epoch(epoch):
        if epoch == stop_at:
            raise Stop

    recipe = Recipe(epochs=3, lr=0.05, batch_size=3, warmup_epochs=0)
    Trainer(host, recipe, seed=1, ckpt=ckpt, progress=False).fit(ds, on_epoch=on_epoch)
    return {k: v.clone() for k, v in host.trainable_state().items()}


def test_a_run_ends_on_the_gaussian_aggregate_of_its_epochs_and_a_resume_keeps_the_sum(small_random_backbone,
                                                                                      tmp_path):
    bb, ds = small_random_backbone, _toy(tmp_path)
    w = gpa_weights(3, 0.5, 0.4)
    seen: list = []
    final = _train(bb, ds, tmp_path / "a.safetensors", seen)
    assert [e for e, _ in seen] == [1, 2, 3]
    for k, v in final.items():
        want = sum(wi * s[k] for wi, (_, s) in zip(w, seen, strict=True))
        assert torch.allclose(v, want, atol=1e-6)
        assert not torch.allclose(v, seen[-1][1][k], atol=1e-6)  # not simply the last epoch's prompts
    # interrupted after epoch 2 (its checkpoint holds epoch 1 and the sum so far), then resumed
    ckpt, first, second = tmp_path / "b.safetensors", [], []
    with pytest.raises(Stop):
        _train(bb, ds, ckpt, first, stop_at=2)
    from gramvl.io import load_tensors

    saved, meta = load_tensors(ckpt)
    assert meta["epoch"] == 1 and any(k.startswith("run.gpa.") for k in saved)
    final = _train(bb, ds, ckpt, second)
    assert [e for e, _ in second] == [2, 3]
    states = [first[0][1], second[0][1], second[1][1]]
    for k, v in final.items():
        want = sum(wi * s[k] for wi, s in zip(w, states, strict=True))
        assert torch.allclose(v, want, atol=1e-6)


def test_gpa_off_keeps_the_last_epochs_prompts_and_run_state_is_checked(small_random_backbone):
    bb = small_random_backbone
    host = build_host("promptsrc", bb, NAMES, {"gpa_std": 0.0})
    before = {k: v.clone() for k, v in host.trainable_state().items()}
    host.epoch_end(1, 1)
    assert all(torch.equal(before[k], v) for k, v in host.trainable_state().items()) and host.run_state() == {}
    with pytest.raises(GramvlError, match="does not match PromptSRC's prompts"):
        host.load_run_state({"gpa.text_ctx": torch.zeros(4, bb.text_width)})
    coop = build_host("coop", bb, NAMES)
    with pytest.raises(GramvlError, match="keeps no run state"):
        coop.load_run_state({"gpa.text_ctx": torch.zeros(1)})


def test_unigram_meta_trains_promptsrcs_text_and_visual_slots_and_attaches_to_a_run(small_random_backbone,
                                                                                    tmp_path):
    from types import SimpleNamespace

    from gramvl.engine.train import Trainer
    from gramvl.gram.attach import attach
    from gramvl.gram.meta import CorpusBatches, MetaConfig, meta_train

    bb, ds = small_random_backbone, _toy(tmp_path)
    paths = [p for p, _ in ds.samples] * 2

    class Sampler:
        def sample(self, rng):
            idx = rng.permutation(len(paths))
            return SimpleNamespace(classnames=NAMES, support_idx=idx[:3], support_labels=[0, 1, 2],
                                   query_idx=idx[3:6], query_labels=[0, 1, 2], shift_idx=None)

    feats = torch.zeros(len(paths), bb.embed_dim)
    cfg = MetaConfig(host="promptsrc", unigram=True, steps=2, meta_batch=2, second_order=False,
                     checkpoint_every=100)
    out = meta_train(cfg, build_host("promptsrc", bb, NAMES), Sampler(),
                     CorpusBatches(feats, paths, bb, need_images=True), tmp_path / "gram.safetensors",
                     progress=False)
    host = build_host("promptsrc", bb, NAMES)
    info = attach(host, out)
    assert set(info["init"]) == set(info["regulated"]) == {"text_ctx", "text_deep", "vis_ctx", "vis_deep"}
    start = {k: v.detach().clone() for k, v in host.slots().items()}
    Trainer(host, Recipe(epochs=2, lr=0.05, batch_size=3, warmup_epochs=0), seed=1, progress=False).fit(ds)
    assert all(not torch.equal(start[k], v) for k, v in host.slots().items())


def test_protocols_run_the_papers_config_of_each_protocol_and_explicit_options_win(small_random_backbone):
    from gramvl.engine.protocols import ProtocolConfig, _train_cfg

    bb = small_random_backbone

    def cfg(protocol, method="promptsrc", **kw):
        return _train_cfg(ProtocolConfig(protocol=protocol, method=method, **kw), bb, "emoji-nature", 16, 1, "all")

    assert cfg("base2new").epochs is None and cfg("base2new").host == {"seed": 1}  # the default: base-to-new's
    few = cfg("fewshot")
    assert few.epochs == 50 and few.host == {"gpa_mean": 0.6, "gpa_std": 0.6, "seed": 1}
    xd = cfg("xd")
    assert xd.host["depth"] == 1 and xd.host["vis_depth"] == 2 and xd.host["gpa_mean"] == 0.3  # 3 of 12 layers
    assert cfg("dg").host == xd.host
    mine = cfg("fewshot", epochs=7, host={"gpa_std": 0.1})
    assert mine.epochs == 7 and mine.host["gpa_std"] == 0.1 and mine.host["gpa_mean"] == 0.6
    for method in ("coop", "ivlp", "maple"):  # other hosts run their defaults everywhere
        assert cfg("fewshot", method).epochs is None and cfg("xd", method).host == {"seed": 1}
    host = build_host("promptsrc", bb, NAMES, xd.host)
    assert "text_deep" not in host.slots() and host.vis_deep.shape[0] == 1
