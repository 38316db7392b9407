"""Grouped-query attention and its two backends.

Masks are described once, as FlexAttention ``mask_mod`` functions ``(b, h, q_idx, kv_idx) -> bool``:
causal AND same-document, AND any extra mask_mod a family composes in (a sliding window, say). The "flex"
backend turns them into a ``BlockMask``; the "sdpa" backend evaluates the same functions on broadcast index
tensors into a dense boolean mask (or uses SDPA's ``is_causal`` fast path when there is nothing but
causality). Either way the model builds the mask ONCE per forward (``backend.build_mask``) and hands it to
every layer.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import (
    AuxRequest,
    BlockMask,
    and_masks,
    flex_attention,
)

from posttrain.models.common.block_mask import block_mask_from_mask_mod, document_block_mask
from posttrain.models.common.decode_attention import matmul_decode_attention, sdpa_decode_attention, uses_matmul
from posttrain.models.common.flash_attention_4 import activate_fa4

from posttrain.models.common.rms_norm import RMSNorm
from posttrain.models.common.rope import apply_rotary_emb
from posttrain.models.common.shared_prompts import SHARED_FLAG, prompt_of

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# What build_mask returns and every layer receives: None (causal fast path), a dense bool Tensor, or a BlockMask.
AttentionMask = Any


# ---------------------------------------------------------------------------------------------- mask mods


def causal_mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
    return q_idx >= kv_idx


def document_mask_mod(document_ids: torch.Tensor) -> MaskMod:
    """Attend only within the same document; document_ids [B, S]. A position with a negative id (padding) attends
    only to itself: its output is never used, and as one causal "document" a padded tail of P positions would cost
    the attention kernels P^2 / 2 pairs (GRPO's last packed row of a minibatch is often mostly padding). A
    completion whose prompt is shared (ids from ``shared_prompts.shared_document_id``) also sees its prompt."""

    def same_document(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        q_doc, kv_doc = document_ids[b, q_idx], document_ids[b, kv_idx]
        own = (q_doc == kv_doc) & ((q_doc >= 0) | (q_idx == kv_idx))
        return own | ((kv_doc >= SHARED_FLAG) & (prompt_of(q_doc) == kv_doc))

    return same_document


def sliding_window_mask_mod(window: int) -> MaskMod:
    """Attend to at most the last ``window`` positions (the query's own included)."""

    def in_window(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return q_idx - kv_idx < window

    _SLIDING_WINDOWS[in_window] = window
    return in_window


# the mask_mods made by sliding_window_mask_mod and their windows: FlexBackend builds their block masks from block
# positions; any other mask_mod (a wrapped one included) is evaluated position by position
_SLIDING_WINDOWS: weakref.WeakKeyDictionary[MaskMod, int] = weakref.WeakKeyDictionary()


def document_ids_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Number documents in packed rows: a new document starts wherever the position does not go up by one."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return starts.long().cumsum(-1) - 1


def _compose(document_ids: torch.Tensor | None, extra_mask_mod: MaskMod | None) -> MaskMod:
    mods = [causal_mask_mod]
    if document_ids is not None:
        mods.append(document_mask_mod(document_ids))
    if extra_mask_mod is not None:
        mods.append(extra_mask_mod)
    return mods[0] if len(mods) == 1 else and_masks(*mods)


# ---------------------------------------------------------------------------------------------- backends


# model.sdpa_kernel: which of SDPA's kernels to run; "auto" leaves the choice to torch. "fa4" is SDPA's flash entry
# with its kernels switched to FlashAttention-4 (flash_attention_4.py).
SDPA_KERNELS: dict[str, SDPBackend | None] = {
    "auto": None,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "fa4": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}


def sdpa_kernel_for(name: str) -> SDPBackend | None:
    if name not in SDPA_KERNELS:
        raise ValueError(f"unknown sdpa_kernel {name!r}; choose one of {sorted(SDPA_KERNELS)}")
    return SDPA_KERNELS[name]


class SDPABackend:
    """``F.scaled_dot_product_attention``: is_causal fast path, or a dense [B, 1, S, S] boolean mask.

    ``kernel`` (a key of ``SDPA_KERNELS``) pins SDPA to one kernel for the training forward and backward;
    torch raises "No available kernel" when that kernel cannot take the inputs (dtype, head size, device).
    "fa4" switches the process's flash kernels to FlashAttention-4 here, when the model is built
    (``FlashAttention4Unavailable`` says why it cannot)."""

    name = "sdpa"

    def __init__(self, kernel: str = "auto") -> None:
        self.kernel = sdpa_kernel_for(kernel)
        if kernel == "fa4":
            activate_fa4()

    def build_mask(
        self,
        document_ids: torch.Tensor | None,
        *,
        batch: int,
        seq_len: int,
        device: torch.device,
        extra_mask_mod: MaskMod | None = None,
    ) -> torch.Tensor | None:
        if document_ids is None and extra_mask_mod is None:
            return None
        mask_mod = _compose(document_ids, extra_mask_mod)
        b = torch.arange(batch, device=device).view(batch, 1, 1)
        h = torch.zeros((), dtype=torch.long, device=device)
        q_idx = torch.arange(seq_len, device=device).view(1, seq_len, 1)
        kv_idx = torch.arange(seq_len, device=device).view(1, 1, seq_len)
        dense = mask_mod(b, h, q_idx, kv_idx)
        return dense.expand(batch, seq_len, seq_len).unsqueeze(1)

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float | None = None
    ) -> torch.Tensor:
        if self.kernel is None:
            return sdpa_attention(q, k, v, mask, scale)
        with sdpa_kernel([self.kernel]):
            return sdpa_attention(q, k, v, mask, scale)


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float | None = None
) -> torch.Tensor:
    """SDPA with the is_causal fast path (mask None) or a dense boolean mask [B, 1, Sq, Sk]."""
    gqa = q.shape[1] != k.shape[1]
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa, scale=scale)
    if q.shape[2] < k.shape[2]:  # KV-cache decoding: a few queries per row against the cache
        if uses_matmul(q):
            return matmul_decode_attention(q, k, v, mask, scale)
        if gqa:
            return sdpa_decode_attention(q, k, v, mask, scale)
    # Kernels that take an explicit mask do not all support GQA, so expand k/v instead of enable_gqa.
    if gqa:
        n_rep = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(n_rep, dim=1)
        v = v.repeat_interleave(n_rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


# Compiled once per process, lazily. On the CPU the eager (unfused, exact) path is used instead: compiling
# costs ~20 s per process there, more than a debug run spends attending. Set to True to compile on CPU too.
COMPILE_FLEX_ON_CPU = False
_compiled_flex_attention: Callable[..., torch.Tensor] | None = None


def _use_compiled(device: torch.device) -> bool:
    return device.type != "cpu" or COMPILE_FLEX_ON_CPU


def _flex_attention_fn(device: torch.device) -> Callable[..., torch.Tensor]:
    global _compiled_flex_attention
    if not _use_compiled(device):
        return flex_attention
    if _compiled_flex_attention is None:
        _compiled_flex_attention = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex_attention


class FlexBackend:
    """FlexAttention with a ``BlockMask`` from the composed mask_mod (fully masked blocks are skipped)."""

    name = "flex"

    def __init__(self) -> None:
        self._shape_only_masks: dict[tuple, BlockMask] = {}

    def build_mask(
        self,
        document_ids: torch.Tensor | None,
        *,
        batch: int,
        seq_len: int,
        device: torch.device,
        extra_mask_mod: MaskMod | None = None,
    ) -> BlockMask:
        if document_ids is None:
            # Without documents the mask depends only on the shape: build it once, not every forward.
            key = (seq_len, str(device), extra_mask_mod)
            if key not in self._shape_only_masks:
                mask_mod = _compose(None, extra_mask_mod)
                self._shape_only_masks[key] = block_mask_from_mask_mod(mask_mod, 1, seq_len, seq_len, device)
            return self._shape_only_masks[key]
        if document_ids.shape[0] != batch or document_ids.shape[1] < seq_len:
            raise ValueError(f"document_ids {tuple(document_ids.shape)} do not cover {batch} rows of {seq_len} positions")
        mask_mod = _compose(document_ids, extra_mask_mod)
        window = None if extra_mask_mod is None else _SLIDING_WINDOWS.get(extra_mask_mod)
        if extra_mask_mod is None or window is not None:  # causal within documents (in a sliding window)
            return document_block_mask(document_ids, seq_len, mask_mod, window=window)
        return block_mask_from_mask_mod(mask_mod, batch, seq_len, seq_len, device)

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockMask, scale: float | None = None,
        *, return_lse: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Attention output [B, H, S, D]; with ``return_lse`` also the log-sum-exp of each query's scores
        [B, H, S] (natural log). A dense mask (KV-cache decoding, see kv_cache.py) goes through SDPA."""
        if not isinstance(mask, BlockMask) and not return_lse:
            return sdpa_attention(q, k, v, mask, scale)
        if q.device.type == "cpu" and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
            raise NotImplementedError(
                "FlexAttention has no backward on CPU (forward under torch.no_grad() works); "
                "train on CPU with attn_backend='sdpa'"
            )
        gqa = q.shape[1] != k.shape[1]
        fn = _flex_attention_fn(q.device)
        kwargs: dict[str, Any] = dict(block_mask=mask, enable_gqa=gqa, scale=scale)
        if return_lse:
            kwargs["return_aux"] = AuxRequest(lse=True)
        if fn is flex_attention:  # the unfused path is chosen on purpose here; silence torch's advice
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
                out = fn(q, k, v, **kwargs)
        else:
            out = fn(q, k, v, **kwargs)
        return (out[0], out[1].lse) if return_lse else out


AttentionBackend = SDPABackend | FlexBackend
ATTENTION_BACKENDS: dict[str, type] = {"sdpa": SDPABackend, "flex": FlexBackend}


def build_attention_backend(name: str, sdpa_kernel: str = "auto") -> AttentionBackend:
    """``sdpa_kernel`` applies to the sdpa backend (flex compiles its own kernel)."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {sorted(ATTENTION_BACKENDS)}")
    return SDPABackend(sdpa_kernel) if name == "sdpa" else ATTENTION_BACKENDS[name]()


# ---------------------------------------------------------------------------------------------- module


class Attention(nn.Module):
    """Multi-head attention with grouped KV heads; ``head_dim`` need not equal ``dim // n_heads``.

    Optional per-head RMSNorm on q and k before RoPE (Qwen3). Projections are ``wq, wk, wv, wo``; heads are
    inferred with ``view(..., -1, head_dim)`` so tensor-parallel (head-sharded) projections work unchanged.
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        *,
        backend: AttentionBackend,
        qk_norm: bool = False,
        norm_eps: float = 1e-6,
        qkv_bias: bool = False,
        out_bias: bool = False,
        softmax_scale: float | None = None,
        zero_centered_qk_norm: bool = False,
    ) -> None:
        super().__init__()
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.head_dim = head_dim
        self.backend = backend
        self.softmax_scale = softmax_scale  # None: 1 / sqrt(head_dim)
        self.wq = nn.Linear(dim, n_heads * head_dim, bias=qkv_bias)
        self.wk = nn.Linear(dim, n_kv_heads * head_dim, bias=qkv_bias)
        self.wv = nn.Linear(dim, n_kv_heads * head_dim, bias=qkv_bias)
        self.wo = nn.Linear(n_heads * head_dim, dim, bias=out_bias)
        norm_kw = dict(eps=norm_eps, zero_centered=zero_centered_qk_norm)
        self.q_norm = RMSNorm(head_dim, **norm_kw) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, **norm_kw) if qk_norm else None

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: AttentionMask, kv_cache: Any = None
    ) -> torch.Tensor:
        """``kv_cache``: a ``LayerKVCache`` (kv_cache.py) that stores this call's k/v and returns what the
        queries attend to; None (training) attends to this call's k/v only."""
        bsz, seq_len, _ = x.shape
        q = self.wq(x).view(bsz, seq_len, -1, self.head_dim)
        k = self.wk(x).view(bsz, seq_len, -1, self.head_dim)
        v = self.wv(x).view(bsz, seq_len, -1, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q)
            k = self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = apply_rotary_emb(q, k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)
        out = self.attend(q, k, v, mask)  # [B, H, S, D]
        out = out.transpose(1, 2).reshape(bsz, seq_len, -1)
        return self.wo(out)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
        """Hook: the attention of rotated q [B, Hq, S, D], k, v [B, Hkv, S, D] (GPT-OSS adds sinks here)."""
        return self.backend(q, k, v, mask, self.softmax_scale)

    def init_weights(self, init_std: float, out_std: float) -> None:
        for linear in (self.wq, self.wk, self.wv):
            nn.init.normal_(linear.weight, std=init_std)
        nn.init.normal_(self.wo.weight, std=out_std)
        for linear in (self.wq, self.wk, self.wv, self.wo):
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)
        for norm in (self.q_norm, self.k_norm):
            if norm is not None:
                norm.reset_parameters()
