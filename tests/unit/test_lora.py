"""LoRA: only adapters train, a zero B changes nothing, merged export equals the adapted model, PEFT loads it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from posttrain.models import build_model, load_hf, save_hf
from posttrain.models.common.lora import LoRALinear, apply_lora, init_lora_adapters, lora_modules
from posttrain.models.peft_adapter import save_peft_adapter
from posttrain.models.sharded_load import load_hf_weights_sharded

ALL = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


def _model(tie: bool = True) -> nn.Module:
    torch.manual_seed(0)
    return build_model("qwen3", "debug", device="cpu", vocab_size=300, tie_embeddings=tie)


def _ids(vocab: int = 300) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 17), generator=torch.Generator().manual_seed(1))


def _randomize_b(model: nn.Module) -> None:
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for module in lora_modules(model).values():
            module.lora_b.weight.copy_(torch.randn(module.lora_b.weight.shape, generator=gen) * 0.05)


def test_lora_linear_zero_b_equals_base_and_merge_matches() -> None:
    base = nn.Linear(8, 6, bias=True)
    lora = LoRALinear(base, rank=4, alpha=8, dropout=0.0)
    x = torch.randn(3, 8)
    torch.testing.assert_close(lora(x), base(x), rtol=0, atol=0)
    with torch.no_grad():
        lora.lora_b.weight.normal_()
    merged = nn.functional.linear(x, lora.merged_weight(), base.bias)
    torch.testing.assert_close(lora(x), merged, rtol=1e-5, atol=1e-5)
    assert lora.scaling == 2.0 and not base.weight.requires_grad


def test_zero_initialized_adapters_give_the_base_model_outputs() -> None:
    model, ids = _model(), _ids()
    before = model(ids)
    adapted = apply_lora(model, rank=4, alpha=8, targets=ALL)
    assert len(adapted) == 2 * 7 and "layers.0.attention.wq" in adapted
    torch.testing.assert_close(model(ids), before, rtol=0, atol=0)


def test_only_adapters_receive_gradients() -> None:
    model = _model()
    apply_lora(model, rank=4, alpha=8, targets=("wq", "wv", "w2"))
    model(_ids()).logsumexp(-1).mean().backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_a." in n or ".lora_b." in n for n in trainable)
    assert len(trainable) == 2 * 2 * 3
    for name, p in model.named_parameters():
        if name in trainable:
            assert p.grad is not None, name
        else:
            assert p.grad is None, name
    assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in trainable if ".lora_b." in n)


def test_lora_on_untied_output_head_is_used_by_output_fn() -> None:
    model, ids = _model(tie=False), _ids()
    apply_lora(model, rank=2, alpha=2, targets=("output",))
    init_lora_adapters(model, seed=0)
    _randomize_b(model)
    logits = model(ids)
    via_fn = model(ids, output_fn=lambda h, w: (h @ w.T)[..., :300])
    torch.testing.assert_close(via_fn, logits, rtol=1e-5, atol=1e-5)


def test_bad_targets_are_refused() -> None:
    with pytest.raises(ValueError, match="ties its output head"):
        apply_lora(_model(tie=True), rank=2, alpha=2, targets=("output",))
    with pytest.raises(ValueError, match="unknown module name"):
        apply_lora(_model(), rank=2, alpha=2, targets=("q_proj",))


def test_init_is_deterministic_and_b_starts_at_zero() -> None:
    a, b = _model(), _model()
    for m in (a, b):
        apply_lora(m, rank=4, alpha=8, targets=ALL)
        init_lora_adapters(m, seed=3)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)
        if ".lora_b." in name:
            assert pa.abs().sum() == 0


def test_base_weights_load_under_their_linear_names(tmp_path: Path) -> None:
    """A LoRA model built on meta, materialized, filled from an HF folder: base weights match, adapters are
    left for init_lora_adapters."""
    reference = _model()
    save_hf(reference, tmp_path)
    model = build_model("qwen3", reference.args)  # meta
    apply_lora(model, rank=4, alpha=8, targets=ALL)
    model.to_empty(device="cpu")
    load_hf_weights_sharded(model, tmp_path)
    init_lora_adapters(model, seed=0)
    torch.testing.assert_close(model.layers["1"].attention.wq.base.weight, reference.layers["1"].attention.wq.weight)
    torch.testing.assert_close(model(_ids()), reference(_ids()), rtol=0, atol=0)


def test_merged_export_and_peft_adapter_match_the_adapted_model(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    model = _model()
    save_hf(model, tmp_path / "base")
    apply_lora(model, rank=4, alpha=8, targets=ALL)
    _randomize_b(model)
    ids = _ids()
    with torch.no_grad():
        ours = model(ids)
    save_hf(model, tmp_path / "merged")
    save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8
    assert config["target_modules"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])

    merged_ours = load_hf(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(merged_ours(ids), ours, rtol=1e-4, atol=1e-4)
        base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
        with_adapter = peft.PeftModel.from_pretrained(base, tmp_path / "adapter")
        torch.testing.assert_close(with_adapter(ids).logits, ours, rtol=1e-4, atol=1e-4)


def test_load_hf_weights_fills_the_base_of_an_adapted_model(tmp_path: Path) -> None:
    from posttrain.models.hf import load_hf_weights
    from posttrain.models.registry import get_model_spec

    reference = _model()
    save_hf(reference, tmp_path)
    model = _model()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()  # nothing left of the reference's values
    apply_lora(model, rank=2, alpha=2, targets=("wq", "w2"))
    load_hf_weights(model, tmp_path, get_model_spec("qwen3"))
    torch.testing.assert_close(model(_ids()), reference(_ids()), rtol=0, atol=0)
