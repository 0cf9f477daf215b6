"""Linear probe (CLIP / CoOp baseline): L2-regularized logistic regression on frozen image features."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gramvl.backbone import Backbone
from gramvl.errors import GramvlError
from gramvl.prompts.base import HostConfig, Recipe
from gramvl.prompts.common import Host

L2_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
DEFAULT_L2 = 1e-4  # used when no validation features are given


class LinearProbe(Host):
    """A linear classifier `weight` [C, D], `bias` [C] on normalized image features; not a slot host."""

    name = "linear_probe"
    image_side_frozen = True
    default_recipe = Recipe(
        epochs=0, lr=1.0, batch_size=0, optimizer="lbfgs", weight_decay=0.0, warmup_epochs=0,
        scheduler="none",
        note="full-batch L-BFGS on cached features; L2 weight chosen on the val split from 1e-6..1 "
             "(decades), warm-started from strong to weak regularization; call fit(), not the SGD loop",
        source="CLIP (Radford et al. 2021) linear probe, used as baseline by CoOp (Zhou et al. IJCV 2022): "
               "sklearn L-BFGS logistic regression with C searched on val")

    def __init__(self, bb: Backbone, classnames: list[str], cfg: HostConfig | None = None):
        super().__init__(bb, classnames, cfg)
        self.weight = nn.Parameter(torch.zeros(len(self.classnames), bb.embed_dim, device=bb.device))
        self.bias = nn.Parameter(torch.zeros(len(self.classnames), device=bb.device))
        self.l2: float | None = None

    def logits(self, batch: dict) -> torch.Tensor:
        return self.image_features(batch) @ self.weight.t() + self.bias

    def set_classnames(self, classnames: list[str]) -> None:
        if list(classnames) != self.classnames:
            raise GramvlError("a linear probe has one weight row per training class; it cannot switch to "
                              "other classes (base-to-new or cross-dataset)")

    def _fit_one(self, x: torch.Tensor, y: torch.Tensor, l2: float, w: torch.Tensor, b: torch.Tensor,
                 max_iter: int) -> tuple[torch.Tensor, torch.Tensor]:
        w = w.clone().requires_grad_(True)
        b = b.clone().requires_grad_(True)
        opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=1e-9,
                                tolerance_change=1e-12, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(x @ w.t() + b, y) + 0.5 * l2 * w.pow(2).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        return w.detach(), b.detach()

    def fit(self, train_feats: torch.Tensor, train_labels: torch.Tensor,
            val_feats: torch.Tensor | None = None, val_labels: torch.Tensor | None = None,
            grid: tuple[float, ...] = L2_GRID,
            max_iter: int = 1000) -> dict:
        """Fit for each L2 weight in `grid` (strong to weak, warm-started); keep the best on val."""
        dev = self.weight.device
        x = F.normalize(train_feats.to(dev, torch.float64), dim=-1)
        y = train_labels.to(dev).long()
        if y.numel() == 0:
            raise GramvlError("linear probe: no training features")
        have_val = val_feats is not None and val_labels is not None and len(val_labels) > 0
        grid = tuple(sorted(grid, reverse=True)) if have_val else (DEFAULT_L2,)
        w = torch.zeros(self.weight.shape, dtype=torch.float64, device=dev)
        b = torch.zeros(self.bias.shape, dtype=torch.float64, device=dev)
        best, scores = None, {}
        for l2 in grid:
            w, b = self._fit_one(x, y, l2, w, b, max_iter)
            if have_val:
                xv = F.normalize(val_feats.to(dev, torch.float64), dim=-1)
                acc = float(((xv @ w.t() + b).argmax(-1) == val_labels.to(dev)).float().mean())
            else:
                acc = float("nan")
            scores[l2] = acc
            if best is None or acc > best[0]:
                best = (acc, l2, w, b)
        acc, self.l2, w, b = best
        with torch.no_grad():
            self.weight.copy_(w.to(self.weight.dtype))
            self.bias.copy_(b.to(self.bias.dtype))
        train_acc = float(((x @ w.t() + b).argmax(-1) == y).float().mean())
        return {"l2": self.l2, "val_accuracy": acc, "train_accuracy": train_acc, "val_by_l2": scores}
