"""LoRA on stacked MoE experts (lora.targets 'experts'; Qwen3-MoE and GPT-OSS): each expert's output gains
scaling * B_e A_e x (grouped and looped paths), a zero B changes nothing, only adapters train, and the merged
export and the PEFT adapter (target_parameters on the fused HF experts) give the adapted model's logits."""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from posttrain.models import build_model, get_model_spec, load_hf, save_hf
from posttrain.models.common import moe
from posttrain.models.common.lora import ExpertLoRA, apply_lora, expert_lora_modules, init_lora_adapters
from posttrain.models.gpt_oss.model import GptOssExperts
from posttrain.models.peft_adapter import save_peft_adapter

REPO = Path(__file__).resolve().parents[2]
FAMILIES = ("qwen3_moe", "gpt_oss")


def _load_verifier():
    spec = importlib.util.spec_from_file_location("verify_hf_parity", REPO / "scripts" / "verify_hf_parity.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def random_hf(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Random tiny HF checkpoints with awkward shapes (verify_hf_parity's configs), one per family."""
    verify = _load_verifier()
    return {f: verify.make_random_hf_model(f, tmp_path_factory.mktemp(f)) for f in FAMILIES}


def _randomize_b(model: nn.Module, seed: int = 3, std: float = 0.1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_b.weight"):
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def _ids(vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 19), generator=torch.Generator().manual_seed(seed))


class _Holder(nn.Module):
    def __init__(self, experts: nn.Module) -> None:
        super().__init__()
        self.experts = experts


def _experts(family: str) -> nn.Module:
    torch.manual_seed(0)
    if family == "qwen3_moe":
        experts = moe.GroupedExperts(24, 40, 6)
        experts.init_weights(0.2, 0.2)
    else:
        args = replace(get_model_spec("gpt_oss").flavors["debug"], dim=24, ffn_dim=20, n_experts=6)
        experts = GptOssExperts(args)
        experts.init_weights(0.2, 0.2)
        with torch.no_grad():
            experts.gate_up_proj_bias.normal_(std=0.1)
            experts.down_proj_bias.normal_(std=0.1)
    return experts


def _direct(experts: nn.Module, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Expert by expert: W x + s B A x for every adapted projection, no grouping."""
    gu_lora, down_lora = experts.lora["gate_up"], experts.lora["down"]
    outs = []
    for e, xe in enumerate(x.split(counts.tolist())):
        def adapter(h, a, e=e):
            return a.scaling * (h @ a.lora_a.weight[e].T) @ a.lora_b.weight[e].T

        if isinstance(experts, moe.GroupedExperts):
            gate_up = xe @ torch.cat([experts.w1[e], experts.w3[e]]).T + adapter(xe, gu_lora)
            gate, up = gate_up.chunk(2, dim=-1)
            h = F.silu(gate) * up
            outs.append(h @ experts.w2[e].T + adapter(h, down_lora))
        else:
            gate_up = xe @ experts.gate_up_proj[e] + experts.gate_up_proj_bias[e] + adapter(xe, gu_lora)
            gate = gate_up[:, ::2].clamp(max=experts.limit)
            up = gate_up[:, 1::2].clamp(min=-experts.limit, max=experts.limit)
            h = (up + 1) * (gate * torch.sigmoid(gate * experts.alpha))
            outs.append(h @ experts.down_proj[e] + experts.down_proj_bias[e] + adapter(h, down_lora))
    return torch.cat(outs)


@pytest.mark.parametrize("family", FAMILIES)
def test_expert_adapters_add_scaled_b_a_x_per_expert_on_both_paths(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    holder = _Holder(_experts(family))
    assert apply_lora(holder, rank=3, alpha=6, targets=("experts",)) == ["experts"]
    experts = holder.experts
    assert set(experts.lora) == {"gate_up", "down"} and experts.lora["gate_up"].scaling == 2.0
    _randomize_b(holder)
    counts = torch.tensor([5, 0, 11, 1, 7, 3])  # an empty expert, groups not multiples of the alignment
    x = torch.randn(int(counts.sum()), 24, generator=torch.Generator().manual_seed(1))
    expected = _direct(experts, x, counts)

    looped = experts(x, counts)
    torch.testing.assert_close(looped, expected, rtol=1e-5, atol=1e-5)
    adapters = [p for n, p in holder.named_parameters() if p.requires_grad]
    assert len(adapters) == 4 and all(".lora." in n for n, p in holder.named_parameters() if p.requires_grad)
    g_looped = torch.autograd.grad(looped.square().sum(), adapters)
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no torch._grouped_mm")
    monkeypatch.setattr(moe, "GROUPED_MM_ON_CPU", True)
    try:
        grouped = experts(x, counts)
    except RuntimeError as err:  # older torch: no CPU kernel
        pytest.skip(f"torch._grouped_mm does not run on this CPU build: {err}")
    torch.testing.assert_close(grouped, expected, rtol=1e-5, atol=1e-5)
    for g, h in zip(torch.autograd.grad(grouped.square().sum(), adapters), g_looped):
        torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_initialized_expert_adapters_give_the_base_model(family: str, random_hf: dict[str, Path]) -> None:
    model = load_hf(random_hf[family]).eval()
    ids = _ids(model.args.vocab_size)
    with torch.no_grad():
        before = model(ids)
        adapted = apply_lora(model, rank=4, alpha=8, targets=("experts",))
        init_lora_adapters(model, seed=0)
        after = model(ids)
    n_moe = len(model.moe_layers())
    assert len(adapted) == n_moe and len(expert_lora_modules(model)) == 2 * n_moe
    a = next(iter(expert_lora_modules(model).values())).lora_a.weight
    assert a.abs().max() > 0 and a.shape[0] == model.args.n_experts
    torch.testing.assert_close(after, before, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_training_changes_only_the_adapters(family: str) -> None:
    torch.manual_seed(0)
    model = build_model(family, "debug", device="cpu", vocab_size=256)
    apply_lora(model, rank=4, alpha=8, targets=("wq", "experts"))
    init_lora_adapters(model, seed=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("lora_a.weight", "lora_b.weight")) for n in trainable)
    assert any(".experts.lora." in n for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = _ids(256)
    for _ in range(3):
        logits = model(ids)
        F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad()
    for name, p in model.named_parameters():
        if name in trainable:
            assert not torch.equal(p, before[name]), f"{name} did not train"
        else:
            assert torch.equal(p, before[name]), f"frozen {name} changed"


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_export_and_peft_adapter_match_the_adapted_model(
    family: str, random_hf: dict[str, Path], tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    base_dir = random_hf[family]
    model = load_hf(base_dir).eval()
    apply_lora(model, rank=4, alpha=8, targets=("wq", "experts"))
    _randomize_b(model)
    ids = _ids(model.args.vocab_size, seed=5)
    with torch.no_grad():
        ours = model(ids)
        assert (ours - load_hf(base_dir)(ids)).abs().max() > 1e-2  # the adapters do change the logits

    merged = save_hf(model, tmp_path / "merged")
    hf = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    with torch.no_grad():
        got = hf(input_ids=ids, use_cache=False).logits
    assert ((got - ours).abs().max() / ours.abs().max()).item() < 1e-5

    peft = pytest.importorskip("peft")
    adapter_dir = save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(base_dir))
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["target_parameters"] == ["experts.down_proj", "experts.gate_up_proj"]
    assert config["target_modules"] == ["q_proj"] and config["r"] == 4 and config["lora_alpha"] == 8
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        with_adapter = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
        got = with_adapter(input_ids=ids, use_cache=False).logits
    assert ((got - ours).abs().max() / ours.abs().max()).item() < 1e-5


def test_dpo_reference_switches_expert_adapters_off(random_hf: dict[str, Path]) -> None:
    from posttrain.recipes.dpo import adapters_disabled

    model = load_hf(random_hf["qwen3_moe"]).eval()
    ids = _ids(model.args.vocab_size)
    with torch.no_grad():
        base = model(ids)
        apply_lora(model, rank=2, alpha=4, targets=("experts",))
        _randomize_b(model)
        assert not torch.equal(model(ids), base)
        with adapters_disabled(model):
            torch.testing.assert_close(model(ids), base, rtol=0, atol=0)
    assert all(m.scaling == 2.0 for m in model.modules() if isinstance(m, ExpertLoRA))


def test_experts_target_refusals() -> None:
    with pytest.raises(ValueError, match="lora.dropout = 0"):
        apply_lora(_Holder(_experts("qwen3_moe")), rank=2, alpha=4, dropout=0.1, targets=("experts",))
    dense = build_model("qwen3", "debug", device="meta", vocab_size=256)
    with pytest.raises(ValueError, match="no stacked MoE experts"):
        apply_lora(dense, rank=2, alpha=4, targets=("wq", "experts"))
