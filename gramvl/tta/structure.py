"""The structure-induced context of ψ at test time (SPEC 1.7):

    e(x) = Σ_k softmax_k(cos(f(x), μ_k) / τ) μ_k

over prototypes μ_k [P, D] of the meta-training hierarchy: complexity-informed ones (simple domains once,
complex domains by their children; `Hierarchy.prototypes('complexity')`), one per domain ('flat', the
ablation) or one per leaf. e(x) conditions ψ's gate and scales its residual (FiLM), so the same raw gradient
is turned differently for test images that sit near different parts of the meta-training structure.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gramvl.errors import GramvlError
from gramvl.gram.regulator import Regulator

PROTOTYPE_MODES = ("complexity", "flat", "leaves")


class StructureContext(nn.Module):
    """e(x): the softmax(cos / τ)-weighted mean of the prototypes (kept L2-normalized, as a buffer)."""

    def __init__(self, prototypes: torch.Tensor, tau: float = 0.1):
        super().__init__()
        if prototypes.dim() != 2 or prototypes.shape[0] < 1:
            raise GramvlError(f"prototypes must be a [P, D] tensor with P >= 1, not "
                              f"{tuple(prototypes.shape)}")
        if tau <= 0:
            raise GramvlError(f"the prototype temperature tau must be > 0, not {tau}")
        self.register_buffer("prototypes", F.normalize(prototypes.detach().float(), dim=-1))
        self.tau = float(tau)

    @property
    def dim(self) -> int:
        return int(self.prototypes.shape[1])

    def weights(self, feats: torch.Tensor) -> torch.Tensor:
        """Soft assignment [..., P] of image features [..., D] to the prototypes."""
        if feats.shape[-1] != self.dim:
            raise GramvlError(f"image features of width {feats.shape[-1]} do not fit prototypes of width "
                              f"{self.dim}: the prototypes come from another backbone")
        cos = F.normalize(feats.float(), dim=-1) @ self.prototypes.T
        return torch.softmax(cos / self.tau, dim=-1)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """The context e(x) [..., D] of image features [..., D]."""
        return self.weights(feats) @ self.prototypes


def hierarchy_prototypes(hierarchy, mode: str = "complexity", kind: str = "joint") -> torch.Tensor:
    """Prototypes [P, D] of a CMHC `Hierarchy`: 'complexity', 'flat' or 'leaves'; joint/image/text kind."""
    if mode not in PROTOTYPE_MODES:
        raise GramvlError(f"prototype mode must be one of {', '.join(PROTOTYPE_MODES)}, not {mode!r}")
    return hierarchy.prototypes(mode, kind).float()


class StructuredRegulator(nn.Module):
    """ψ(g; e(x)): a context-conditioned Regulator fed with the structure context of each sample's image.

    g is [B, ..., M, d] (one context per sample), feats [B, D] the samples' image features; without a
    structure context (or with ψ of ctx_dim 0) this is the plain ψ(g).
    """

    def __init__(self, regulator: Regulator, context: StructureContext | None = None):
        super().__init__()
        if context is not None and regulator.ctx_dim not in (0, context.dim):
            raise GramvlError(f"the regulator is conditioned on contexts of width {regulator.ctx_dim}, the "
                              f"prototypes have width {context.dim}")
        self.regulator = regulator
        self.context = context

    @property
    def structured(self) -> bool:
        return self.context is not None and self.regulator.ctx_dim > 0

    def forward(self, g: torch.Tensor, feats: torch.Tensor | None = None) -> torch.Tensor:
        if not self.structured or feats is None:
            return self.regulator(g)
        e = self.context(feats)
        if e.shape[0] != g.shape[0]:
            raise GramvlError(f"{e.shape[0]} image features for {g.shape[0]} contexts")
        return self.regulator(g, e)
