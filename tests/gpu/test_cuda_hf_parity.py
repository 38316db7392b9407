"""Logit parity with transformers on the tier's device, every family, on random tiny configs with awkward shapes
(scripts/verify_hf_parity.py: GQA, head_dim != hidden / heads, vocab not a multiple of 64, Llama-3 rope scaling,
Gemma 3 sliding windows shorter than the documents with linear-scaled global RoPE, GPT-OSS attention sinks with
YaRN and a sliding window, Qwen3-MoE / GPT-OSS experts). Both attention backends, fp32 (tight) and bf16 (loose;
bf16 MoE layers run the ``torch._grouped_mm`` path on sm90+). Each check covers a plain batch and a packed row
of three documents against each document run alone, and records its relative error in the junit XML.

MoE families follow the reference's routing (verify_hf_parity.ReferenceRouting). In bf16 a router logit that
ties another to within a bf16 step can swap order after any rounding that differs (FlexAttention's fused kernel
against transformers' eager softmax, a grouped matmul against a loop); the token then runs other experts and
its logits differ by ~0.2 relative, which grows through later layers and says nothing about the port. That was
gpt_oss-bf16-flex's 0.15 on the H200 (2026-12-03): with the reference's routing it is ~1e-2, like every other
bf16 check, and the 3 of 675 decisions posttrain took otherwise were all ties or one-step near-ties (on CPU
too; FlexAttention's sink path is as close to an fp32 reference as the eager one). So the logits are compared
under the reference's routing, and the routing is checked on its own: the decisions posttrain would have
taken otherwise must be few (none in fp32), each a near-tie in the reference's router logits.

The MoE references run transformers' eager expert loop (``experts_implementation="eager"``), the plainest
statement of the math; the last tests check that its CUDA default (grouped-mm) agrees, and track a transformers
bug: 5.17 (the GPU image's) hard-codes GPT-OSS's SwiGLU clamp (limit 7.0) and ignores the config's
``swiglu_limit``, which the random config sets to 1.5 so that the clamps matter. That, not the device, was the
0.3 relative logit gap of the 2026-12-02 H200 runs (posttrain on CUDA = posttrain on CPU = transformers 5.19 on
CPU). The references are given the config's value (``honour_gpt_oss_swiglu_config``); posttrain follows the
config."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _gpu_tier import load_verifier

MODEL_TYPES = ("llama", "qwen3", "gemma3_text", "qwen3_moe", "gpt_oss")
MOE_TYPES = ("qwen3_moe", "gpt_oss")
# max |logit diff| / max |logit|: fp32 far under tf32's ~3e-4. bf16 bounds rounding noise: ~1e-2 measured
# in the MoE families (under the reference's routing), 0 in the dense ones.
MAX_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2}
MEAN_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 5e-3}
# Routing decisions (token, MoE layer) posttrain may take otherwise than the reference: a share of them, and
# the largest reference margin (k-th minus (k+1)-th router logit, per largest |router logit|) such a flip may
# have: the router logits carry the hidden states' bf16 rounding (~1e-2 relative per layer), so only a margin
# within that can flip. Measured on CPU: bf16 <= 1.1% of decisions, margins <= 1.1e-2; fp32 none. A wrong
# router flips a large share, with margins up to ~1.
MAX_FLIP_SHARE = {torch.float32: 0.0, torch.bfloat16: 0.03}
MAX_FLIP_MARGIN = 3e-2


def describe(report) -> str:
    layers = ", ".join(f"{d.name} {d.max_abs / max(d.ref_max_abs, 1e-12):.1e}" for d in report.layers)
    routing = ""
    if report.routing_decisions:
        margin = f", largest margin {max(report.flip_margins):.1e}" if report.flip_margins else ""
        layers = " ".join(str(n) for _, n in sorted(report.flips_per_layer.items()))
        routing = f"; routing flips {report.routing_flips}/{report.routing_decisions} (per MoE layer {layers}){margin}"
    return (f"max rel {report.rel:.2e}, mean abs {report.mean_abs:.2e} (packed {report.packed_mean_abs:.2e}), "
            f"max |logit| {report.ref_max_abs:.2f}; per layer (max rel): {layers}{routing}")


def reference_kwargs(model_type: str) -> dict:
    return {"experts_implementation": "eager"} if model_type in MOE_TYPES else {}


@pytest.mark.parametrize("attn_backend", ["sdpa", "flex"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_logits_match_transformers(
    model_type: str, dtype: torch.dtype, attn_backend: str, random_hf: dict[str, Path], device: torch.device,
    record_property,
) -> None:
    verify = load_verifier()
    report = verify.compare_logits(random_hf[model_type], dtype=dtype, device=str(device), seq_len=45, batch=2,
                                   attn_backend=attn_backend, reference_kwargs=reference_kwargs(model_type),
                                   follow_reference_routing=model_type in MOE_TYPES)
    record_property("rel_err", describe(report))
    mean_rel = max(report.mean_abs, report.packed_mean_abs) / report.ref_max_abs
    assert report.rel < MAX_TOLERANCE[dtype] and mean_rel < MEAN_TOLERANCE[dtype], describe(report)
    if model_type in MOE_TYPES:
        assert report.routing_decisions > 0, "no MoE routing was followed"
        assert report.routing_flips <= MAX_FLIP_SHARE[dtype] * report.routing_decisions, describe(report)
        assert max(report.flip_margins, default=0.0) < MAX_FLIP_MARGIN, describe(report)
    assert report.ref_max_abs > 1.0  # logits of a size where the relative error means something


def test_transformers_gpt_oss_default_experts_equal_its_eager_loop(
    random_hf: dict[str, Path], device: torch.device, record_property
) -> None:
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 1000, (2, 45), generator=torch.Generator().manual_seed(0)).to(device)
    logits, chosen = {}, {}
    for impl in (None, "eager"):
        kwargs = {} if impl is None else {"experts_implementation": impl}
        model = AutoModelForCausalLM.from_pretrained(str(random_hf["gpt_oss"]), dtype=torch.float32, **kwargs)
        load_verifier().honour_gpt_oss_swiglu_config(model)
        chosen[impl] = getattr(model.config, "_experts_implementation", "?")
        with torch.no_grad():
            logits[impl] = model.to(device).eval()(input_ids=ids, use_cache=False).logits
    rel = ((logits[None] - logits["eager"]).abs().max() / logits["eager"].abs().max()).item()
    record_property("rel_err", f"{rel:.2e} (default experts: {chosen[None]})")
    assert rel < 1e-4


@pytest.mark.xfail(reason="transformers 5.17 hard-codes GPT-OSS's swiglu limit (7.0) and alpha in GptOssExperts, "
                          "ignoring the config; 5.19 reads them", strict=False)
def test_transformers_gpt_oss_follows_the_configs_swiglu_limit(random_hf: dict[str, Path], record_property) -> None:
    import transformers
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(random_hf["gpt_oss"]), dtype=torch.float32)
    changed = load_verifier().honour_gpt_oss_swiglu_config(model)
    record_property("rel_err", f"transformers {transformers.__version__}: {'; '.join(changed[:2]) or 'follows it'}")
    assert not changed, changed
