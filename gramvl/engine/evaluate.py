"""Evaluation: zero-shot classifiers, accuracy from features, the zero-shot run."""

from __future__ import annotations

import math
import time

import torch

from gramvl.backbone import Backbone
from gramvl.data.base import ImageDataset
from gramvl.data.features import image_features

DEFAULT_TEMPLATE = "a photo of a {}."
# A small ensemble in the spirit of CLIP's prompt engineering, written for this project.
ENSEMBLE_TEMPLATES = (
    "a photo of a {}.", "a drawing of a {}.", "an icon of a {}.", "a picture of the {}.",
    "a black and white photo of a {}.", "a sketch of a {}.", "a cartoon {}.", "a photo of the small {}.",
)


@torch.no_grad()
def zeroshot_weights(bb: Backbone, classnames: list[str], templates: tuple[str, ...] | list[str]) -> torch.Tensor:
    """Class embeddings [C, D]: mean of normalized template features, renormalized."""
    for t in templates:
        if "{}" not in t:
            raise ValueError(f"template {t!r} has no '{{}}' placeholder for the class name")
    feats = torch.stack([bb.encode_texts([t.format(c) for c in classnames]) for t in templates])
    w = feats.mean(0)
    return w / w.norm(dim=-1, keepdim=True)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(-1) == labels).float().mean()) if len(labels) else 0.0


def evaluate_zeroshot(bb: Backbone, ds: ImageDataset, templates=(DEFAULT_TEMPLATE,), progress: bool = True,
                      cache: bool = True) -> dict:
    """Zero-shot accuracy of `bb` on `ds` with the given templates (one or an ensemble)."""
    t0 = time.time()
    feats, labels = image_features(bb, ds, progress=progress, cache=cache)
    w = zeroshot_weights(bb, ds.classnames, templates)
    cos = feats.to(w.device) @ w.T
    labels = labels.to(w.device)
    acc = accuracy(cos, labels)
    # the loss a prompt-tuning run starts from: cross-entropy of the model's own scaled logits; a model is
    # worth adapting when it is well under the uniform guess's log(C) (issue 2)
    loss = float(torch.nn.functional.cross_entropy(float(bb.logit_scale) * cos.float(), labels)) if len(labels) else 0.0
    return {"accuracy": acc, "n": len(labels), "num_classes": ds.num_classes, "chance": 1.0 / ds.num_classes,
            "loss": loss, "uniform_loss": math.log(ds.num_classes), "seconds": round(time.time() - t0, 3)}
