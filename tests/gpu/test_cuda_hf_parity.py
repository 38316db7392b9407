"""Logit parity with transformers on the tier's device, every family, on random tiny configs with awkward shapes
(scripts/verify_hf_parity.py: GQA, head_dim != hidden / heads, vocab not a multiple of 64, Llama-3 rope scaling,
Gemma 3 sliding windows shorter than the documents with linear-scaled global RoPE, GPT-OSS attention sinks with
YaRN and a sliding window, Qwen3-MoE / GPT-OSS experts). Both attention backends, fp32 (tight) and bf16 (loose;
bf16 MoE layers run the ``torch._grouped_mm`` path on sm90+). Each check covers a plain batch and a packed row
of three documents against each document run alone, and records its relative error in the junit XML."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from _gpu_tier import load_verifier

MODEL_TYPES = ("llama", "qwen3", "gemma3_text", "qwen3_moe", "gpt_oss")
# max |logit diff| / max |logit|: fp32 far under tf32's ~3e-4; bf16 bounds rounding noise only
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2}


@pytest.mark.parametrize("attn_backend", ["sdpa", "flex"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_logits_match_transformers(
    model_type: str, dtype: torch.dtype, attn_backend: str, random_hf: dict[str, Path], device: torch.device,
    record_property,
) -> None:
    verify = load_verifier()
    report = verify.compare_logits(random_hf[model_type], dtype=dtype, device=str(device), seq_len=45, batch=2,
                                   attn_backend=attn_backend)
    record_property("rel_err", f"{report.rel:.3e}")
    assert report.rel < TOLERANCE[dtype], report
    assert report.ref_max_abs > 1.0  # logits of a size where the relative error means something
