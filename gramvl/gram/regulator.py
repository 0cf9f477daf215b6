"""The gradient regulating function ψ_φ (SPEC 1.3), row-wise (one prompt token per row).

    n = ||g||, ĝ = g / n
    h = ĝ + U σ(V ĝ + b) · (1 + FiLM(e))        low-rank residual, U = 0 at init
    c = sigmoid(a + w·e)                         gate, a = +4 at init; e = optional context (test time)
    ψ(g) = n · normalize(c ĝ + (1 − c) h / ||h||)

ψ is exactly the identity at init (U = 0 gives h = ĝ) and exactly norm-preserving per row: it can only
turn gradient directions, so GRAM starts as MAML and the host's learning-rate recipe keeps its meaning.

Optional descent guard (`min_cos` = κ > -1): a direction whose cosine to ĝ is below κ is turned back, in the
plane of ĝ and itself, to cosine exactly κ. With κ > 0 every regulated step stays a descent direction of the
loss it came from, so a host that applies ψ* for hundreds of steps still converges (a ψ* trained for one
inner step may otherwise turn gradients nearly orthogonal, which stalls a long downstream run).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gramvl.errors import GramvlError

EPS = 1e-12


class Regulator(nn.Module):
    """ψ for rows of width `dim`; `ctx_dim` > 0 enables the context-conditioned (structure-induced) form."""

    def __init__(self, dim: int, rank: int = 32, ctx_dim: int = 0, gate_init: float = 4.0,
                 min_cos: float = -1.0):
        super().__init__()
        if not -1.0 <= min_cos < 1.0:
            raise GramvlError(f"the regulator's min_cos (meta.psi_min_cos) must be in [-1, 1), not {min_cos}")
        self.dim, self.rank, self.ctx_dim, self.min_cos = dim, rank, ctx_dim, float(min_cos)
        self.down = nn.Linear(dim, rank)
        self.up = nn.Linear(rank, dim, bias=False)
        nn.init.normal_(self.down.weight, std=dim ** -0.5)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        self.gate = nn.Parameter(torch.tensor(float(gate_init)))
        if ctx_dim:
            self.gate_ctx = nn.Linear(ctx_dim, 1, bias=False)
            self.film = nn.Linear(ctx_dim, rank)
            nn.init.zeros_(self.gate_ctx.weight)
            nn.init.zeros_(self.film.weight)
            nn.init.zeros_(self.film.bias)

    def forward(self, g: torch.Tensor, ctx: torch.Tensor | None = None) -> torch.Tensor:
        shape = g.shape
        rows = g.reshape(-1, shape[-1])
        n = rows.norm(dim=-1, keepdim=True)
        unit = rows / n.clamp_min(EPS)
        hidden = torch.sigmoid(self.down(unit))
        gate_logit = self.gate
        if self.ctx_dim and ctx is not None:
            e = ctx.reshape(-1, self.ctx_dim)
            if e.shape[0] not in (1, rows.shape[0]):  # one context per leading item: repeat over its rows
                e = e.repeat_interleave(rows.shape[0] // e.shape[0], dim=0)
            hidden = hidden * (1 + self.film(e))
            gate_logit = gate_logit + self.gate_ctx(e)
        h = unit + self.up(hidden)
        h = h / h.norm(dim=-1, keepdim=True).clamp_min(EPS)
        c = torch.sigmoid(gate_logit)
        mixed = F.normalize(c * unit + (1 - c) * h, dim=-1, eps=EPS)
        if self.min_cos > -1.0:
            mixed = guard_descent(mixed, unit, self.min_cos)
        return (n * mixed).reshape(shape)

    @torch.no_grad()
    def diagnostics(self, g: torch.Tensor, ctx: torch.Tensor | None = None) -> dict:
        """How far ψ is from the identity on gradients g: cosine, norm ratio, gate value."""
        out = self(g, ctx)
        a, b = g.reshape(-1, g.shape[-1]), out.reshape(-1, g.shape[-1])
        cos = F.cosine_similarity(a, b, dim=-1)
        gate = torch.sigmoid(self.gate).item()
        return {"cos_to_identity_mean": float(cos.mean()), "cos_to_identity_min": float(cos.min()),
                "norm_ratio_mean": float((b.norm(dim=-1) / a.norm(dim=-1).clamp_min(EPS)).mean()),
                "gate": gate, "residual_norm": float(self.up.weight.norm())}


def guard_descent(d: torch.Tensor, unit: torch.Tensor, kappa: float) -> torch.Tensor:
    """Unit rows d with cosine to the unit rows `unit` below kappa, turned (towards `unit`, keeping their
    perpendicular direction) to cosine exactly kappa; the other rows unchanged."""
    cos = (d * unit).sum(-1, keepdim=True)
    perp = F.normalize(d - cos * unit, dim=-1, eps=EPS)
    turned = kappa * unit + (1.0 - kappa * kappa) ** 0.5 * perp
    return torch.where(cos < kappa, turned, d)


def modality_of(slot: str) -> str:
    """Slots are named text_* or vis_*; one regulator per modality."""
    if slot.startswith("text"):
        return "text"
    if slot.startswith("vis"):
        return "vision"
    raise ValueError(f"slot {slot!r} must be named text_* or vis_* to be regulated")


class RegulatorSet(nn.Module):
    """One ψ per modality, applied to a slot's gradient by the slot's name."""

    def __init__(self, widths: dict[str, int], rank: int = 32, ctx_dim: int = 0, gate_init: float = 4.0,
                 min_cos: float = -1.0):
        super().__init__()
        self.widths = dict(widths)
        self.regs = nn.ModuleDict({m: Regulator(w, rank, ctx_dim, gate_init, min_cos) for m, w in widths.items()})

    def forward(self, slot: str, g: torch.Tensor, ctx: torch.Tensor | None = None) -> torch.Tensor:
        return self.regs[modality_of(slot)](g, ctx)

    def config(self) -> dict:
        any_reg = next(iter(self.regs.values()))
        return {"widths": self.widths, "rank": any_reg.rank, "ctx_dim": any_reg.ctx_dim,
                "min_cos": any_reg.min_cos}
