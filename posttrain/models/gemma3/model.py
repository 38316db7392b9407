"""Gemma 3 (text): the shared decoder with Gemma's embedding scale, (1 + w) norms, sandwich norms, GELU MLP and
interleaved sliding-window / global attention.

Two attention kinds, each with its own RoPE and mask, built once per forward (``attention_inputs``):
"sliding" (causal AND same document AND ``q - kv < sliding_window``, RoPE base ``local_rope_theta``) and
"global" (causal AND same document, RoPE ``rope_theta`` + ``rope_scaling``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from posttrain.models.common.attention import (
    Attention,
    AttentionBackend,
    AttentionMask,
    MaskMod,
    sliding_window_mask_mod,
)
from posttrain.models.common.embedding import Embedding
from posttrain.models.common.rms_norm import RMSNorm
from posttrain.models.common.rope import RotaryEmbedding
from posttrain.models.common.transformer import Transformer
from .args import SLIDING, Gemma3Args


class ScaledEmbedding(Embedding):
    """``embedding(ids) * sqrt(dim)``, the scale rounded to the weight dtype first (as in HF: 55.4256 -> 55.5 in
    bf16 for dim 3072)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, scale: float) -> None:
        super().__init__(num_embeddings, embedding_dim)
        self.scale = scale

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = super().forward(input_ids)
        # the rounded scale as a Python number: a device tensor made here would be a host-to-device copy, which a
        # CUDA graph capture (the rollout engine's decode step) refuses
        return out * torch.tensor(self.scale, dtype=out.dtype).item()


class GeluFeedForward(nn.Module):
    """``w2(gelu_tanh(w1 x) * w3 x)``; names as in the shared SwiGLU block (w1 gate, w3 up, w2 down)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w1(x), approximate="tanh") * self.w3(x))

    def init_weights(self, init_std: float, out_std: float) -> None:
        nn.init.normal_(self.w1.weight, std=init_std)
        nn.init.normal_(self.w3.weight, std=init_std)
        nn.init.normal_(self.w2.weight, std=out_std)


class Gemma3Block(nn.Module):
    """Sandwich norms: ``h = x + post_attention_norm(attn(attention_norm(x)))``,
    ``out = h + post_ffn_norm(ffn(ffn_norm(h)))``."""

    def __init__(self, layer_id: int, args: Gemma3Args, backend: AttentionBackend) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.attention_kind = "sliding" if args.layer_types[layer_id] == SLIDING else "global"

        def norm() -> RMSNorm:
            return RMSNorm(args.dim, eps=args.norm_eps, zero_centered=True)

        self.attention_norm = norm()
        self.attention = Attention(
            args.dim, args.n_heads, args.n_kv_heads, args.head_dim, backend=backend, qk_norm=True,
            norm_eps=args.norm_eps, qkv_bias=args.qkv_bias, out_bias=args.attn_out_bias,
            softmax_scale=args.query_pre_attn_scalar**-0.5, zero_centered_qk_norm=True,
        )
        self.post_attention_norm = norm()
        self.ffn_norm = norm()
        self.feed_forward = GeluFeedForward(args.dim, args.ffn_dim)
        self.post_ffn_norm = norm()
        self._out_std = args.init_std / math.sqrt(2 * args.n_layers)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: AttentionMask, kv_cache: Any = None
    ) -> torch.Tensor:
        extra = {} if kv_cache is None else {"kv_cache": kv_cache}  # (see TransformerBlock.forward)
        normed, x = self.attention_norm.with_residual(x)  # x: the residual stream (see RMSNorm.with_residual)
        h = x + self.post_attention_norm(self.attention(normed, cos, sin, mask, **extra))
        normed, h = self.ffn_norm.with_residual(h)
        return h + self.post_ffn_norm(self.feed_forward(normed))

    def init_weights(self, init_std: float) -> None:
        for norm in (self.attention_norm, self.post_attention_norm, self.ffn_norm, self.post_ffn_norm):
            norm.reset_parameters()
        self.attention.init_weights(init_std, self._out_std)
        self.feed_forward.init_weights(init_std, self._out_std)


class Gemma3Model(Transformer):
    def __init__(self, args: Gemma3Args) -> None:
        super().__init__(args)
        # replace the generic parts (cheap: models are built on the meta device)
        self.tok_embeddings = ScaledEmbedding(args.padded_vocab_size, args.dim, scale=args.dim**0.5)
        self.layers = nn.ModuleDict({str(i): Gemma3Block(i, args, self.attn_backend) for i in range(args.n_layers)})
        self.norm = RMSNorm(args.dim, eps=args.norm_eps, zero_centered=True)
        self.local_rope = RotaryEmbedding(args.head_dim, args.local_rope_theta, None)
        # one mask_mod object for the life of the model: the flex backend caches shape-only masks by it
        self._sliding_mask_mod = sliding_window_mask_mod(args.sliding_window)
        self.tie_weights()

    def attention_kind(self, layer_id: int) -> str:
        return "sliding" if self.args.layer_types[layer_id] == SLIDING else "global"

    def mask_mod_of_kind(self, kind: str) -> MaskMod | None:
        return self._sliding_mask_mod if kind == "sliding" else None

    def attention_inputs(
        self, position_ids: torch.Tensor, document_ids: torch.Tensor | None, dtype: torch.dtype
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor, AttentionMask]]:
        bsz, seq_len = position_ids.shape
        device = position_ids.device
        kinds = {self.attention_kind(int(name)) for name in self.layers}
        inputs = {}
        if "global" in kinds:
            cos, sin = self.rope(position_ids, dtype=dtype)
            inputs["global"] = (cos, sin, self.build_attention_mask(document_ids, bsz, seq_len, device))
        if "sliding" in kinds:
            cos, sin = self.local_rope(position_ids, dtype=dtype)
            mask = self.attn_backend.build_mask(
                document_ids, batch=bsz, seq_len=seq_len, device=device, extra_mask_mod=self._sliding_mask_mod
            )
            inputs["sliding"] = (cos, sin, mask)
        return inputs

    def init_buffers(self, buffer_device: torch.device | str | None = None) -> None:
        if buffer_device is None:
            buffer_device = self.tok_embeddings.weight.device
        super().init_buffers(buffer_device)
        self.local_rope.init_buffers(buffer_device)
