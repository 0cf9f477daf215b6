"""PromptSRC (Khattak et al., ICCV 2023): IVLP's deep text and vision prompts, regulated by the frozen model.

Three self-regulating losses keep the prompted model near the frozen one (its zero-shot knowledge):
    L = CE + w_t · L1(t(θ), t_clip) + w_i · L1(f(x; θ), f_clip(x)) + w_l · KL(p_clip(x) ‖ p_θ(x))
with t_clip the frozen class features averaged over several templates (textual diversity), f_clip(x) the frozen
image features of the same (augmented) training images, and p the class softmax at the model's logit scale.
After every epoch e the prompts are added to a running sum with the weight w_e ∝ N(e; μ, σ) (Gaussian prompt
aggregation, GPA); after the last epoch the sum replaces them, so the prompts the run ends with are a weighted
average over epochs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from gramvl.backbone import Backbone
from gramvl.engine.evaluate import ENSEMBLE_TEMPLATES
from gramvl.errors import GramvlError
from gramvl.prompts.base import HostConfig, Recipe
from gramvl.prompts.common import Host, scale_depth
from gramvl.prompts.ivlp import IVLP


def gpa_weights(epochs: int, mean: float, std: float) -> list[float]:
    """Weights of epochs 1..epochs: the normal density at each epoch, centred at mean·epochs with spread
    std·epochs (both fractions of the run), normalized to sum to one."""
    if epochs < 1 or std <= 0:
        raise GramvlError(f"Gaussian prompt aggregation needs epochs >= 1 and gpa_std > 0 (got {epochs}, {std})")
    mu, sigma = mean * epochs, std * epochs
    dens = [math.exp(-0.5 * ((e - mu) / sigma) ** 2) for e in range(1, epochs + 1)]
    total = sum(dens)
    if total == 0.0:
        raise GramvlError(f"Gaussian prompt aggregation: gpa_mean={mean} and gpa_std={std} give every one of the "
                          f"{epochs} epochs a zero weight; centre it inside the run (0 < gpa_mean <= 1)")
    return [d / total for d in dens]


class PromptSRC(IVLP):
    """IVLP's slots `text_ctx`, `text_deep`, `vis_ctx`, `vis_deep` (4 + 4 tokens, depth 9 of 12 in the paper;
    other towers: round(0.75 x their layers)); the loss and the aggregation above."""

    name = "promptsrc"
    default_recipe = Recipe(
        epochs=20, lr=0.0025, batch_size=4, optimizer="sgd", momentum=0.9, weight_decay=5e-4, warmup_epochs=1,
        warmup_lr=1e-5, scheduler="cosine",
        note="the base-to-new config (20 epochs, GPA at epoch 15 with std 1: gpa_mean 0.75, gpa_std 0.05); "
             "protocols use the paper's few-shot and cross-dataset configs (`protocol_setting`); loss weights "
             "25 (text), 10 (image), 1 (logits); the text teacher averages gramvl's template ensemble",
        source="PromptSRC, Khattak et al. ICCV 2023; muzairkhattak/PromptSRC "
               "configs/trainers/PromptSRC/vit_b16_c2_ep20_batch4_4+4ctx.yaml")

    def __init__(self, bb: Backbone, classnames: list[str], cfg: HostConfig | None = None):
        super().__init__(bb, classnames, cfg)
        self._gpa: dict[str, torch.Tensor] | None = None

    @classmethod
    def default_config(cls, bb: Backbone) -> HostConfig:
        return HostConfig(n_ctx=4, n_vis_ctx=4, ctx_init="a photo of a", depth=scale_depth(bb.text_layers),
                          vis_depth=scale_depth(bb.vision_layers), templates=list(ENSEMBLE_TEMPLATES))

    @classmethod
    def protocol_setting(cls, protocol: str, bb: Backbone) -> tuple[dict, dict]:
        """The paper's configs: few-shot 50 epochs with GPA at 30 ± 30 of them (`_few_shot`); cross-dataset, and
        domain generalization (evaluated on the cross-dataset model), depth 3 of 12 with GPA at 6 ± 10 of 20 epochs
        (`_cross_datasets`); base-to-new the default."""
        if protocol == "fewshot":
            return {"epochs": 50}, {"gpa_mean": 0.6, "gpa_std": 0.6}
        if protocol in ("xd", "dg"):
            return {}, {"depth": scale_depth(bb.text_layers, 0.25), "vis_depth": scale_depth(bb.vision_layers, 0.25),
                        "gpa_mean": 0.3, "gpa_std": 0.5}
        return {}, {}

    def logits(self, batch: dict) -> torch.Tensor:
        img, text = self.image_features(batch), self.class_text()
        out = self.bb.logit_scale * img @ text.t()
        # the training loss needs the features behind these logits: they ride on the logits tensor (only while
        # they can be trained), so they live exactly as long as it does (GRAM's meta-training never calls loss())
        if self.training and torch.is_grad_enabled():
            out._src_features = (img, text)
        return out

    def src_losses(self, logits: torch.Tensor, img: torch.Tensor, text: torch.Tensor,
                   batch: dict) -> dict[str, torch.Tensor]:
        """The three self-regulating losses (unweighted) of prompted features and logits against the frozen
        model's on the same images."""
        teacher_text = self.zeroshot_text().to(text.dtype)
        frozen_img = Host.image_features(self, batch).to(img.dtype)  # the plain tower, no grad
        frozen_logits = self.bb.logit_scale * frozen_img @ teacher_text.t()
        logp, logq = F.log_softmax(logits.float(), -1), F.log_softmax(frozen_logits.float(), -1)
        return {"text": (text - teacher_text).abs().mean(),
                "image": (img - frozen_img).abs().mean(),
                "logits": (logq.exp() * (logq - logp)).sum() / logits.numel()}

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, batch: dict) -> torch.Tensor:
        feats = getattr(logits, "_src_features", None)
        if feats is None:
            raise GramvlError("PromptSRC's loss needs the features behind its logits: pass the tensor that "
                              "logits() returned in training mode with gradients enabled")
        img, text = feats
        src = self.src_losses(logits, img, text, batch)
        c = self.cfg
        return (F.cross_entropy(logits, labels) + c.src_text_weight * src["text"]
                + c.src_image_weight * src["image"] + c.src_logit_weight * src["logits"])

    # ---- Gaussian prompt aggregation ------------------------------------------------------------------
    def epoch_end(self, epoch: int, epochs: int) -> None:
        if self.cfg.gpa_std <= 0:
            return
        w = gpa_weights(epochs, self.cfg.gpa_mean, self.cfg.gpa_std)[epoch - 1]
        with torch.no_grad():
            state = self.trainable_state()
            if self._gpa is None:
                self._gpa = {k: torch.zeros_like(v) for k, v in state.items()}
            for k, v in state.items():
                self._gpa[k].add_(v, alpha=w)
            if epoch == epochs:  # the run ends on the aggregate
                self.load_trainable_state(self._gpa)
                self._gpa = None

    def run_state(self) -> dict[str, torch.Tensor]:
        return {f"gpa.{k}": v.clone() for k, v in (self._gpa or {}).items()}

    def load_run_state(self, state: dict[str, torch.Tensor]) -> None:
        own = set(self.trainable_state())
        gpa = {k[4:]: v for k, v in state.items() if k.startswith("gpa.")}
        if set(state) != {f"gpa.{k}" for k in gpa} or (gpa and set(gpa) != own):
            raise GramvlError(f"checkpoint run state {sorted(state)} does not match PromptSRC's prompts "
                              f"{sorted(own)}")
        self._gpa = {k: v.clone() for k, v in gpa.items()} or None
