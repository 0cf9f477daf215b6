"""CoOp (Zhou et al., IJCV 2022): a learned text context shared by all classes, or one per class (CSC)."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from gramvl.backbone import Backbone
from gramvl.errors import GramvlError
from gramvl.prompts.base import HostConfig, Recipe
from gramvl.prompts.common import INIT_STD, TextPromptHost, context_init, normal_init, seeded

COOP_SOURCE = ("CoOp, Zhou et al. IJCV 2022; KaiyangZhou/CoOp configs/trainers/CoOp/vit_b16*.yaml and "
               "scripts/coop/main.sh (M=16, random init, class token at the end)")


class CoOp(TextPromptHost):
    """Slot `text_ctx` [M, d_text] (unified) or [C, M, d_text] (csc); image side frozen."""

    name = "coop"
    image_side_frozen = True
    init_mode = "exact"
    default_recipe = Recipe(
        epochs=200, lr=0.002, batch_size=32, optimizer="sgd", momentum=0.9, weight_decay=5e-4,
        warmup_epochs=1, warmup_lr=1e-5, scheduler="cosine",
        note="epochs by shots: 50 (1 shot), 100 (2-4), 200 (8-16); see recipe_for", source=COOP_SOURCE)

    def __init__(self, bb: Backbone, classnames: list[str], cfg: HostConfig | None = None):
        super().__init__(bb, classnames, cfg)
        cfg = self.cfg
        self.n_ctx = cfg.n_ctx
        std = cfg.init_std or INIT_STD
        with seeded(cfg.seed):
            if cfg.csc and not cfg.ctx_init:
                ctx = normal_init(len(self.classnames), cfg.n_ctx, bb.text_width, std=std)
            else:
                ctx, self.fixed_words = context_init(bb, cfg.ctx_init, cfg.n_ctx, cfg.ctx_init_mode or self.init_mode,
                                                      std=std)
                if cfg.csc:
                    ctx = ctx.unsqueeze(0).repeat(len(self.classnames), 1, 1)
        self.text_ctx = nn.Parameter(ctx.to(bb.device))
        self._build_prompts()

    @classmethod
    def default_config(cls, bb: Backbone) -> HostConfig:
        return HostConfig(n_ctx=16, ctx_init="", class_token_position="end", csc=False)

    @classmethod
    def recipe_for(cls, shots: int) -> Recipe:
        """CoOp's schedule: 50 epochs for 1 shot, 100 for 2-4 shots, 200 for 8-16 shots."""
        epochs = 50 if shots <= 1 else 100 if shots <= 4 else 200
        return dataclasses.replace(cls.default_recipe, epochs=epochs)

    def slots(self) -> dict[str, nn.Parameter]:
        return {"text_ctx": self.text_ctx}

    def class_text(self) -> torch.Tensor:
        """Text features [C, D] of all classes under the current context."""
        return self._cached(lambda: self.encode_classes(self.text_ctx))

    def logits(self, batch: dict) -> torch.Tensor:
        return self.bb.logit_scale * self.image_features(batch) @ self.class_text().t()

    def set_classnames(self, classnames: list[str]) -> None:
        if self.cfg.csc and list(classnames) != self.classnames:
            raise GramvlError("class-specific CoOp context (csc=True) is tied to its training classes and "
                              "cannot change classes (base-to-new or cross-dataset); train a unified context "
                              "(csc=False)")
        super().set_classnames(classnames)
