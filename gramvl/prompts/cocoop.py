"""CoCoOp (Zhou et al., CVPR 2022): a meta-net turns each image feature into a bias on the shared context."""

from __future__ import annotations

import torch
from torch import nn

from gramvl.backbone import Backbone
from gramvl.errors import GramvlError
from gramvl.prompts.base import HostConfig, Recipe
from gramvl.prompts.common import TextPromptHost, context_init, seeded

META_INITS = ("paper", "zero")


class CoCoOp(TextPromptHost):
    """Slot `text_ctx` [M, d_text]; extra `meta_net` Linear(D, D//16)-ReLU-Linear(D//16, d_text).

    One batched text pass per step: context [B, 1, M, d] gives one set of class features per image.
    """

    name = "cocoop"
    image_side_frozen = True
    default_recipe = Recipe(
        epochs=10, lr=0.064, batch_size=32, optimizer="sgd", momentum=0.9, weight_decay=5e-4, warmup_epochs=1,
        warmup_lr=1e-5, scheduler="cosine",
        note="paper: batch 1, lr 0.002; we batch 32 (one batched text pass) with lr scaled linearly "
             "(0.002 x 32 = 0.064), not yet tuned on val splits; meta-net hidden width D//16 follows the "
             "model's D",
        source="CoCoOp, Zhou et al. CVPR 2022; KaiyangZhou/CoOp "
               "configs/trainers/CoCoOp/vit_b16_c4_ep10_batch1_ctxv1.yaml")

    def __init__(self, bb: Backbone, classnames: list[str], cfg: HostConfig | None = None):
        super().__init__(bb, classnames, cfg)
        cfg = self.cfg
        self.n_ctx = cfg.n_ctx
        hidden = cfg.meta_hidden or max(1, bb.embed_dim // 16)
        if cfg.meta_init not in META_INITS:
            raise GramvlError(f"CoCoOp's meta_init must be one of {', '.join(META_INITS)}, not {cfg.meta_init!r}")
        with seeded(cfg.seed):
            ctx, self.fixed_words = context_init(bb, cfg.ctx_init, cfg.n_ctx, "exact")
            self.meta_net = nn.Sequential(nn.Linear(bb.embed_dim, hidden), nn.ReLU(),
                                          nn.Linear(hidden, bb.text_width)).to(bb.device)
        if cfg.meta_init == "zero":  # the bias starts at zero: the first forward pass is the shared context's
            nn.init.zeros_(self.meta_net[2].weight)
            nn.init.zeros_(self.meta_net[2].bias)
        self.text_ctx = nn.Parameter(ctx.to(bb.device))
        self._build_prompts()

    @classmethod
    def default_config(cls, bb: Backbone) -> HostConfig:
        return HostConfig(n_ctx=4, ctx_init="a photo of a")

    def slots(self) -> dict[str, nn.Parameter]:
        return {"text_ctx": self.text_ctx}

    def conditional_context(self, image_features: torch.Tensor) -> torch.Tensor:
        """Per-image context [B, M, d_text]: the shared context plus the meta-net bias of each image."""
        bias = self.meta_net(image_features.to(self.text_ctx.dtype))
        return self.text_ctx.unsqueeze(0) + bias.unsqueeze(1)

    def logits(self, batch: dict) -> torch.Tensor:
        img = self.image_features(batch)
        text = self.encode_classes(self.conditional_context(img).unsqueeze(1))  # [B, C, D]
        return self.bb.logit_scale * torch.einsum("bd,bcd->bc", img.to(text.dtype), text)
