"""ProGrad (Zhu et al., ICCV 2023): CoOp whose CE gradient is projected off the zero-shot direction."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from gramvl.backbone import Backbone
from gramvl.prompts.base import HostConfig
from gramvl.prompts.coop import CoOp


def project_conflicting(g: torch.Tensor, g_ref: torch.Tensor, lam: float = 1.0) -> torch.Tensor:
    """g - lam * (g . g_ref) / ||g_ref||^2 * g_ref when g . g_ref < 0, else g (ProGrad's update rule)."""
    dot = torch.dot(g.flatten(), g_ref.flatten())
    norm2 = g_ref.pow(2).sum()
    if dot >= 0 or norm2 == 0:
        return g
    return g - lam * dot / norm2 * g_ref


def distill_kl(logits: torch.Tensor, teacher_logits: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """KL(teacher probs || model probs) at temperature T, times T^2, averaged over the batch."""
    kl = F.kl_div(F.log_softmax(logits / T, -1), F.softmax(teacher_logits / T, -1), reduction="batchmean")
    return kl * T * T


class ProGrad(CoOp):
    """CoOp slot `text_ctx`; `backward()` writes the projected gradient (per parameter, as the reference)."""

    name = "prograd"
    init_mode = "pad"
    default_recipe = dataclasses.replace(
        CoOp.default_recipe,
        note="CoOp's schedule (epochs by shots, see recipe_for); lambda 1, T 1; M=16 with 'a photo of a' in "
             "the last 4 slots and zeros before",
        source="ProGrad, Zhu et al. ICCV 2023; BeierZhu/Prompt-align ProGrad.public/configs/trainers/ProGrad/"
               "rn50_ep50.yaml and scripts/prograd.sh (LAMBDA 1.0, T 1.0)")

    def __init__(self, bb: Backbone, classnames: list[str], cfg: HostConfig | None = None):
        super().__init__(bb, classnames, cfg)
        self.last_stats: dict[str, float] = {}

    @classmethod
    def default_config(cls, bb: Backbone) -> HostConfig:
        return HostConfig(n_ctx=16, ctx_init="a photo of a", prograd_lambda=1.0, prograd_T=1.0)

    def backward(self, batch: dict, labels: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """Accumulate the ProGrad gradient (times `scale`, fp16 loss scaling) into .grad; returns the CE loss.
        Both gradients carry the scale; the projection is unchanged by it (degree 0 in the KL gradient)."""
        params = self.trainable_parameters()
        logits = self.logits(batch)
        ce = F.cross_entropy(logits, labels)
        kl = distill_kl(logits, self.zeroshot_logits(batch), self.cfg.prograd_T)
        s = 1.0 if scale is None else scale
        g_ce = torch.autograd.grad(ce * s, params, retain_graph=True, allow_unused=True)
        g_kl = torch.autograd.grad(kl * s, params, allow_unused=True)
        conflicts = 0
        for p, gc, gk in zip(params, g_ce, g_kl, strict=True):
            if gc is None:
                continue
            if gk is not None:
                conflicts += int(torch.dot(gc.flatten(), gk.flatten()) < 0)
                gc = project_conflicting(gc, gk, self.cfg.prograd_lambda)
            p.grad = gc.detach().clone() if p.grad is None else p.grad + gc.detach()
        self.last_stats = {"ce": float(ce.detach()), "kl": float(kl.detach()), "conflicts": conflicts}
        return ce.detach()
