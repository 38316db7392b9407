"""The MoE ``torch._grouped_mm`` path (CUDA sm90+, bf16) against the loop over expert groups, on the same bf16
weights and routing: outputs and gradients, Qwen3-MoE and GPT-OSS experts (biases, clamped SwiGLU), without
and with expert LoRA (an odd rank, padded for the kernel's 16-byte strides; the adapters' gradients too). The
layers come from the random tiny HF checkpoints (6 experts, top-3, group sizes off the alignment)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from posttrain.models import load_hf
from posttrain.models.common import moe
from posttrain.models.common.lora import apply_lora, expert_lora_modules, init_lora_adapters

# bf16 both ways; the two paths round differently only inside the expert matmuls
REL_TOL = 2e-2


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def _moe_layer(folder: Path, device: torch.device, lora: bool) -> nn.Module:
    model = load_hf(folder, dtype=torch.bfloat16, device=device)
    if lora:
        apply_lora(model, rank=3, alpha=6, targets=("experts",))
        init_lora_adapters(model, seed=0)
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for adapter in expert_lora_modules(model).values():
                b = adapter.lora_b.weight
                b.copy_(torch.randn(b.shape, generator=gen) * 0.1)
    layer = model.layers["0"].feed_forward
    assert isinstance(layer.experts, nn.Module) and layer.n_experts == 6
    return layer


def _forward_backward(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    x = x.detach().requires_grad_(True)
    y = layer(x)
    trainable = {n: p for n, p in layer.named_parameters() if p.requires_grad}
    grads = torch.autograd.grad(y.float().square().sum(), [x, *trainable.values()])
    return y.detach(), dict(zip(["input", *trainable], grads))


@pytest.mark.parametrize("lora", [False, True], ids=["base", "expert_lora"])
@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss"])
def test_grouped_mm_matches_the_loop(
    model_type: str, lora: bool, random_hf: dict[str, Path], device: torch.device, monkeypatch: pytest.MonkeyPatch,
    record_property,
) -> None:
    layer = _moe_layer(random_hf[model_type], device, lora)
    x = torch.randn(3, 29, layer.router.in_features, generator=torch.Generator().manual_seed(2))
    x = x.to(device=device, dtype=torch.bfloat16)
    if device.type == "cpu":
        monkeypatch.setattr(moe, "GROUPED_MM_ON_CPU", True)
    elif torch.cuda.get_device_capability(device) < (9, 0):
        pytest.skip("torch._grouped_mm needs sm90+")
    probe = moe.ExpertGroups(x.reshape(-1, x.shape[-1]), torch.tensor([40, 0, 21, 7, 9, 10], device=device))
    assert probe.grouped, "bf16 on this device should take the torch._grouped_mm path"
    try:
        grouped, g_grouped = _forward_backward(layer, x)
    except (RuntimeError, NotImplementedError) as err:
        if device.type == "cpu":
            pytest.skip(f"torch._grouped_mm in bf16 does not run on this CPU build: {err}")
        raise
    monkeypatch.setattr(moe, "grouped_mm_supported", lambda t: False)
    looped, g_looped = _forward_backward(layer, x)
    assert len(g_grouped) == len(g_looped) == (5 if lora else 1 + len(list(layer.parameters())))
    errors = {"output": _rel(grouped, looped), **{n: _rel(g_grouped[n], g) for n, g in g_looped.items()}}
    record_property("rel_err", ", ".join(f"{n} {e:.2e}" for n, e in errors.items()))
    assert all(e < REL_TOL for e in errors.values()), str(errors)
    if lora:
        assert all(g.abs().max() > 0 for n, g in g_grouped.items() if "lora_b" in n)
