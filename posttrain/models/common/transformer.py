"""The generic pre-norm decoder shared by the dense families (Llama 3, Qwen3, ...).

A family is mostly a configuration of this class: Qwen3 turns on the per-head q/k norm, Llama 3 uses the
"llama3" RoPE scaling. Module names are the ones every other component relies on (LoRA, TP plans,
activation checkpointing): tok_embeddings, layers["i"].{attention_norm, attention.{wq,wk,wv,wo,q_norm,k_norm},
ffn_norm, feed_forward.{w1,w2,w3}}, norm, output.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from posttrain.models.common.attention import (
    ATTENTION_BACKENDS,
    Attention,
    AttentionBackend,
    AttentionMask,
    MaskMod,
    build_attention_backend,
    sdpa_kernel_for,
)
from posttrain.models.common.embedding import Embedding
from posttrain.models.common.feed_forward import FeedForward
from posttrain.models.common.kv_cache import KVCache
from posttrain.models.common.lora import effective_weight
from posttrain.models.common.rms_norm import RMSNorm
from posttrain.models.common.rope import RotaryEmbedding

VOCAB_PAD_MULTIPLE = 64


@dataclass
class TransformerArgs:
    """Architecture of a dense decoder. ``vocab_size`` is the real (HF) vocabulary; embeddings and the output
    head are padded to ``padded_vocab_size`` and logits are sliced back."""

    dim: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: n_heads (no GQA)
    head_dim: int | None = None  # None: dim // n_heads
    vocab_size: int = 2048
    ffn_dim: int = 512
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # HF's dict: {"rope_type": "llama3", "factor": 8.0, ...}
    tie_embeddings: bool = False
    max_seq_len: int = 2048
    attn_backend: str = "sdpa"  # "sdpa" | "flex"
    sdpa_kernel: str = "auto"  # with attn_backend "sdpa": a key of attention.SDPA_KERNELS
    qk_norm: bool = False
    qkv_bias: bool = False
    attn_out_bias: bool = False
    init_std: float = 0.02
    # carried for HF export (config.json / generation_config.json); no effect on the model
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ValueError(f"dim ({self.dim}) is not a multiple of n_heads ({self.n_heads}); set head_dim")
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.attn_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attn_backend must be one of {sorted(ATTENTION_BACKENDS)}, got {self.attn_backend!r}"
            )
        sdpa_kernel_for(self.sdpa_kernel)

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: TransformerArgs, backend: AttentionBackend) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.attention = Attention(
            args.dim,
            args.n_heads,
            args.n_kv_heads,
            args.head_dim,
            backend=backend,
            qk_norm=args.qk_norm,
            norm_eps=args.norm_eps,
            qkv_bias=args.qkv_bias,
            out_bias=args.attn_out_bias,
        )
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.feed_forward = FeedForward(args.dim, args.ffn_dim)
        # depth-scaled init for the projections that write into the residual stream
        self._out_std = args.init_std / math.sqrt(2 * args.n_layers)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: AttentionMask, kv_cache: Any = None
    ) -> torch.Tensor:
        # kv_cache only when decoding: the tensor-parallel input plan counts the training call's four inputs
        extra = {} if kv_cache is None else {"kv_cache": kv_cache}
        normed, x = self.attention_norm.with_residual(x)  # x: the residual stream (see RMSNorm.with_residual)
        h = x + self.attention(normed, cos, sin, mask, **extra)
        normed, h = self.ffn_norm.with_residual(h)
        return h + self.feed_forward(normed)

    def init_weights(self, init_std: float) -> None:
        self.attention_norm.reset_parameters()
        self.ffn_norm.reset_parameters()
        self.attention.init_weights(init_std, self._out_std)
        self.feed_forward.init_weights(init_std, self._out_std)


class Transformer(nn.Module):
    """Decoder-only language model. Build on the meta device, ``to_empty(device=...)``, then ``init_weights()``
    (or load weights, see ``posttrain.models.load_hf``)."""

    def __init__(self, args: TransformerArgs) -> None:
        super().__init__()
        self.args = args
        self.attn_backend = build_attention_backend(args.attn_backend, args.sdpa_kernel)
        vocab = args.padded_vocab_size
        self.tok_embeddings = Embedding(vocab, args.dim)
        self.rope = RotaryEmbedding(args.head_dim, args.rope_theta, args.rope_scaling)
        self.layers = nn.ModuleDict(
            {str(i): TransformerBlock(i, args, self.attn_backend) for i in range(args.n_layers)}
        )
        self.norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.output = nn.Linear(args.dim, vocab, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the embedding with the output head when the args say so."""
        if self.args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def to_empty(self, *, device: torch.device | str | None, recurse: bool = True) -> Transformer:
        # moving off the meta device creates new Parameter objects per module, which unties shared weights
        super().to_empty(device=device, recurse=recurse)
        self.tie_weights()
        return self

    def attention_kind(self, layer_id: int) -> str:
        """Hook: which (cos, sin, mask) of ``attention_inputs`` layer ``layer_id`` uses. One kind here."""
        return "global"

    def attention_inputs(
        self, position_ids: torch.Tensor, document_ids: torch.Tensor | None, dtype: torch.dtype
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor, AttentionMask]]:
        """(cos, sin, mask) per attention kind, built once per forward and shared by the layers of that kind.
        Families with several kinds (Gemma 3: sliding-window and global layers with their own RoPE bases)
        override this and ``attention_kind``."""
        bsz, seq_len = position_ids.shape
        cos, sin = self.rope(position_ids, dtype=dtype)
        return {"global": (cos, sin, self.build_attention_mask(document_ids, bsz, seq_len, position_ids.device))}

    def extra_mask_mod(self) -> MaskMod | None:
        """Hook: a mask_mod ANDed with causal & same-document (e.g. a sliding window). None here."""
        return None

    def mask_mod_of_kind(self, kind: str) -> MaskMod | None:
        """Hook: the extra mask_mod that ``attention_inputs`` composes into attention kind ``kind``'s mask; the
        KV-cache decode path builds its masks from it. Families with a sliding kind override this."""
        return self.extra_mask_mod()

    def build_attention_mask(self, document_ids: torch.Tensor | None, batch: int, seq_len: int,
                             device: torch.device) -> AttentionMask:
        """The one mask of this forward, shared by every layer."""
        return self.attn_backend.build_mask(
            document_ids, batch=batch, seq_len=seq_len, device=device, extra_mask_mod=self.extra_mask_mod()
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        output_fn: Callable[[torch.Tensor, torch.Tensor], Any] | None = None,
        kv_cache: KVCache | None = None,
    ) -> Any:
        """input_ids [B, S]; position_ids [B, S] (default arange; restart them per packed document);
        document_ids [B, S] (default: one document per row). Returns logits [B, S, vocab_size], or
        ``output_fn(hidden [B, S, dim] after the final norm, output weight [padded_vocab, dim])``.
        ``kv_cache`` (inference): see ``posttrain.models.common.kv_cache`` for what position_ids mean then."""
        if kv_cache is not None:
            return self._forward_cached(input_ids, position_ids, document_ids, output_fn, kv_cache)
        bsz, seq_len = input_ids.shape
        device = input_ids.device
        if position_ids is None:
            position_ids = torch.arange(seq_len, device=device).unsqueeze(0).expand(bsz, seq_len)
        h = self.tok_embeddings(input_ids)
        inputs = self.attention_inputs(position_ids, document_ids, h.dtype)
        for name, layer in self.layers.items():
            h = layer(h, *inputs[self.attention_kind(int(name))])
        return self._output(h, output_fn)

    def _forward_cached(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None,
        document_ids: torch.Tensor | None,
        output_fn: Callable[[torch.Tensor, torch.Tensor], Any] | None,
        kv_cache: KVCache,
    ) -> Any:
        """The forward with a KV cache: a prefill from slot 0 (position_ids None; the training masks) or new
        tokens at per-row positions (dense masks over the cached slots, one per attention kind)."""
        if document_ids is not None:
            raise ValueError("document_ids (packed rows) are not supported with a KV cache")
        bsz, seq_len = input_ids.shape
        kv_cache.begin_forward(bsz, seq_len, position_ids)
        from_start = position_ids is None
        if from_start:
            position_ids = torch.arange(seq_len, device=input_ids.device).unsqueeze(0).expand(bsz, seq_len)
        h = self.tok_embeddings(input_ids)
        inputs = self.attention_inputs(position_ids, None, h.dtype)
        if not from_start:
            inputs = {
                kind: (cos, sin, kv_cache.attention_mask(position_ids, self.mask_mod_of_kind(kind)))
                for kind, (cos, sin, _) in inputs.items()
            }
        for name, layer in self.layers.items():
            h = layer(h, *inputs[self.attention_kind(int(name))], kv_cache=kv_cache.layer(name))
        return self._output(h, output_fn)

    def _output(self, h: torch.Tensor, output_fn: Callable[[torch.Tensor, torch.Tensor], Any] | None) -> Any:
        h = self.norm(h)
        if output_fn is not None:
            return output_fn(h, effective_weight(self.output))  # LoRA on the head: merged weight
        logits = self.output(h)
        if self.args.padded_vocab_size != self.args.vocab_size:
            logits = logits[..., : self.args.vocab_size]
        return logits

    def init_buffers(self, buffer_device: torch.device | str | None = None) -> None:
        """Recompute non-persistent buffers (RoPE inverse frequencies), e.g. after ``to_empty()``."""
        if buffer_device is None:
            buffer_device = self.tok_embeddings.weight.device
        self.rope.init_buffers(buffer_device)

    @torch.no_grad()
    def init_weights(self, buffer_device: torch.device | str | None = None) -> None:
        """(Re)initialise every parameter and buffer. Works on DTensor (sharded) parameters too."""
        self.init_buffers(buffer_device)
        self.tie_weights()
        std = self.args.init_std
        nn.init.normal_(self.tok_embeddings.weight, std=std)
        for layer in self.layers.values():
            layer.init_weights(std)
        self.norm.reset_parameters()
        if not self.args.tie_embeddings:
            nn.init.normal_(self.output.weight, std=std)
