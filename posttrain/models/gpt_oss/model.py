"""GPT-OSS: attention with sinks, alternating sliding-window / full layers, and a biased top-k MoE with the
clamped SwiGLU. Module names follow the shared decoder; the MoE's parameters keep HF's stacked layout
(``feed_forward.experts.gate_up_proj`` [E, dim, 2 * ffn] with gate / up interleaved, ``down_proj``
[E, ffn, dim], their biases) so a checkpoint converts by renaming only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask

from posttrain.models.common.attention import (
    Attention,
    AttentionBackend,
    AttentionMask,
    FlexBackend,
    MaskMod,
    sliding_window_mask_mod,
)
from posttrain.models.common.moe import ExpertGroups, MoEModelHooks, load_balancing_loss, sort_by_expert
from posttrain.models.common.rms_norm import RMSNorm
from posttrain.models.common.transformer import Transformer, TransformerBlock
from .args import SLIDING, GptOssArgs


class GptOssRMSNorm(RMSNorm):
    """GPT-OSS multiplies the weight in fp32 and casts after (Llama casts first). Its backward stays autograd's (the
    own kernel's math is the base class's)."""

    def _runs_own_backward(self, x: torch.Tensor) -> bool:
        return False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * h).to(x.dtype)


def attention_with_sinks(
    backend: AttentionBackend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask,
    sinks: torch.Tensor, scale: float,
) -> torch.Tensor:
    """Softmax over each query's allowed keys plus one extra logit per head (``sinks``) that has no value: the
    output is plain attention scaled by ``sigmoid(lse - sink)``, lse the log-sum-exp of the allowed scores.

    Flex: one fused call that also returns lse. SDPA backend: the scores are formed explicitly (the reference
    path; memory O(S^2) per head, like HF's eager implementation).
    """
    if isinstance(backend, FlexBackend) and isinstance(mask, BlockMask):  # (KV-cache decoding: a dense mask)
        out, lse = backend(q, k, v, mask, scale, return_lse=True)
        return out * torch.sigmoid(lse - sinks.float().view(1, -1, 1)).unsqueeze(-1).to(out.dtype)
    bsz, n_heads, seq_len, _ = q.shape
    if k.shape[1] != n_heads:
        k = k.repeat_interleave(n_heads // k.shape[1], dim=1)
        v = v.repeat_interleave(n_heads // v.shape[1], dim=1)
    scores = (q @ k.transpose(-2, -1)) * scale
    if mask is None:
        mask = torch.ones(seq_len, seq_len, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    sink_logits = sinks.to(scores.dtype).view(1, -1, 1, 1).expand(bsz, n_heads, seq_len, 1)
    combined = torch.cat([scores, sink_logits], dim=-1)
    probs = torch.softmax(combined - combined.amax(dim=-1, keepdim=True), dim=-1)[..., :-1]
    return probs.to(v.dtype) @ v


class GptOssAttention(Attention):
    """Grouped-query attention with q/k/v/o biases and a learned sink logit per head (``sinks`` [n_heads])."""

    def __init__(self, args: GptOssArgs, backend: AttentionBackend) -> None:
        super().__init__(
            args.dim, args.n_heads, args.n_kv_heads, args.head_dim, backend=backend,
            qkv_bias=args.qkv_bias, out_bias=args.attn_out_bias,
        )
        self.sinks = nn.Parameter(torch.empty(args.n_heads))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
        return attention_with_sinks(self.backend, q, k, v, mask, self.sinks, self.head_dim**-0.5)

    def init_weights(self, init_std: float, out_std: float) -> None:
        super().init_weights(init_std, out_std)
        nn.init.normal_(self.sinks, std=init_std)


class GptOssExperts(nn.Module):
    """Stacked experts in HF's layout ([E, in, out]: ``x @ W[e]``); ``forward(x sorted by expert, counts)``.
    With LoRA (target ``experts``), ``lora`` holds ``ExpertLoRA`` slots ``gate_up`` and ``down``; an adapter's
    update [E, out, in] merges into these weights transposed."""

    def __init__(self, args: GptOssArgs) -> None:
        super().__init__()
        e, d, f = args.n_experts, args.dim, args.ffn_dim
        self.n_experts = e
        self.alpha = args.swiglu_alpha
        self.limit = args.swiglu_limit
        self.gate_up_proj = nn.Parameter(torch.empty(e, d, 2 * f))
        self.gate_up_proj_bias = nn.Parameter(torch.empty(e, 2 * f))
        self.down_proj = nn.Parameter(torch.empty(e, f, d))
        self.down_proj_bias = nn.Parameter(torch.empty(e, d))
        self.lora: nn.ModuleDict | None = None  # ExpertLoRA slots, set by posttrain.models.common.lora.apply_lora

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        groups = ExpertGroups(x, counts)
        h = groups.pad(x)
        gate_up = groups.mm(h, self.gate_up_proj) + groups.bias(self.gate_up_proj_bias)
        if self.lora is not None:
            gate_up = gate_up + groups.lora(h, self.lora["gate_up"])
        gate = gate_up[..., ::2].clamp(max=self.limit)
        up = gate_up[..., 1::2].clamp(min=-self.limit, max=self.limit)
        h = (up + 1) * (gate * torch.sigmoid(gate * self.alpha))
        out = groups.mm(h, self.down_proj) + groups.bias(self.down_proj_bias)
        if self.lora is not None:
            out = out + groups.lora(h, self.lora["down"])
        return groups.unpad(out)

    def lora_shapes(self) -> dict[str, tuple[int, int]]:
        """Adapter slots for LoRA on the experts: name -> (in, out)."""
        d, f2 = self.gate_up_proj.shape[1:]
        return {"gate_up": (d, f2), "down": (f2 // 2, d)}

    def lora_update(self, param_name: str, deltas: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """``deltas[slot]`` [E, out, in] in the layout of ``param_name`` ([E, in, out]); biases get none."""
        slot = {"gate_up_proj": "gate_up", "down_proj": "down"}.get(param_name)
        return None if slot is None else deltas[slot].transpose(-2, -1)

    def init_weights(self, init_std: float, out_std: float) -> None:
        nn.init.normal_(self.gate_up_proj, std=init_std)
        nn.init.normal_(self.down_proj, std=out_std)
        nn.init.zeros_(self.gate_up_proj_bias)
        nn.init.zeros_(self.down_proj_bias)


class GptOssMoE(nn.Module):
    """Router (Linear with bias) -> top-k logits -> softmax over the k -> weighted sum of the experts' outputs.

    Keeps ``aux_loss`` (load balancing over the full softmax, as HF's ``load_balancing_loss_func``) and
    ``tokens_per_expert`` of the last forward, like ``posttrain.models.common.moe.MoE``.
    """

    def __init__(self, args: GptOssArgs) -> None:
        super().__init__()
        self.n_experts = args.n_experts
        self.top_k = args.n_experts_per_tok
        self.router = nn.Linear(args.dim, args.n_experts, bias=True)
        self.experts = GptOssExperts(args)
        self.aux_loss: torch.Tensor | None = None
        self.tokens_per_expert: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = self.router(x)
        top_logits, top_i = torch.topk(logits, self.top_k, dim=-1)
        top_p = F.softmax(top_logits, dim=-1, dtype=top_logits.dtype)
        order, token_idx, counts = sort_by_expert(top_i, self.n_experts)
        out = self.experts(x[token_idx], counts) * top_p.reshape(-1)[order, None]
        y = torch.zeros_like(x).index_add_(0, token_idx, out.to(x.dtype))
        self.tokens_per_expert = counts.detach()
        self.aux_loss = load_balancing_loss(F.softmax(logits, dim=-1, dtype=torch.float32), counts)
        return y.reshape(shape)

    def init_weights(self, init_std: float, out_std: float) -> None:
        nn.init.normal_(self.router.weight, std=init_std)
        nn.init.zeros_(self.router.bias)
        self.experts.init_weights(init_std, out_std)


class GptOssModel(MoEModelHooks, Transformer):
    moe_layer_type = GptOssMoE

    def __init__(self, args: GptOssArgs) -> None:
        super().__init__(args)
        for block in self.layers.values():
            block: TransformerBlock
            block.attention = GptOssAttention(args, self.attn_backend)
            block.feed_forward = GptOssMoE(args)
            block.attention_norm = GptOssRMSNorm(args.dim, eps=args.norm_eps)
            block.ffn_norm = GptOssRMSNorm(args.dim, eps=args.norm_eps)
        self.norm = GptOssRMSNorm(args.dim, eps=args.norm_eps)
        # one mask_mod object for the life of the model: the flex backend caches shape-only masks by it
        self._sliding_mask_mod = sliding_window_mask_mod(args.sliding_window)

    def attention_kind(self, layer_id: int) -> str:
        return "sliding" if self.args.layer_types[layer_id] == SLIDING else "global"

    def mask_mod_of_kind(self, kind: str) -> MaskMod | None:
        return self._sliding_mask_mod if kind == "sliding" else None

    def attention_inputs(
        self, position_ids: torch.Tensor, document_ids: torch.Tensor | None, dtype: torch.dtype
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor, AttentionMask]]:
        bsz, seq_len = position_ids.shape
        device = position_ids.device
        cos, sin = self.rope(position_ids, dtype=dtype)  # one RoPE for both kinds
        kinds = {self.attention_kind(int(name)) for name in self.layers}
        inputs = {}
        if "global" in kinds:
            inputs["global"] = (cos, sin, self.build_attention_mask(document_ids, bsz, seq_len, device))
        if "sliding" in kinds:
            mask = self.attn_backend.build_mask(
                document_ids, batch=bsz, seq_len=seq_len, device=device, extra_mask_mod=self._sliding_mask_mod
            )
            inputs["sliding"] = (cos, sin, mask)
        return inputs
