"""LoRA on the tier's device, dense projections and MoE experts: training changes the adapters only (bf16 MoE
layers train through the ``torch._grouped_mm`` path), and the merged HF export and the PEFT adapter on its base
both give the adapted model's logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _gpu_tier import load_verifier
from _train_steps import packed_batch, train_steps

from posttrain.models import load_hf, save_hf
from posttrain.models.common.lora import apply_lora, expert_lora_modules, init_lora_adapters, lora_modules
from posttrain.models.peft_adapter import save_peft_adapter

TARGETS = {"qwen3": ("wq", "wk", "wv", "wo", "w1", "w2", "w3"), "qwen3_moe": ("wq", "wv", "experts"),
           "gpt_oss": ("wq", "wo", "experts")}
CASES = [("qwen3", torch.float32), ("qwen3_moe", torch.float32), ("qwen3_moe", torch.bfloat16),
         ("gpt_oss", torch.float32), ("gpt_oss", torch.bfloat16)]


def _adapted(folder: Path, model_type: str, device: torch.device, dtype: torch.dtype = torch.float32):
    model = load_hf(folder, dtype=dtype, device=device)
    apply_lora(model, rank=3, alpha=6, targets=TARGETS[model_type])
    init_lora_adapters(model, seed=0)
    return model


def _randomize_b(model: torch.nn.Module) -> None:
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for module in [*lora_modules(model).values(), *expert_lora_modules(model).values()]:
            b = module.lora_b.weight
            b.copy_((torch.randn(b.shape, generator=gen) * 0.05).to(b.dtype))


@pytest.mark.parametrize(("model_type", "dtype"), CASES, ids=[f"{t}-{str(d)[6:]}" for t, d in CASES])
def test_training_changes_only_the_adapters(
    model_type: str, dtype: torch.dtype, random_hf: dict[str, Path], device: torch.device
) -> None:
    model = _adapted(random_hf[model_type], model_type, device, dtype)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_a.weight", "lora_b.weight")) for n in trainable)
    assert ("experts" in TARGETS[model_type]) == any(".experts.lora." in n for n in trainable)
    losses, _ = train_steps(model, packed_batch(1000).to(device), lr=1e-2)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    for name, p in model.named_parameters():
        if name in trainable:
            assert not torch.equal(p, before[name]), f"{name} did not train"
        else:
            assert torch.equal(p, before[name]), f"frozen {name} changed"


@pytest.mark.parametrize("model_type", list(TARGETS))
def test_merged_export_equals_the_peft_adapter(
    model_type: str, random_hf: dict[str, Path], device: torch.device, tmp_path: Path, record_property
) -> None:
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    base_dir = random_hf[model_type]
    model = _adapted(base_dir, model_type, device).eval()
    _randomize_b(model)
    ids = torch.randint(0, 1000, (2, 23), generator=torch.Generator().manual_seed(5)).to(device)
    with torch.no_grad():
        ours = model(ids).float()
        assert (ours - load_hf(base_dir, device=device)(ids)).abs().max() > 1e-2  # the adapters matter

    # transformers' eager expert loop: see test_cuda_hf_parity.py for its CUDA default
    reference = {"experts_implementation": "eager"} if "experts" in TARGETS[model_type] else {}
    merged = AutoModelForCausalLM.from_pretrained(save_hf(model, tmp_path / "merged"), dtype=torch.float32, **reference)
    adapter_dir = save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(base_dir))
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, **reference).to(device)
    for reference_model in (merged, base):  # transformers 5.17 ignores GPT-OSS's swiglu_limit (see the helper)
        load_verifier().honour_gpt_oss_swiglu_config(reference_model)
    with torch.no_grad():
        via_merged = merged.to(device).eval()(input_ids=ids, use_cache=False).logits.float()
        via_adapter = peft.PeftModel.from_pretrained(base, adapter_dir).eval()(input_ids=ids, use_cache=False)
    via_adapter = via_adapter.logits.float()
    scale = ours.abs().max()
    errors = {"merged": ((via_merged - ours).abs().max() / scale).item(),
              "adapter": ((via_adapter - ours).abs().max() / scale).item(),
              "merged_vs_adapter": ((via_merged - via_adapter).abs().max() / scale).item()}
    record_property("rel_err", ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
    assert all(v < 1e-4 for v in errors.values()), errors
