"""Zero-shot CLIP: hand-written prompts (one template or an ensemble), nothing learned."""

from __future__ import annotations

import torch

from gramvl.prompts.base import Recipe
from gramvl.prompts.common import Host


class ZeroShot(Host):
    """Frozen CLIP with `cfg.templates` (mean of normalized template features); no slots."""

    name = "zeroshot"
    image_side_frozen = True
    default_recipe = Recipe(epochs=0, note="no training",
                            source="CLIP (Radford et al., ICML 2021): prompt templates and ensembling")

    def logits(self, batch: dict) -> torch.Tensor:
        return self.bb.logit_scale * self.image_features(batch) @ self.zeroshot_text().t()
