"""The host-method interface: a small module that owns named prompt slots.

The engine only needs: `slots()` (what GRAM initializes and regulates), `trainable_parameters()`,
`logits(batch)`, `loss(...)`, `set_classnames(...)` and `image_side_frozen` (when True the engine feeds
cached image features instead of images). Nothing here knows GRAM.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from gramvl.backbone import Backbone
from gramvl.errors import GramvlError


@dataclass
class Recipe:
    """Training recipe of a host (paper defaults, scaled to the small model where noted)."""

    epochs: int = 50
    lr: float = 0.002
    batch_size: int = 32
    optimizer: str = "sgd"  # sgd | adamw
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    scheduler: str = "cosine"
    train_views: int = 8  # augmented feature views cached per image (frozen image side)
    note: str = ""
    source: str = ""  # where the defaults come from (paper / reference config)


@dataclass
class HostConfig:
    """Options shared by hosts; each host reads the ones it uses."""

    n_ctx: int = 4
    ctx_init: str = "a photo of a"  # "" -> random init (N(0, 0.02))
    ctx_init_mode: str = ""  # "" -> the host's own (CoOp: exact); "pad": zeros, then the words (n_ctx >= words)
    init_std: float = 0.0  # std of a random context init (0 -> 0.02, the papers' value); CoOp family
    class_token_position: str = "end"  # end | middle | front (CoOp)
    csc: bool = False  # class-specific context (CoOp)
    n_vis_ctx: int = 4
    depth: int = 1  # prompt depth for deep hosts (1 = shallow)
    vis_depth: int = 0  # vision prompt depth where it differs from the text depth (IVLP); 0 -> depth
    text_chunk: int = 256  # classes per text-encoder chunk
    checkpoint_text: bool = False  # activation checkpointing in the text encoder (1000 classes)
    templates: list[str] = field(default_factory=lambda: ["a photo of a {}."])
    kg_weight: float = 8.0  # KgCoOp lambda
    prograd_lambda: float = 1.0  # ProGrad lambda
    prograd_T: float = 1.0  # ProGrad KL temperature
    meta_hidden: int = 0  # CoCoOp meta-net hidden width (0 -> D // 16)
    # CoCoOp meta-net init: "paper" = PyTorch's default Linear init, as CoCoOp; "zero" = its last layer at zero, so
    # training starts exactly from the shared context (session 12: the paper init adds a bias 5x a token's norm)
    meta_init: str = "paper"
    # PromptSRC: weights of its three self-regulating losses (the prompted text and image features pulled to the
    # frozen ones by L1, the prompted logits to the frozen ones by KL) and its Gaussian prompt aggregation over
    # epochs, centred at gpa_mean and with spread gpa_std, both in units of the run's epochs (gpa_std 0: off)
    src_text_weight: float = 25.0
    src_image_weight: float = 10.0
    src_logit_weight: float = 1.0
    gpa_mean: float = 0.75
    gpa_std: float = 0.05
    seed: int = 0


class PromptLearner(nn.Module):
    """Base class: a frozen backbone, class names and named prompt slots."""

    name = "base"
    image_side_frozen = True
    default_recipe = Recipe()

    def __init__(self, bb: Backbone, classnames: list[str], cfg: HostConfig | None = None):
        super().__init__()
        self.bb = bb
        self.cfg = cfg or HostConfig()
        self.classnames = list(classnames)

    # ---- interface -------------------------------------------------------------------------------
    @classmethod
    def protocol_setting(cls, protocol: str, bb: Backbone) -> tuple[dict, dict]:
        """(recipe overrides, host option overrides) where the method's paper runs a protocol with another config
        than its default one (PromptSRC); a protocol's explicit --epochs and --set win over them."""
        return {}, {}

    def slots(self) -> dict[str, nn.Parameter]:
        """Named prompt tensors (the part GRAM meta-learns and regulates)."""
        return {}

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Everything the optimizer updates: slots plus host extras (meta-net, coupling layers)."""
        return [p for n, p in self.named_parameters() if p.requires_grad and not n.startswith("bb.")]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint holds: trainable tensors only (never the CLIP weights)."""
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad and not n.startswith("bb.")}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        own = dict(self.named_parameters())
        for k, v in state.items():
            own[k].data.copy_(v)

    def epoch_end(self, epoch: int, epochs: int) -> None:
        """Called by the trainer after epoch `epoch` (1-based) of `epochs`, before the checkpoint is written
        (PromptSRC aggregates its prompts over epochs here)."""

    def run_state(self) -> dict[str, torch.Tensor]:
        """State a training run keeps beside the trainable tensors (saved in checkpoints, restored on resume)."""
        return {}

    def load_run_state(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise GramvlError(f"host {self.name} keeps no run state, but a checkpoint holds {sorted(state)}")

    def set_classnames(self, classnames: list[str]) -> None:
        """Switch the label space (new classes, another dataset); learned slots are kept."""
        self.classnames = list(classnames)

    def logits(self, batch: dict) -> torch.Tensor:
        """Class logits [B, C]; batch has 'features' [B, D] (frozen image side) or 'images'."""
        raise NotImplementedError

    def forward(self, batch: dict) -> torch.Tensor:
        """Same as logits(): lets torch.func.functional_call swap slots (GRAM's inner loop)."""
        return self.logits(batch)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, batch: dict) -> torch.Tensor:
        return F.cross_entropy(logits, labels)

    def backward(self, batch: dict, labels: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """Compute gradients of the training loss times `scale` (fp16 loss scaling) into .grad; returns the
        unscaled loss (ProGrad overrides)."""
        loss = self.loss(self.logits(batch), labels, batch)
        (loss if scale is None else loss * scale).backward()
        return loss.detach()

    # ---- helpers ---------------------------------------------------------------------------------
    def image_features(self, batch: dict) -> torch.Tensor:
        if "features" in batch:
            return F.normalize(batch["features"], dim=-1)
        with torch.no_grad():
            return self.bb.encode_image(batch["images"])
