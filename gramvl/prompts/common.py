"""Machinery shared by the hosts: context initialization, class prompts, hand-written text weights, caching.

Every slot is a registered `nn.Parameter` whose name in `slots()` equals its attribute name, so
`torch.func.functional_call(host, {name: tensor}, (batch,))` substitutes it (GRAM's inner loop).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from gramvl.backbone import Backbone, ClassPrompts
from gramvl.errors import GramvlError
from gramvl.prompts.base import HostConfig, PromptLearner, Recipe

INIT_STD = 0.02  # N(0, 0.02) initialization of random prompts (CoOp, MaPLe, IVLP, VPT as in MaPLe's repo)


def scale_depth(layers: int, fraction: float = 0.75) -> int:
    """Prompt depth for a tower of `layers` blocks: round-half-up(0.75 * layers) (9 of 12 in MaPLe)."""
    return max(1, min(layers, int(fraction * layers + 0.5)))


def normal_init(*shape: int, std: float = INIT_STD) -> torch.Tensor:
    """A fresh N(0, std) tensor (call under `seeded(...)` for determinism)."""
    return torch.randn(*shape) * std


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block with the CPU RNG seeded, restoring the caller's RNG state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def context_init(bb: Backbone, ctx_init: str, n_ctx: int, mode: str = "exact",
                 std: float = INIT_STD) -> tuple[torch.Tensor, str]:
    """Initial context [n_ctx, d_text] and the words kept fixed between the context and the class name.

    ctx_init "" -> N(0, 0.02). Otherwise by `mode`: "exact" (CoOp/CoCoOp/KgCoOp: n_ctx must equal the
    token count), "pad" (ProGrad: zeros first, then the init tokens, n_ctx >= token count), "split"
    (MaPLe/IVLP: the first n_ctx tokens are learned, the remaining words stay fixed before the class name;
    n_ctx > token count falls back to random init, as in the MaPLe code).
    """
    d = bb.text_width
    if not ctx_init:
        return normal_init(n_ctx, d, std=std), ""
    text = ctx_init.replace("_", " ").strip()
    emb = bb.token_embeddings(text).float().cpu()
    n = emb.shape[0]
    if mode == "exact":
        if n != n_ctx:
            raise GramvlError(f"prompt length mismatch: ctx_init {ctx_init!r} has {n} tokens but n_ctx is "
                              f"{n_ctx}; set n_ctx={n} or ctx_init='' (random init)")
        return emb, ""
    if mode == "pad":
        if n > n_ctx:
            raise GramvlError(f"prompt length mismatch: ctx_init {ctx_init!r} has {n} tokens, more than "
                              f"n_ctx={n_ctx}")
        return torch.cat([torch.zeros(n_ctx - n, d), emb]), ""
    if mode == "split":
        if n_ctx > n:
            return normal_init(n_ctx, d, std=std), ""
        words = text.split()
        for k in range(len(words) + 1):
            if len(bb._encode_words(" ".join(words[:k]))) == n_ctx:
                return emb[:n_ctx], " ".join(words[k:])
        raise GramvlError(f"prompt length mismatch: the first {n_ctx} tokens of ctx_init {ctx_init!r} do not "
                          f"end on a word boundary; choose n_ctx to cover whole words")
    raise ValueError(f"unknown context init mode {mode!r}")


class Host(PromptLearner):
    """PromptLearner plus what every host here shares: forward for functional_call, hand-written weights."""

    def __init__(self, bb: Backbone, classnames: list[str], cfg: HostConfig | None = None):
        super().__init__(bb, classnames, cfg or self.default_config(bb))
        self._zs_cache: dict[tuple, torch.Tensor] = {}

    @classmethod
    def default_config(cls, bb: Backbone) -> HostConfig:
        """The method's paper defaults, with widths/depths read from `bb`."""
        return HostConfig()

    @classmethod
    def recipe_for(cls, shots: int) -> Recipe:
        """Training recipe for K-shot data (hosts with a shot-dependent schedule override)."""
        return cls.default_recipe

    def forward(self, batch: dict, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Logits, or the training loss when labels are given (one entry point for functional_call)."""
        logits = self.logits(batch)
        return logits if labels is None else self.loss(logits, labels, batch)

    def image_features(self, batch: dict) -> torch.Tensor:
        """Normalized frozen image features [B, D]: batch['features'], or the plain encoder on 'images'."""
        if "features" in batch:
            return F.normalize(batch["features"].to(self.bb.device, self.bb.dtype), dim=-1)
        with torch.no_grad():
            return self.bb.encode_image(self.images(batch))

    def zeroshot_text(self) -> torch.Tensor:
        """Frozen hand-written class weights [C, D] for cfg.templates (cached per class names)."""
        from gramvl.engine.evaluate import zeroshot_weights

        key = (tuple(self.classnames), tuple(self.cfg.templates), str(self.bb.device))
        if key not in self._zs_cache:
            self._zs_cache = {key: zeroshot_weights(self.bb, self.classnames, self.cfg.templates)}
        return self._zs_cache[key]

    def zeroshot_logits(self, batch: dict) -> torch.Tensor:
        """Logits of frozen CLIP (no prompts on either side) with the hand-written prompts (teacher)."""
        with torch.no_grad():
            img = Host.image_features(self, batch)  # cached features, or the plain image encoder
            return self.bb.logit_scale * img @ self.zeroshot_text().t()

    def images(self, batch: dict) -> torch.Tensor:
        if "images" not in batch:
            raise GramvlError(f"{self.name} prompts the image encoder: its batches need 'images', not cached "
                              f"features")
        return batch["images"].to(self.bb.device)


class TextPromptHost(Host):
    """A host with a learned text context: owns the class prompts and encodes all classes per step."""

    n_ctx: int
    fixed_words: str = ""  # words between the context and the class name (MaPLe/IVLP "split" init)

    def __init__(self, bb: Backbone, classnames: list[str], cfg: HostConfig | None = None):
        super().__init__(bb, classnames, cfg)
        self._cp: ClassPrompts | None = None
        self._freeze_text = False
        self._text_cache: torch.Tensor | None = None

    def _build_prompts(self) -> None:
        names = [f"{self.fixed_words} {c}" if self.fixed_words else c for c in self.classnames]
        self._cp = self.bb.class_prompts(names, self.n_ctx, self.cfg.class_token_position)
        self._text_cache = None

    def prompts(self) -> ClassPrompts:
        """The tokenized class prompts, on the backbone's device."""
        if self._cp is None:
            self._build_prompts()
        if self._cp.embeds.device != self.bb.device:
            self._cp = self._cp.to(self.bb.device)
        return self._cp

    def encode_classes(self, ctx: torch.Tensor, deep: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Normalized text features [..., C, D] for context ctx (chunked, optionally checkpointed).

        A context shared by all classes ([M, d], or [B, 1, M, d] for CoCoOp) is encoded packed: the prompt
        prefix that all classes share ([SOT] + context) runs once per sequence of several classes
        (`gramvl.backbone.pack_plan`, exact), 3-4x fewer text tokens than one padded prompt per class."""
        return self.bb.prompted_text_features(self.prompts(), ctx, deep=deep, chunk_size=self.cfg.text_chunk,
                                              checkpoint=self.cfg.checkpoint_text, pack=True)

    def _cached(self, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        if not self._freeze_text:
            return compute()
        if self._text_cache is None:
            with torch.no_grad():
                self._text_cache = compute()
        return self._text_cache

    @contextmanager
    def frozen_text(self) -> Iterator[None]:
        """Evaluation only: inside the block, image-independent class text features are computed once."""
        self._freeze_text, self._text_cache = True, None
        try:
            yield
        finally:
            self._freeze_text, self._text_cache = False, None

    def set_classnames(self, classnames: list[str]) -> None:
        super().set_classnames(classnames)
        self._build_prompts()


def check_depth(depth: int, layers: int, what: str) -> int:
    if not 1 <= depth <= layers:
        raise GramvlError(f"{what} prompt depth {depth} is outside 1..{layers} (the tower has {layers} "
                          f"blocks)")
    return depth
