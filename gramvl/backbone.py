"""The one module that knows open_clip: load a CLIP, tokenize, and encode with prompt slots inserted.

Text side: learnable context vectors are written into the token-embedding sequence at known positions
(shallow), and optionally replaced again at the input of later layers (deep, MaPLe/IVLP style).
Image side: visual prompt tokens are appended after the patch tokens (VPT shallow) and replaced at the
input of later layers (VPT deep); they are dropped before pooling, so empty prompts give `encode_image`.
Widths, layer counts and context length are read from the model, never hard-coded.
"""

from __future__ import annotations

import hashlib
import json
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as grad_checkpoint

from gramvl.errors import GramvlError
from gramvl.paths import assets_dir
from gramvl.rows import active as row_parallel_on
from gramvl.rows import row_apply

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
SMALL_NAME = "small"
SMALL_FILE = "small_clip.safetensors"
# packaged small CLIPs by name (`small` is the default). A replaced model stays here under its own name so
# that the results made with it can still be reproduced: `small-v1` (gramvl-small:df9e3fa9681d) made every
# table of sessions 1-6 in docs/results/; `small-v2` (gramvl-small:3ec54fee2231, session 7) made the `*_v2`
# tables; session 8's model replaced it (docs/pretraining.md).
# On the CPU a batch of 1-3 images or texts goes through other matmul kernels than a larger one, so the same row
# gets other last bits (measured on the small CLIP at one thread: every row of batches of 1-3 differs from the
# same row in a batch of 40, none of batches of 4-200). Features that a cache keeps are encoded on at least this
# many rows (`pad_rows`), so a row's bytes do not depend on the batch it falls in: not on the batch size, on
# where the data ends, or on how torchrun splits it over processes.
MIN_ROWS = 16
SMALL_MODELS = {SMALL_NAME: SMALL_FILE, "small-v1": "small_clip_v1.safetensors", "small-v2": "small_clip_v2.safetensors"}


@dataclass
class ClassPrompts:
    """Class names tokenized around `n_ctx` context slots, ready for context insertion."""

    classnames: list[str]
    tokens: torch.Tensor  # [C, L] token ids (context slots hold a placeholder id)
    embeds: torch.Tensor  # [C, L, d] frozen token embeddings
    ctx_pos: torch.Tensor  # [C, M] positions of the context slots
    eot: torch.Tensor  # [C] position of the end-of-text token (pooling)
    n_ctx: int
    position: str

    def to(self, device) -> ClassPrompts:
        return ClassPrompts(self.classnames, self.tokens.to(device), self.embeds.to(device),
                            self.ctx_pos.to(device), self.eot.to(device), self.n_ctx, self.position)


@dataclass
class PackPlan:
    """How class prompts that share a prefix are packed into few sequences (see `pack_plan`)."""

    prefix: int  # length of the shared prefix ([SOT] + context + shared words)
    src: torch.Tensor  # [G, P] flat index (class * L + position) of each packed token in the padded prompts
    pos: torch.Tensor  # [G, P] original position of each packed token (positional embedding index)
    mask: torch.Tensor  # [G, P, P] additive attention mask (0 allowed, -inf not)
    padded: int  # tokens the padded encoding runs (C x cut length)
    packed: int  # tokens the packed encoding runs (G x P)
    rows: torch.Tensor  # [G, R] offsets of the end-of-text tokens in each pack (padded by repeating one)
    eot_row: torch.Tensor  # [C] flat index (pack * R + row) of each class's end-of-text token in `rows`


def pack_plan(tokens: torch.Tensor, eot: torch.Tensor, shared_until: int | None = None,
              pack_tokens: int = 128) -> PackPlan:
    """Pack prompts [C, L] whose rows share a prefix: each sequence holds the prefix once, then the rest
    of several classes one after another; the mask lets each class's tokens see the prefix and its own
    earlier tokens only. Under a causal mask this is exact: every prefix position has the same state in
    every class, and a class's tokens never see another class's tokens.

    `shared_until` caps the prefix (class-specific context slots make rows differ from that position on).
    The classes are spread over G = ceil(rest tokens / (pack_tokens - prefix)) packs of nearly equal
    length (longest rest first, into the shortest pack), so little padding is left.
    """
    C = tokens.shape[0]
    ends = (eot + 1).tolist()
    same = (tokens == tokens[:1]).all(0).long()
    k = int(same.cumprod(0).sum())
    k = min(k, min(ends))
    if shared_until is not None:
        k = min(k, shared_until)
    k = max(k, 1)
    rest = [e - k for e in ends]
    G = max(1, math.ceil(sum(rest) / max(1, pack_tokens - k)))
    groups: list[list[int]] = [[] for _ in range(G)]
    fill = [k] * G
    for c in sorted(range(C), key=lambda c: -rest[c]):  # longest first, into the least-filled pack
        g = min(range(G), key=fill.__getitem__)
        groups[g].append(c)
        fill[g] += rest[c]
    groups = [sorted(g) for g in groups if g]
    G = len(groups)
    P = max(k + sum(ends[c] - k for c in g) for g in groups)
    L = tokens.shape[1]
    src = torch.zeros(G, P, dtype=torch.long)
    pos = torch.zeros(G, P, dtype=torch.long)
    seg = torch.full((G, P), -2, dtype=torch.long)  # -1 prefix, c class c, -2 padding
    R = max(len(g) for g in groups)
    rows = torch.zeros(G, R, dtype=torch.long)
    eot_row = torch.zeros(C, dtype=torch.long)
    for g, members in enumerate(groups):
        src[g, :k] = torch.arange(k)
        pos[g, :k] = torch.arange(k)
        seg[g, :k] = -1
        o = k
        for c in members:
            n = ends[c] - k
            src[g, o:o + n] = c * L + torch.arange(k, ends[c])
            pos[g, o:o + n] = torch.arange(k, ends[c])
            seg[g, o:o + n] = c
            r = members.index(c)
            rows[g, r] = o + n - 1
            eot_row[c] = g * R + r
            o += n
        rows[g, len(members):] = rows[g, len(members) - 1]
        if o < P:  # padding repeats the last position; it only sees itself and the prefix
            pos[g, o:] = pos[g, o - 1]
            seg[g, o:] = torch.arange(-3, -3 - (P - o), -1)
    i = torch.arange(P)
    causal = i.view(1, P, 1) >= i.view(1, 1, P)
    allowed = causal & ((seg.unsqueeze(1) == seg.unsqueeze(2)) | (seg == -1).unsqueeze(1))
    mask = torch.zeros(G, P, P).masked_fill(~allowed, float("-inf"))
    return PackPlan(k, src, pos, mask, C * int(max(ends)), G * P, rows, eot_row)


class _TextTower:
    """Uniform view of open_clip's text tower (fields live on CLIP itself or on CustomTextCLIP.text)."""

    def __init__(self, model: nn.Module):
        src = model.text if hasattr(model, "text") and hasattr(model.text, "token_embedding") else model
        if not hasattr(src, "token_embedding") or not hasattr(src, "transformer"):
            raise GramvlError("this model's text tower is not a CLIP transformer; prompt slots need one "
                              "(Hugging Face text towers are not supported)")
        if getattr(src, "cls_emb", None) is not None or getattr(src, "use_pad_mask", False):
            raise GramvlError("text towers with a class token or padding mask (CoCa-style) are not supported")
        self.token_embedding = src.token_embedding
        self.positional_embedding = src.positional_embedding
        self.transformer = src.transformer
        self.ln_final = src.ln_final
        self.text_projection = src.text_projection
        self._src = src
        self.pool_type = getattr(src, "text_pool_type", getattr(src, "pool_type", "argmax"))
        if self.pool_type not in ("argmax", "eos"):
            raise GramvlError(f"text pooling {self.pool_type!r} is not supported (need 'argmax' or 'eos')")

    @property
    def attn_mask(self) -> torch.Tensor | None:
        # read from the model every time: `.to(device)` replaces buffers with new tensors (a copy taken here
        # stayed on the CPU when the model moved to a GPU; session 5's H100 check)
        return self._src.attn_mask


def _run_blocks(transformer: nn.Module, x: torch.Tensor, attn_mask, replace,
                last_rows: torch.Tensor | None = None) -> torch.Tensor:
    """Run transformer blocks on batch-first x; `replace(i, x)` may rewrite prompt positions before block i.

    Unmasked plain blocks (image towers) run through `_block_sdpa`: the same operations as the module's
    forward, about 15% faster on CPU (no MultiheadAttention layout copies). `last_rows` [N, R]: the caller
    reads only these positions of the output, so an unmasked plain last block computes only them
    (`_block_sdpa_rows`); the result is then [N, R, d]."""
    batch_first = getattr(transformer, "batch_first", True)
    blocks = transformer.resblocks
    for i, block in enumerate(blocks):
        if replace is not None and i > 0:
            x = replace(i, x)
        if last_rows is not None and i == len(blocks) - 1 and attn_mask is None and _plain_block(block):
            return _block_sdpa_rows(block, x, None, last_rows)
        if attn_mask is None and _plain_block(block):
            x = _block_sdpa(block, x, None)
        elif not batch_first:
            x = block(x.transpose(0, 1), attn_mask=attn_mask).transpose(0, 1)
        else:
            x = block(x, attn_mask=attn_mask)
    if last_rows is not None:
        x = x.gather(1, last_rows.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    return x


def _run_blocks_seq_first(transformer: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
    """Blocks on batch-first x [N, L, d], run on a contiguous [L, N, d] copy with the attention modules
    told so: nn.MultiheadAttention would otherwise transpose a batch-first input itself, and its input
    projection on that strided view (input requiring grad) becomes L small batched matmuls instead of one."""
    attns = [b.attn for b in transformer.resblocks]
    flags = [a.batch_first for a in attns]
    x = x.transpose(0, 1).contiguous()
    try:
        for a in attns:
            a.batch_first = False
        for block in transformer.resblocks:
            x = block(x, attn_mask=attn_mask)
    finally:
        for a, f in zip(attns, flags, strict=True):
            a.batch_first = f
    return x.transpose(0, 1)


def _block_sdpa_rows(block: nn.Module, x: torch.Tensor, mask: torch.Tensor | None,
                     rows: torch.Tensor) -> torch.Tensor:
    """`_block_sdpa(block, x, mask)[n, rows[n]]` [N, R, d], computing only what those rows need: keys and
    values at every position, but queries, attention output, output projection and MLP at the R rows.
    A tower's last block feeds its pooled feature from one token per sequence (text: end-of-text; image:
    class token), so this is exact there and skips most of that block's work."""
    attn = block.attn
    N, L, d = x.shape
    R = rows.shape[1]
    H = attn.num_heads
    w, b = attn.in_proj_weight, attn.in_proj_bias
    h = block.ln_1(x)
    k, v = F.linear(h, w[d:], b[d:]).view(N, L, 2, H, d // H).permute(2, 0, 3, 1, 4).unbind(0)
    take = rows.unsqueeze(-1).expand(N, R, d)
    xr = x.gather(1, take)
    q = F.linear(h.gather(1, take), w[:d], b[:d]).view(N, R, H, d // H).transpose(1, 2)
    m = None
    if mask is not None:  # [N or 1, 1, L, L] -> the rows' lines [N, 1, R, L]
        m = mask.expand(N, 1, L, L).gather(2, rows.view(N, 1, R, 1).expand(N, 1, R, L)).to(q.dtype)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
    xr = xr + block.ls_1(attn.out_proj(o.transpose(1, 2).reshape(N, R, d)))
    return xr + block.ls_2(block.mlp(block.ln_2(xr)))


def _plain_block(block: nn.Module) -> bool:
    """open_clip's ResidualAttentionBlock with a self-attention nn.MultiheadAttention (what `_block_sdpa`
    re-states); anything else goes through the module's own forward."""
    attn = getattr(block, "attn", None)
    return (type(block).__name__ == "ResidualAttentionBlock" and isinstance(attn, nn.MultiheadAttention)
            and attn._qkv_same_embed_dim and attn.in_proj_bias is not None and attn.bias_k is None
            and not attn.add_zero_attn and not hasattr(block, "ln_1_kv") and attn.dropout == 0.0)


def _block_sdpa(block: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """open_clip's ResidualAttentionBlock.forward on batch-first x [N, L, d] with an additive mask that
    broadcasts over heads ([N or 1, 1, L, L]): the same operations as nn.MultiheadAttention (packed
    input projection, scaled dot-product attention, output projection), without its layout round trips
    (a strided input projection and per-head mask copies, which dominate small text towers on CPU)."""
    attn = block.attn
    N, L, d = x.shape
    H = attn.num_heads
    qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).view(N, L, 3, H, d // H)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # [N, H, L, dh] each
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask.to(q.dtype))
    o = attn.out_proj(o.transpose(1, 2).reshape(N, L, d))
    x = x + block.ls_1(o)
    return x + block.ls_2(block.mlp(block.ln_2(x)))


class Backbone(nn.Module):
    """A frozen CLIP plus prompt-aware encoders. `ident` names the architecture and weights."""

    def __init__(self, model: nn.Module, tokenizer, ident: str, mean=OPENAI_MEAN, std=OPENAI_STD,
                 meta: dict | None = None):
        super().__init__()
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer
        self.ident = ident
        self.mean, self.std = tuple(mean), tuple(std)
        self.meta = meta or {}
        self._text = _TextTower(model)
        self.context_length = int(self._text.positional_embedding.shape[0])
        self.text_width = int(self._text.token_embedding.weight.shape[1])
        self.text_layers = len(self._text.transformer.resblocks)
        self.embed_dim = int(self._project_dim())
        v = model.visual
        self.is_vit = hasattr(v, "conv1") and hasattr(v, "class_embedding") and hasattr(v, "transformer")
        self.vision_width = int(v.class_embedding.shape[-1]) if self.is_vit else 0
        self.vision_layers = len(v.transformer.resblocks) if self.is_vit else 0
        # plain ViT towers encode through our direct block path (same arithmetic as open_clip's forward)
        self._direct_vit = (self.is_vit and hasattr(v, "_embeds") and hasattr(v, "_pool")
                            and not getattr(v, "output_tokens", False)
                            and not getattr(v.transformer, "grad_checkpointing", False)
                            and all(_plain_block(b) for b in v.transformer.resblocks))
        self._cls_pool = (self._direct_vit and getattr(v, "attn_pool", None) is None
                          and getattr(v, "pool_type", None) == "tok")
        size = getattr(v, "image_size", 224)
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.sot_id = int(tokenizer.sot_token_id)
        self.eot_id = int(tokenizer.eot_token_id)
        self.placeholder_id = int(self._encode_words("X")[0])

    # ----------------------------------------------------------------------------------- info
    def _project_dim(self) -> int:
        proj = self._text.text_projection
        if proj is None:
            return self.text_width
        return proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1]

    @property
    def device(self) -> torch.device:
        return self._text.token_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self._text.token_embedding.weight.dtype

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.exp().clamp(max=100.0)

    def describe(self) -> dict:
        return {"ident": self.ident, "embed_dim": self.embed_dim, "text_width": self.text_width,
                "text_layers": self.text_layers, "vision_width": self.vision_width,
                "vision_layers": self.vision_layers, "context_length": self.context_length,
                "image_size": self.image_size, "logit_scale": float(self.logit_scale)}

    # ----------------------------------------------------------------------------------- text
    def _encode_words(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """Token ids [N, context_length] exactly as open_clip tokenizes them."""
        return self.tokenizer(texts).to(self.device)

    def token_embeddings(self, text: str) -> torch.Tensor:
        """Embeddings [n_tokens, d_text] of the words of `text` (no start/end tokens): word-init of contexts."""
        ids = torch.tensor(self._encode_words(text), device=self.device)
        return self._text.token_embedding(ids).detach().clone()

    def class_prompts(self, classnames: list[str], n_ctx: int, position: str = "end",
                      suffix: str = ".") -> ClassPrompts:
        """Tokenize `[SOT] ctx*M name{suffix} [EOT]` (position end), or name/ctx split as CoOp's middle/front."""
        if position not in ("end", "middle", "front"):
            raise GramvlError(f"class token position must be end, middle or front, not {position!r}")
        L = self.context_length
        rows, pos_rows, eots = [], [], []
        for name in classnames:
            name_ids = self.tokenizer.encode(name.replace("_", " ") + suffix)
            dot = self.tokenizer.encode(suffix) if suffix else []
            if position == "end":
                body = [None] * n_ctx + name_ids
            elif position == "front":
                cls_ids = name_ids[: len(name_ids) - len(dot)] if dot else name_ids
                body = cls_ids + [None] * n_ctx + dot
            else:
                half = n_ctx // 2
                cls_ids = name_ids[: len(name_ids) - len(dot)] if dot else name_ids
                body = [None] * half + cls_ids + [None] * (n_ctx - half) + dot
            ids = [self.sot_id] + body + [self.eot_id]
            if len(ids) > L:
                raise GramvlError(
                    f"prompt length mismatch: class name {name!r} needs {len(name_ids)} tokens; with "
                    f"{n_ctx} context tokens the prompt has {len(ids)} tokens, more than the model's text "
                    f"context length {L}. Use fewer context tokens or a shorter class name.")
            pos = [i for i, t in enumerate(ids) if t is None]
            ids = [self.placeholder_id if t is None else t for t in ids] + [0] * (L - len(ids))
            rows.append(ids)
            pos_rows.append(pos)
            eots.append(len(body) + 1)
        dev = self.device
        tokens = torch.tensor(rows, dtype=torch.long, device=dev)
        with torch.no_grad():
            embeds = self._text.token_embedding(tokens)
        ctx_pos = torch.tensor(pos_rows, dtype=torch.long, device=dev).reshape(len(classnames), n_ctx)
        return ClassPrompts(list(classnames), tokens, embeds, ctx_pos,
                            torch.tensor(eots, dtype=torch.long, device=dev), n_ctx, position)

    def _insert(self, base: torch.Tensor, pos: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        """Write ctx [..., C, M, d] (broadcastable) into base [..., C, L, d] at positions pos [C, M]."""
        lead = torch.broadcast_shapes(base.shape[:-2], ctx.shape[:-2])
        base = base.expand(*lead, *base.shape[-2:])
        ctx = ctx.expand(*lead, *ctx.shape[-2:]).to(base.dtype)
        idx = pos.expand(*lead[:-1], *pos.shape).unsqueeze(-1).expand(*lead, pos.shape[-1], base.shape[-1])
        return torch.scatter(base, -2, idx, ctx)

    def _text_forward(self, x: torch.Tensor, eot: torch.Tensor, pos: torch.Tensor | None,
                      deep: list[torch.Tensor] | None) -> torch.Tensor:
        """x [N, L, d] token embeddings (prompts inserted); deep[i-1] replaces the slots before block i."""
        t = self._text
        # causal attention: tokens after the last end-of-text token cannot affect any pooled feature, so the
        # sequence is cut there (exact; 2-3x less text compute for CLIP's 77-token context)
        L = int(eot.max()) + 1 if t.attn_mask is not None else x.shape[1]
        x = x[:, :L] + t.positional_embedding[:L].to(x.dtype)
        replace = None
        if deep:
            n = len(deep)

            def replace(i: int, h: torch.Tensor) -> torch.Tensor:
                if i > n:
                    return h
                return self._insert(h, pos, deep[i - 1].unsqueeze(0) if deep[i - 1].dim() == 2 else deep[i - 1])

        mask = t.attn_mask[:L, :L] if t.attn_mask is not None else None
        x = _run_blocks(t.transformer, x, mask, replace)
        x = t.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), eot]
        proj = t.text_projection
        if proj is not None:
            x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
        return x

    def _pack_plan(self, cp: ClassPrompts, pack_tokens: int) -> PackPlan | None:
        """The packing plan of `cp` (cached on it), or None when packing cannot apply or would not pay:
        it needs a causal text tower of nn.MultiheadAttention blocks and context slots that lie in the
        prefix all prompts share (class token at the end), and must save a quarter of the tokens."""
        cache = cp.__dict__.setdefault("_pack_plans", {})
        if pack_tokens not in cache:
            t = self._text
            plan = None
            if t.attn_mask is not None and all(isinstance(getattr(b, "attn", None), nn.MultiheadAttention)
                                               for b in t.transformer.resblocks):
                plan = pack_plan(cp.tokens.cpu(), cp.eot.cpu(), None, pack_tokens)
                slots_shared = bool((cp.ctx_pos == cp.ctx_pos[:1]).all()) and int(cp.ctx_pos.max()) < plan.prefix
                if not slots_shared or plan.packed > 0.75 * plan.padded:
                    plan = None
                else:
                    dev = self.device
                    plan = PackPlan(plan.prefix, plan.src.to(dev), plan.pos.to(dev),
                                    plan.mask.to(dev, self.dtype), plan.padded, plan.packed,
                                    plan.rows.to(dev), plan.eot_row.to(dev))
            cache[pack_tokens] = plan
        return cache[pack_tokens]

    def _packed_text_features(self, cp: ClassPrompts, ctx: torch.Tensor | None, plan: PackPlan,
                              chunk_size: int | None, checkpoint: bool) -> torch.Tensor:
        """Features [..., C, D] (unnormalized) for a context shared by all classes: [..., 1, M, d] or None."""
        t = self._text
        C, L, d = cp.embeds.shape
        G, P = plan.pos.shape
        base = cp.__dict__.get("_packed_embeds")
        if base is None or base.shape != (G, P, d):
            base = cp.embeds.reshape(C * L, d)[plan.src.reshape(-1)].reshape(G, P, d)
            base = base + t.positional_embedding[plan.pos].to(base.dtype)
            cp.__dict__["_packed_embeds"] = base
        if ctx is None:
            x, lead = base, ()
        else:
            lead = ctx.shape[:-3]
            slots = cp.ctx_pos[:1].expand(G, -1)  # the context sits at the same prefix slots of every pack
            pe = t.positional_embedding[cp.ctx_pos[0]].to(base.dtype)
            x = self._insert(base, slots, ctx.to(base.dtype) + pe)  # [..., G, P, d]
        x = x.reshape(-1, P, d)
        heads = t.transformer.resblocks[0].attn.num_heads

        blocks = t.transformer.resblocks
        direct = all(_plain_block(b) for b in blocks)

        def run(h: torch.Tensor, first: int) -> torch.Tensor:
            g = torch.arange(first, first + h.shape[0], device=h.device) % G  # pack of each row
            if direct:  # the last block runs at the end-of-text rows only
                whole = h.shape[0] == G and first % G == 0
                mask = (plan.mask if whole else plan.mask[g]).unsqueeze(1)
                for b in blocks[:-1]:
                    h = _block_sdpa(b, h, mask)
                return t.ln_final(_block_sdpa_rows(blocks[-1], h, mask, plan.rows if whole else plan.rows[g]))
            mask = plan.mask.to(h.dtype)[g].repeat_interleave(heads, 0)  # [rows * heads, P, P]
            h = _run_blocks_seq_first(t.transformer, h, mask)
            return t.ln_final(h.gather(1, plan.rows[g].unsqueeze(-1).expand(-1, -1, d)))

        if row_parallel_on():  # parts of packed sequences, one intra-op thread each (gramvl/rows.py)
            first = torch.arange(x.shape[0])
            h = row_apply(lambda h, i: (grad_checkpoint(run, h, int(i[0]), use_reentrant=False)
                                        if checkpoint and torch.is_grad_enabled() else run(h, int(i[0]))),
                          [x, first], [True, True])
        else:
            step = max(1, chunk_size * G // C) if chunk_size else x.shape[0]  # about chunk_size classes per chunk
            outs = []
            for s in range(0, x.shape[0], step):
                h = x[s:s + step]
                outs.append(grad_checkpoint(run, h, s, use_reentrant=False)
                            if checkpoint and torch.is_grad_enabled() else run(h, s))
            h = torch.cat(outs)
        h = h.reshape(-1, G * plan.rows.shape[1], d)[:, plan.eot_row]  # [N, C, d]
        proj = t.text_projection
        if proj is not None:
            h = proj(h) if isinstance(proj, nn.Linear) else h @ proj
        return h.reshape(*lead, C, -1)

    def prompted_text_features(self, cp: ClassPrompts, ctx: torch.Tensor | None,
                               deep: list[torch.Tensor] | None = None, normalize: bool = True,
                               chunk_size: int | None = 256, checkpoint: bool = False,
                               pack: bool = False, pack_tokens: int = 128) -> torch.Tensor:
        """Text features [..., C, D] with context ctx of shape [M, d], [C, M, d] or [B, 1|C, M, d].

        Classes are encoded in chunks of `chunk_size` rows (bounded memory); with `checkpoint` each chunk's
        activations are recomputed in backward instead of stored, so 1000-class tuning fits small GPUs.
        Deep prompts: list of [M, d] (or [C, M, d]) tensors for blocks 1..len(deep).

        `pack`: encode the prefix that all class prompts share ([SOT] and a shared context) once per
        sequence of several classes instead of once per class (exact under the causal mask; see
        `pack_plan`). Used when it saves at least a quarter of the text tokens and no deep prompts are set.
        """
        C = len(cp.classnames)
        if ctx is not None:
            if ctx.shape[-2:] != (cp.n_ctx, self.text_width):
                raise GramvlError(f"prompt length mismatch: context of shape {tuple(ctx.shape)} does not fit "
                                  f"{cp.n_ctx} slots of width {self.text_width}")
            if ctx.dim() == 2:
                ctx = ctx.unsqueeze(0)
        if pack and not deep and (ctx is None or ctx.shape[-3] == 1):
            plan = self._pack_plan(cp, pack_tokens)
            if plan is not None:
                feats = self._packed_text_features(cp, ctx, plan, chunk_size, checkpoint)
                return F.normalize(feats, dim=-1) if normalize else feats
        x = cp.embeds if ctx is None else self._insert(cp.embeds, cp.ctx_pos, ctx)
        lead = x.shape[:-3]
        flat = x.reshape(-1, *x.shape[-2:])
        n_rep = flat.shape[0] // C
        eot = cp.eot.repeat(n_rep)
        pos = cp.ctx_pos.repeat(n_rep, 1)
        if deep:
            deep = [d if d.dim() == 2 else d.expand(*lead, C, *d.shape[-2:]).reshape(-1, *d.shape[-2:])
                    for d in deep]
        if row_parallel_on():  # parts of the class prompts, one intra-op thread each (gramvl/rows.py)
            def part(x, e, p, *dp):
                args = (x, e, p, list(dp) or None)
                if checkpoint and torch.is_grad_enabled():
                    return grad_checkpoint(self._text_forward, *args, use_reentrant=False)
                return self._text_forward(*args)

            dl = deep or []
            feats = row_apply(part, [flat, eot, pos, *dl], [True, True, True, *(d.dim() == 3 for d in dl)])
            feats = feats.reshape(*lead, C, -1)
            return F.normalize(feats, dim=-1) if normalize else feats
        step = chunk_size or flat.shape[0]
        outs = []
        for s in range(0, flat.shape[0], step):
            sl = slice(s, s + step)
            dchunk = None
            if deep:
                dchunk = [d if d.dim() == 2 else d[sl] for d in deep]
            args = (flat[sl], eot[sl], pos[sl], dchunk)
            if checkpoint and torch.is_grad_enabled():
                outs.append(grad_checkpoint(self._text_forward, *args, use_reentrant=False))
            else:
                outs.append(self._text_forward(*args))
        feats = torch.cat(outs).reshape(*lead, C, -1)
        return F.normalize(feats, dim=-1) if normalize else feats

    @torch.no_grad()
    def encode_texts(self, texts: list[str], normalize: bool = True, chunk_size: int = 512) -> torch.Tensor:
        """Plain text features [N, D] (open_clip's encode_text), computed in chunks; a text's features do not depend
        on the chunk it falls in (`pad_rows`)."""
        outs = []
        for s in range(0, len(texts), chunk_size):
            outs.append(pad_rows(self.model.encode_text, self.tokenize(texts[s:s + chunk_size])))
        feats = torch.cat(outs) if outs else torch.zeros(0, self.embed_dim, device=self.device)
        return F.normalize(feats, dim=-1) if normalize else feats

    # ----------------------------------------------------------------------------------- image
    @torch.no_grad()
    def encode_image_rows(self, images: torch.Tensor) -> torch.Tensor:
        """Plain normalized image features [B, D], each row independent of the batch it sits in (`pad_rows`): the
        way features that a cache keeps are encoded."""
        return pad_rows(self.encode_image, images)

    def encode_image(self, images: torch.Tensor, prompts: torch.Tensor | None = None,
                     deep: list[torch.Tensor] | None = None, normalize: bool = True) -> torch.Tensor:
        """Image features [B, D]; prompts [M, d] or [B, M, d] appended after the patch tokens (VPT)."""
        if row_parallel_on():  # parts of the batch, one intra-op thread each (gramvl/rows.py)
            dl = deep or []
            return row_apply(lambda x, p, *dp: self._encode_image(x, p, list(dp) or None, normalize),
                             [images, prompts, *dl],
                             [True, prompts is not None and prompts.dim() == 3, *(d.dim() == 3 for d in dl)])
        return self._encode_image(images, prompts, deep, normalize)

    def _encode_image(self, images: torch.Tensor, prompts: torch.Tensor | None, deep: list[torch.Tensor] | None,
                      normalize: bool) -> torch.Tensor:
        if prompts is None and not deep and not self._direct_vit:
            feats = self.model.encode_image(images)
            return F.normalize(feats, dim=-1) if normalize else feats
        if not self.is_vit:
            raise GramvlError("visual prompts need a ViT image tower; this model's image tower is not a ViT")
        v = self.model.visual
        x = v._embeds(images.to(self.dtype))
        B, n_tok = x.shape[0], x.shape[1]
        if prompts is None:
            if deep:
                raise GramvlError("deep visual prompts need shallow prompts for the first layer")
            prompts = x.new_zeros(0, self.vision_width)  # the plain tower, through the direct block path
        if prompts.shape[-1] != self.vision_width:
            raise GramvlError(f"prompt length mismatch: visual prompts of width {prompts.shape[-1]} do not fit "
                              f"the image tower's width {self.vision_width}")
        p = prompts.expand(B, *prompts.shape[-2:]) if prompts.dim() == 2 else prompts
        M = p.shape[1]
        x = torch.cat([x, p.to(x.dtype)], dim=1)
        replace = None
        if deep:
            n = len(deep)

            def replace(i: int, h: torch.Tensor) -> torch.Tensor:
                if i > n:
                    return h
                d = deep[i - 1]
                d = d.expand(B, *d.shape[-2:]) if d.dim() == 2 else d
                return torch.cat([h[:, :n_tok], d.to(h.dtype)], dim=1)

        if self._cls_pool:  # the pooled feature reads the class token only: the last block computes just it
            x = _run_blocks(v.transformer, x, None, replace, last_rows=x.new_zeros(B, 1, dtype=torch.long))
        else:
            x = _run_blocks(v.transformer, x, None, replace)
            x = x[:, : x.shape[1] - M]
        pooled, _ = v._pool(x)
        if v.proj is not None:
            pooled = pooled @ v.proj
        return F.normalize(pooled, dim=-1) if normalize else pooled

    # ----------------------------------------------------------------------------------- transforms
    def transform(self, train: bool = False):
        """torchvision preprocessing at the model's resolution (train: random resized crop + flip)."""
        from torchvision import transforms as T

        norm = T.Normalize(self.mean, self.std)
        size = self.image_size
        if train:
            return T.Compose([T.RandomResizedCrop(size, scale=(0.5, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                              T.RandomHorizontalFlip(), T.ToTensor(), norm])
        return T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size),
                          T.ToTensor(), norm])


def pad_rows(fn, x: torch.Tensor, rows: int = MIN_ROWS) -> torch.Tensor:
    """fn(x) for a batch x, run on at least `rows` rows: a smaller batch is padded with copies of its last row,
    and only its own rows are returned (see MIN_ROWS)."""
    n = x.shape[0]
    if n == 0 or n >= rows:
        return fn(x)
    return fn(torch.cat([x, x[-1:].expand(rows - n, *x.shape[1:])]))[:n]


# ======================================================================================= loading
def _file_digest(path: Path, limit: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(limit))
    h.update(str(path.stat().st_size).encode())
    return h.hexdigest()[:12]


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a third-party weights file: .safetensors, or .pt/.bin via torch.load(weights_only=True).

    OpenAI's released .pt files are TorchScript archives; their tensors are read with torch.jit.load.
    """
    path = Path(path)
    if not path.is_file():
        raise GramvlError(f"weights file not found: {path}. gramvl never downloads weights: fetch the file on a "
                          f"connected machine (see docs/real-weights.md) and pass its path with --weights")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path))
        except Exception as e:
            raise GramvlError(f"{path} is not a valid safetensors file ({e})") from e
    elif _is_torchscript(path):
        sd = torch.jit.load(str(path), map_location="cpu").state_dict()
        for k in ("input_resolution", "context_length", "vocab_size"):
            sd.pop(k, None)
    else:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:
            raise GramvlError(f"could not read weights file {path} with torch.load(weights_only=True): {e}") from e
        if isinstance(obj, dict) and "state_dict" in obj:
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise GramvlError(f"{path} does not hold a state dict")
        sd = obj
    if sd and next(iter(sd)).startswith("module."):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _load_into(model: nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in sd and not k.endswith("attn_mask")]
    unexpected = [k for k in sd if k not in own]
    shape = [k for k in sd if k in own and own[k].shape != sd[k].shape]
    if missing or unexpected or shape:
        parts = []
        if shape:
            k = shape[0]
            parts.append(f"{len(shape)} tensors of another shape (e.g. {k}: file {tuple(sd[k].shape)} vs "
                         f"model {tuple(own[k].shape)})")
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise GramvlError(f"checkpoint from another backbone: {what} does not match the architecture: "
                          + "; ".join(parts))
    model.load_state_dict(sd, strict=False)


def small_model_paths(path: str | Path | None = None) -> tuple[Path, Path]:
    """(weights, sidecar) of a packaged small CLIP by name (None = `small`) or of a .safetensors path."""
    p = assets_dir() / SMALL_MODELS[str(path or SMALL_NAME)] if path is None or str(path) in SMALL_MODELS \
        else Path(path)
    return p, p.with_suffix(".json")


def small_model_ident(name: str = SMALL_NAME) -> str:
    """The ident (`gramvl-small:<digest>`) a packaged small CLIP loads with, without loading it."""
    path, _ = small_model_paths(name)
    if not path.is_file():
        raise GramvlError(f"small CLIP checkpoint not found at {path}")
    return f"gramvl-small:{_file_digest(path)}"


def build_small_clip(config: dict) -> nn.Module:
    """Instantiate an open_clip CLIP from our JSON config's `model_cfg` (random init)."""
    import open_clip

    cfg = dict(config["model_cfg"])
    return open_clip.CLIP(**cfg)


def small_tokenizer(config: dict):
    import open_clip

    return open_clip.SimpleTokenizer(context_length=config["model_cfg"]["text_cfg"]["context_length"])


def load_backbone(model: str = SMALL_NAME, weights: str | Path | None = None, device: str = "cpu",
                  allow_random: bool = False, seed: int = 0) -> Backbone:
    """Load `small` (our packaged CLIP), a gramvl small-CLIP file, or an open_clip architecture by name.

    open_clip models need `weights` (a local file); `weights='random'` (or allow_random) gives random
    init, for tests and memory measurements only.
    """
    import open_clip

    if model in SMALL_MODELS or str(model).endswith(".safetensors"):
        if weights is not None:  # `--model small --weights FILE`: FILE is a small-CLIP checkpoint
            if not str(weights).endswith(".safetensors"):
                raise GramvlError(f"--weights {weights} for the small CLIP must be a gramvl small-CLIP "
                                  f".safetensors file (with its .json sidecar)")
            model = str(weights)
        path, side = small_model_paths(model)
        if not path.is_file() or not side.is_file():
            raise GramvlError(f"small CLIP checkpoint not found at {path} (+ {side.name}); it ships with the "
                              f"package, or rebuild it with `gramvl pretrain` (see docs/pretraining.md)")
        config = json.loads(side.read_text())
        if config.get("format") != "gramvl-small-clip":
            raise GramvlError(f"{side} is not a gramvl small-CLIP config")
        net = build_small_clip(config)
        from safetensors.torch import load_file

        sd = {k: v.float() for k, v in load_file(str(path)).items()}
        _load_into(net, sd, str(path))
        ident = f"gramvl-small:{_file_digest(path)}"
        bb = Backbone(net, small_tokenizer(config), ident, config.get("mean", OPENAI_MEAN),
                      config.get("std", OPENAI_STD), meta=config)
        return bb.to(device)

    if model not in open_clip.list_models():
        raise GramvlError(f"unknown model {model!r}: use {' or '.join(repr(m) for m in SMALL_MODELS)}, a "
                          f"small-CLIP .safetensors file or an open_clip architecture name such as "
                          f"ViT-B-16 or ViT-B-32 (`python -c 'import open_clip; print(open_clip.list_models())'`)")
    if weights is None and not allow_random:
        raise GramvlError(f"no weights file for {model}: gramvl never downloads. Download the weights on a "
                          f"connected machine (docs/real-weights.md) and pass --weights FILE "
                          f"(or --weights random for a randomly initialized model)")
    torch.manual_seed(seed)
    net = open_clip.create_model(model, pretrained=None)
    if weights is not None and str(weights) != "random":
        _load_into(net, load_state_dict_file(weights), str(weights))
        ident = f"{model}:{_file_digest(Path(weights))}"
    else:
        ident = f"{model}:random-init-seed{seed}"
    cfg = getattr(net.visual, "preprocess_cfg", {}) or {}
    tok = open_clip.get_tokenizer(model)
    return Backbone(net, tok, ident, cfg.get("mean", OPENAI_MEAN), cfg.get("std", OPENAI_STD)).to(device)
