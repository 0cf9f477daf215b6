"""VPT (Jia et al., ECCV 2022) on CLIP's image tower: shallow or deep visual prompts, hand-written text."""

from __future__ import annotations

import torch
from torch import nn

from gramvl.backbone import Backbone
from gramvl.prompts.base import HostConfig, Recipe
from gramvl.prompts.common import Host, check_depth, normal_init, seeded


class VPT(Host):
    """Slots `vis_ctx` [Mv, d_vis] and, when depth > 1, `vis_deep` [depth-1, Mv, d_vis]; zero-shot text."""

    name = "vpt"
    image_side_frozen = False
    default_recipe = Recipe(
        epochs=5, lr=0.0025, batch_size=4, optimizer="sgd", momentum=0.9, weight_decay=5e-4, warmup_epochs=1,
        warmup_lr=1e-5, scheduler="cosine",
        note="8 visual tokens; the reference runs deep VPT (all 12 layers, `vpt-deep`); `vpt` is its shallow "
             "form",
        source="VPT, Jia et al. ECCV 2022, as the baseline in MaPLe (Khattak et al. CVPR 2023): "
               "muzairkhattak/multimodal-prompt-learning configs/trainers/VPT/vit_b16_c2_ep5_batch4_4.yaml")

    def __init__(self, bb: Backbone, classnames: list[str], cfg: HostConfig | None = None):
        super().__init__(bb, classnames, cfg)
        cfg = self.cfg
        self.depth = check_depth(self._depth(bb, cfg), bb.vision_layers, "vision")
        with seeded(cfg.seed):
            vis = normal_init(cfg.n_vis_ctx, bb.vision_width)
            deep = normal_init(self.depth - 1, cfg.n_vis_ctx, bb.vision_width) if self.depth > 1 else None
        self.vis_ctx = nn.Parameter(vis.to(bb.device))
        self.vis_deep = nn.Parameter(deep.to(bb.device)) if deep is not None else None

    def _depth(self, bb: Backbone, cfg: HostConfig) -> int:
        return cfg.depth

    @classmethod
    def default_config(cls, bb: Backbone) -> HostConfig:
        return HostConfig(n_vis_ctx=8, depth=1)

    def slots(self) -> dict[str, nn.Parameter]:
        out = {"vis_ctx": self.vis_ctx}
        if self.vis_deep is not None:
            out["vis_deep"] = self.vis_deep
        return out

    def image_features(self, batch: dict) -> torch.Tensor:
        deep = list(self.vis_deep.unbind(0)) if self.vis_deep is not None else None
        return self.bb.encode_image(self.images(batch), prompts=self.vis_ctx, deep=deep)

    def logits(self, batch: dict) -> torch.Tensor:
        return self.bb.logit_scale * self.image_features(batch) @ self.zeroshot_text().t()



class VPTDeep(VPT):
    """Deep VPT: prompts at the input of every vision block (depth = vision_layers unless cfg.depth > 1)."""

    name = "vpt-deep"

    def _depth(self, bb: Backbone, cfg: HostConfig) -> int:
        return cfg.depth if cfg.depth > 1 else bb.vision_layers

    @classmethod
    def default_config(cls, bb: Backbone) -> HostConfig:
        return HostConfig(n_vis_ctx=8, depth=bb.vision_layers)
