"""Tiny runs for tests/test_dist.py, executed twice: as one process (the reference) and under
`torchrun --nproc_per_node 2` (gloo). Usage: python _dist_worker.py OUT DATA (DATA made by make_folder). Rank 0 saves what it trained and
predicted to OUT/results.safetensors; every rank logs the files it wrote to OUT/writes_rank<r>.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

CLASSES = ("red apple", "blue car", "green tree")


def make_folder(root: Path) -> Path:
    """A folder dataset: 3 classes; 5 train, 2 val and 3 test images each (odd totals on purpose)."""
    rng = np.random.default_rng(0)
    for split, per in (("train", 5), ("val", 2), ("test", 3)):
        for c in CLASSES:
            d = root / split / c.replace(" ", "_")
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per):
                Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


def tiny_backbone():
    from gramvl.backbone import Backbone, build_small_clip, small_tokenizer
    from gramvl.pretrain import PretrainConfig, _sidecar

    cfg = _sidecar(PretrainConfig(vision_layers=2, text_layers=2, vision_width=64, text_width=64, embed_dim=64,
                                  vision_head_width=32, text_heads=2), {})
    torch.manual_seed(0)
    return Backbone(build_small_clip(cfg), small_tokenizer(cfg), "gramvl-small:ddp-test", meta=cfg)


def regulator_artifact(path: Path, host) -> Path:
    """A GRAM artifact whose ψ is far from the identity (so ψ(sum) != sum of ψ's shows)."""
    from gramvl.gram.meta import ARTIFACT_FORMAT
    from gramvl.gram.regulator import RegulatorSet
    from gramvl.io import save_tensors

    slot = host.slots()["text_ctx"]
    g = torch.Generator().manual_seed(3)
    psi = RegulatorSet({"text": slot.shape[-1]}, rank=8)
    with torch.no_grad():
        psi.regs["text"].up.weight.copy_(torch.randn(psi.regs["text"].up.weight.shape, generator=g) * 2)
        psi.regs["text"].gate.fill_(-3.0)
    tensors = {"theta.text_ctx": slot.detach() + 0.05 * torch.randn(slot.shape, generator=g)}
    tensors.update({f"psi.{k}": v for k, v in psi.state_dict().items()})
    save_tensors(path, tensors, {"format": ARTIFACT_FORMAT, "backbone": host.bb.ident, "host": host.name,
                                 "regulator": psi.config(), "slots": {"text_ctx": list(slot.shape)}})
    return path


class TinySampler:
    """Meta-tasks over a random feature corpus (every draw from the numpy Generator it is given)."""

    def sample(self, rng):
        idx = rng.permutation(40)
        return SimpleNamespace(classnames=list(CLASSES), support_idx=idx[:6], support_labels=[0, 1, 2] * 2,
                               query_idx=idx[6:12], query_labels=[0, 1, 2] * 2,
                               classnames_shift=["dog", "cat", "fish"], shift_idx=idx[12:18],
                               shift_labels=[2, 1, 0] * 2)


def trained(host, bb, ds, recipe, ckpt=None, on_epoch=None):
    from gramvl.engine.train import Trainer

    tr = Trainer(host, recipe, seed=1, ckpt=ckpt, progress=False, identity={"run": "resume"})
    info = tr.fit(ds, on_epoch=on_epoch)
    return info, tr.history


def run_all(out: Path, root: Path) -> None:
    from gramvl import dist, io
    from gramvl.data.registry import get_dataset
    from gramvl.prompts import build_host
    from gramvl.prompts.base import Recipe

    writes: list[str] = []
    original = io._atomic_replace

    def logged(path, write):
        writes.append(str(path))
        return original(path, write)

    io._atomic_replace = logged
    data = f"folder:{root}"
    train, test = get_dataset(data, "train"), get_dataset(data, "test")
    bb = tiny_backbone()
    res: dict[str, torch.Tensor] = {}
    meta: dict = {}
    recipe = Recipe(epochs=2, lr=0.5, batch_size=7, train_views=2, warmup_epochs=0)
    work = out / "runs"

    # test-transform features, encoded in per-rank shards under torchrun (9 images: batches of 4 + 1 on rank 0 and
    # 4 on rank 1, against 4 + 4 + 1 in one process)
    from gramvl.data.features import image_features

    res["features.test"] = image_features(bb, test, batch_size=4, progress=False, cache=False)[0]

    # CoOp (frozen image side, cached feature views); global batch 7 over 15 images -> slices of 4 and 3
    host = build_host("coop", bb, train.classnames, {"n_ctx": 4, "ctx_init": ""})
    info, hist = trained(host, bb, train, recipe)
    res["coop.text_ctx"] = host.text_ctx.detach().clone()
    meta["coop.history"] = hist
    from gramvl.engine.train import predict

    logits, labels = predict(host, test)
    res["coop.logits"], res["coop.labels"] = logits, labels

    # CoOp + a strongly nonlinear GRAM regulator, and ProGrad (projected gradients) + the same regulator
    from gramvl.gram.attach import attach

    for name in ("coop", "prograd"):
        host = build_host(name, bb, train.classnames, {"n_ctx": 4, "ctx_init": ""})
        art = regulator_artifact(work / f"gram_{name}.safetensors", host) if dist.is_main() else None
        art = dist.broadcast_object(str(art) if art else None)
        attach(host, art)
        trained(host, bb, train, recipe)
        res[f"{name}_gram.text_ctx"] = host.text_ctx.detach().clone()

    # VPT (images through the trainable encoder: shared augmentation stream, sharded forward/backward)
    host = build_host("vpt", bb, train.classnames, {"n_vis_ctx": 2})
    trained(host, bb, train, Recipe(epochs=1, lr=0.5, batch_size=5, warmup_epochs=0))
    res["vpt.vis_ctx"] = next(iter(host.slots().values())).detach().clone()
    logits, labels = predict(host, test)
    res["vpt.logits"], res["vpt.labels"] = logits, labels

    # resume: interrupted in epoch 2 of 3 (checkpoint of epoch 1), then a fresh trainer finishes the run
    def stop(epoch):
        if epoch == 2:
            raise KeyboardInterrupt

    r3 = Recipe(epochs=3, lr=0.5, batch_size=7, train_views=2, warmup_epochs=0)
    host = build_host("coop", bb, train.classnames, {"n_ctx": 4, "ctx_init": ""})
    try:
        trained(host, bb, train, r3, ckpt=work / "resume.safetensors", on_epoch=stop)
    except KeyboardInterrupt:
        pass
    host = build_host("coop", bb, train.classnames, {"n_ctx": 4, "ctx_init": ""})
    info, _ = trained(host, bb, train, r3, ckpt=work / "resume.safetensors")
    meta["resumed_from"] = info["resumed_from"]
    res["resume.text_ctx"] = host.text_ctx.detach().clone()

    # meta-training: 3 tasks per meta-batch split over the ranks, second order, with ψ
    from gramvl.gram.meta import CorpusBatches, MetaConfig, meta_train

    host = build_host("coop", bb, list(CLASSES), {"n_ctx": 4, "ctx_init": ""})
    feats = torch.nn.functional.normalize(torch.randn(40, bb.embed_dim, generator=torch.Generator().manual_seed(5)),
                                          dim=-1)
    cfg = MetaConfig(host="coop", steps=2, meta_batch=3, inner_lr=2.0, rank=8, checkpoint_every=1)
    art = meta_train(cfg, host, TinySampler(), CorpusBatches(feats), work / "meta.safetensors", progress=False)
    from safetensors.torch import load_file

    res.update({f"meta.{k}": v for k, v in load_file(str(art)).items()})
    meta["meta.history"] = json.loads(art.with_name(art.stem + ".history.json").read_text())

    # the command line: train and a one-seed base-to-new protocol
    from gramvl.cli import main

    model = work / "tiny_clip.safetensors"
    if dist.is_main():
        sd = {k: v for k, v in bb.model.state_dict().items() if not k.endswith("attn_mask")}
        io.save_tensors(model, sd, bb.meta)
    dist.barrier()
    common = ["--model", str(model), "--dataset", data, "--epochs", "2", "--batch-size", "5"]
    assert main(["--quiet", "train", "--method", "coop", "--shots", "4", *common,
                 "--out", str(work / "cli_train")]) == 0
    assert main(["--quiet", "protocol", "base2new", "--method", "coop", "--seeds", "1", "--shots", "4",
                 "--model", str(model), "--datasets", data, "--epochs", "2", "--batch-size", "5",
                 "--out", str(work / "cli_b2n")]) == 0

    io._atomic_replace = original
    (out / f"writes_rank{dist.rank()}.json").write_text(json.dumps(writes))
    if dist.is_main():
        save_file({k: v.contiguous() for k, v in res.items()}, str(out / "results.safetensors"))
        (out / "meta.json").write_text(json.dumps(meta))


if __name__ == "__main__":
    torch.set_num_threads(1)
    from gramvl import dist

    dist.init_from_env()
    try:
        run_all(Path(sys.argv[1]), Path(sys.argv[2]))
    finally:
        dist.shutdown()
