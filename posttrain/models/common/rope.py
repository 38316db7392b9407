"""Rotary position embeddings in Hugging Face's cos/sin ("rotate_half") convention.

cos/sin are computed from ``position_ids`` on every forward, so packed rows whose positions restart at each
document need no special handling, and HF checkpoints load without permuting wq/wk.

Scaling variants are table entries: a function ``(head_dim, rope_theta, rope_scaling) -> (inv_freq,
attention_scaling)`` in ``INV_FREQ_FUNCTIONS``, keyed by HF's ``rope_type``. Adding "linear" or "yarn" means
adding one function; yarn's attention factor goes through ``attention_scaling``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

InvFreqFn = Callable[[int, float, dict[str, Any]], tuple[torch.Tensor, float]]


def default_inv_freq(head_dim: int, rope_theta: float, rope_scaling: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """Original RoPE: ``1 / theta^(2i/d)``, computed in fp32 on the CPU like HF."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    return 1.0 / (rope_theta**exponents), 1.0


def llama3_inv_freq(head_dim: int, rope_theta: float, rope_scaling: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """Llama 3.1 scaling: low frequencies divided by ``factor``, high ones kept, a smooth ramp in between."""
    inv_freq, _ = default_inv_freq(head_dim, rope_theta, rope_scaling)
    try:
        factor = rope_scaling["factor"]
        low_freq_factor = rope_scaling["low_freq_factor"]
        high_freq_factor = rope_scaling["high_freq_factor"]
        old_context_len = rope_scaling["original_max_position_embeddings"]
    except KeyError as err:
        raise ValueError(
            f"rope_scaling of type 'llama3' needs factor, low_freq_factor, high_freq_factor and "
            f"original_max_position_embeddings; {err.args[0]!r} is missing from {rope_scaling}"
        ) from None

    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled), 1.0


def linear_inv_freq(head_dim: int, rope_theta: float, rope_scaling: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """Position interpolation: every frequency divided by ``factor`` (Gemma 3's global layers)."""
    inv_freq, _ = default_inv_freq(head_dim, rope_theta, rope_scaling)
    return inv_freq / float(rope_scaling["factor"]), 1.0


def yarn_inv_freq(head_dim: int, rope_theta: float, rope_scaling: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """YaRN (GPT-OSS): high frequencies kept, low ones interpolated by ``factor``, a linear ramp between the
    ``beta_fast`` / ``beta_slow`` correction dimensions; cos/sin scaled by the attention factor
    (``0.1 ln(factor) + 1`` unless given). Mirrors transformers' ``_compute_yarn_parameters``."""
    try:
        factor = float(rope_scaling["factor"])
        original = rope_scaling["original_max_position_embeddings"]
    except KeyError as err:
        raise ValueError(f"rope_scaling of type 'yarn' needs {err.args[0]!r}: {rope_scaling}") from None

    def get_mscale(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = rope_scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = rope_scaling.get("mscale"), rope_scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)
    beta_fast = rope_scaling.get("beta_fast") or 32
    beta_slow = rope_scaling.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        return (head_dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(rope_theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope_scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # avoid a division by zero
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = rope_theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    extrapolation_factor = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation_factor) + (1.0 / pos_freqs) * extrapolation_factor
    return inv_freq, float(attention_factor)


INV_FREQ_FUNCTIONS: dict[str, InvFreqFn] = {
    "default": default_inv_freq,
    "llama3": llama3_inv_freq,
    "linear": linear_inv_freq,
    "yarn": yarn_inv_freq,
}


def rope_type_of(rope_scaling: dict[str, Any] | None) -> str:
    """HF's ``rope_type`` (older configs say ``type``); ``default`` when there is no scaling."""
    if not rope_scaling:
        return "default"
    return rope_scaling.get("rope_type", rope_scaling.get("type", "default"))


def compute_inv_freq(
    head_dim: int, rope_theta: float, rope_scaling: dict[str, Any] | None = None
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim // 2] (fp32, CPU) and the cos/sin scaling factor."""
    rope_type = rope_type_of(rope_scaling)
    fn = INV_FREQ_FUNCTIONS.get(rope_type)
    if fn is None:
        raise NotImplementedError(
            f"rope_type {rope_type!r} is not supported; supported: {sorted(INV_FREQ_FUNCTIONS)}"
        )
    if rope_scaling and rope_scaling.get("partial_rotary_factor", 1.0) != 1.0:
        raise NotImplementedError("partial_rotary_factor != 1 is not supported")
    return fn(head_dim, rope_theta, dict(rope_scaling or {}))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_emb(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [B, Hq, S, D] and k [B, Hkv, S, D] with cos/sin [B, S, D]."""
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class RotaryEmbedding(nn.Module):
    """Holds ``inv_freq`` (a non-persistent fp32 buffer) and turns position ids into cos/sin.

    The buffer is recomputed by ``init_buffers`` after ``to_empty()``; it must stay fp32 (``model.to(bf16)``
    would round it, as it would in HF).
    """

    def __init__(self, head_dim: int, rope_theta: float, rope_scaling: dict[str, Any] | None = None) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
        self.head_dim = head_dim
        self.rope_theta = rope_theta
        self.rope_scaling = dict(rope_scaling) if rope_scaling else None
        inv_freq, self.attention_scaling = compute_inv_freq(head_dim, rope_theta, self.rope_scaling)
        # computed on the CPU, then placed where the module is being built (e.g. inside `with torch.device("meta")`)
        self.register_buffer("inv_freq", inv_freq.to(torch.get_default_device()), persistent=False)

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        inv_freq, self.attention_scaling = compute_inv_freq(self.head_dim, self.rope_theta, self.rope_scaling)
        self.inv_freq = inv_freq.to(device if device is not None else self.inv_freq.device)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [B, S] -> (cos, sin), each [B, S, head_dim] in ``dtype`` (computed in fp32)."""
        freqs = position_ids[..., None].float() * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, theta={self.rope_theta}, scaling={self.rope_scaling}"
