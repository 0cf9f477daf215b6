"""IVLP (independent vision-language prompting, the MaPLe paper's baseline): deep text and vision prompts."""

from __future__ import annotations

import torch
from torch import nn

from gramvl.backbone import Backbone
from gramvl.prompts.base import HostConfig, Recipe
from gramvl.prompts.common import TextPromptHost, check_depth, context_init, normal_init, seeded

IVLP_MAPLE_RECIPE = dict(epochs=5, lr=0.0035, batch_size=4, optimizer="sgd", momentum=0.9, weight_decay=5e-4,
                         warmup_epochs=1, warmup_lr=1e-5, scheduler="cosine")


class IVLP(TextPromptHost):
    """Slots `text_ctx` [M, d_text], `text_deep` [Dt-1, M, d_text], `vis_ctx` [Mv, d_vis] and `vis_deep`
    [Dv-1, Mv, d_vis]: text and vision prompts learned independently; deep slots absent at depth 1.
    """

    name = "ivlp"
    image_side_frozen = False
    default_recipe = Recipe(
        **IVLP_MAPLE_RECIPE,
        note="M=2 text + 2 vision tokens, depth = all layers of each tower as in the reference config "
             "(12 of 12); ctx 'a photo of a': 'a photo' learned, 'of a' kept as words (as the reference "
             "code)",
        source="MaPLe, Khattak et al. CVPR 2023; muzairkhattak/multimodal-prompt-learning "
               "configs/trainers/IVLP/vit_b16_c2_ep5_batch4_2+2ctx.yaml")

    def __init__(self, bb: Backbone, classnames: list[str], cfg: HostConfig | None = None):
        super().__init__(bb, classnames, cfg)
        cfg = self.cfg
        self.n_ctx = cfg.n_ctx
        self.depth = check_depth(cfg.depth, bb.text_layers, "text")
        self.vis_depth = check_depth(cfg.vis_depth or cfg.depth, bb.vision_layers, "vision")
        with seeded(cfg.seed):
            ctx, self.fixed_words = context_init(bb, cfg.ctx_init, cfg.n_ctx, "split")
            tdeep = normal_init(self.depth - 1, cfg.n_ctx, bb.text_width)
            vis = normal_init(cfg.n_vis_ctx, bb.vision_width)
            vdeep = normal_init(self.vis_depth - 1, cfg.n_vis_ctx, bb.vision_width)
        self.text_ctx = nn.Parameter(ctx.to(bb.device))
        self.text_deep = nn.Parameter(tdeep.to(bb.device)) if self.depth > 1 else None
        self.vis_ctx = nn.Parameter(vis.to(bb.device))
        self.vis_deep = nn.Parameter(vdeep.to(bb.device)) if self.vis_depth > 1 else None
        self._build_prompts()

    @classmethod
    def default_config(cls, bb: Backbone) -> HostConfig:
        return HostConfig(n_ctx=2, n_vis_ctx=2, ctx_init="a photo of a", depth=bb.text_layers,
                          vis_depth=bb.vision_layers)

    def slots(self) -> dict[str, nn.Parameter]:
        names = ("text_ctx", "text_deep", "vis_ctx", "vis_deep")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def class_text(self) -> torch.Tensor:
        deep = list(self.text_deep.unbind(0)) if self.text_deep is not None else None
        return self._cached(lambda: self.encode_classes(self.text_ctx, deep))

    def image_features(self, batch: dict) -> torch.Tensor:
        deep = list(self.vis_deep.unbind(0)) if self.vis_deep is not None else None
        return self.bb.encode_image(self.images(batch), prompts=self.vis_ctx, deep=deep)

    def logits(self, batch: dict) -> torch.Tensor:
        return self.bb.logit_scale * self.image_features(batch) @ self.class_text().t()
