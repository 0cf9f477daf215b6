"""MaPLe (Khattak et al., CVPR 2023): deep text prompts, vision prompts coupled to them by linear maps."""

from __future__ import annotations

import torch
from torch import nn

from gramvl.backbone import Backbone
from gramvl.prompts.base import HostConfig, Recipe
from gramvl.prompts.common import TextPromptHost, check_depth, context_init, normal_init, scale_depth, seeded
from gramvl.prompts.ivlp import IVLP_MAPLE_RECIPE


class MaPLe(TextPromptHost):
    """Slots `text_ctx` [M, d_text] and `text_deep` [depth-1, M, d_text]; extras `coupling`: one
    Linear(d_text, d_vis) per depth (0 maps text_ctx, i maps text_deep[i-1]) giving the vision prompts.
    """

    name = "maple"
    image_side_frozen = False
    default_recipe = Recipe(
        **IVLP_MAPLE_RECIPE,
        note="M=2, depth 9 of 12 in the paper; other models use round(0.75 x min(text, vision layers)) "
             "(small model: 3 of 4 text layers); ctx 'a photo of a': 'a photo' learned, 'of a' kept as words "
             "(as the reference code)",
        source="MaPLe, Khattak et al. CVPR 2023; muzairkhattak/multimodal-prompt-learning "
               "configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml")

    def __init__(self, bb: Backbone, classnames: list[str], cfg: HostConfig | None = None):
        super().__init__(bb, classnames, cfg)
        cfg = self.cfg
        self.n_ctx = cfg.n_ctx
        self.depth = check_depth(cfg.depth, min(bb.text_layers, bb.vision_layers), "MaPLe (text and vision)")
        with seeded(cfg.seed):
            ctx, self.fixed_words = context_init(bb, cfg.ctx_init, cfg.n_ctx, "split")
            deep = normal_init(self.depth - 1, cfg.n_ctx, bb.text_width)
            self.coupling = nn.ModuleList(nn.Linear(bb.text_width, bb.vision_width)
                                          for _ in range(self.depth)).to(bb.device)
        self.text_ctx = nn.Parameter(ctx.to(bb.device))
        self.text_deep = nn.Parameter(deep.to(bb.device)) if self.depth > 1 else None
        self._build_prompts()

    @classmethod
    def default_config(cls, bb: Backbone) -> HostConfig:
        return HostConfig(n_ctx=2, ctx_init="a photo of a",
                          depth=scale_depth(min(bb.text_layers, bb.vision_layers)))

    def slots(self) -> dict[str, nn.Parameter]:
        out = {"text_ctx": self.text_ctx}
        if self.text_deep is not None:
            out["text_deep"] = self.text_deep
        return out

    def _text_prompts(self) -> list[torch.Tensor]:
        return [self.text_ctx] + (list(self.text_deep.unbind(0)) if self.text_deep is not None else [])

    def vision_prompts(self) -> list[torch.Tensor]:
        """Vision prompts [M, d_vis] per depth, each a coupling map of the text prompt at that depth."""
        return [f(t) for f, t in zip(self.coupling, self._text_prompts(), strict=True)]

    def class_text(self) -> torch.Tensor:
        t = self._text_prompts()
        return self._cached(lambda: self.encode_classes(t[0], t[1:] or None))

    def image_features(self, batch: dict) -> torch.Tensor:
        v = self.vision_prompts()
        return self.bb.encode_image(self.images(batch), prompts=v[0], deep=v[1:] or None)

    def logits(self, batch: dict) -> torch.Tensor:
        return self.bb.logit_scale * self.image_features(batch) @ self.class_text().t()
