"""GPT-OSS against transformers (random tiny config: attention sinks, sliding window shorter than the
documents, YaRN with a short original context, 6 experts top-3 with biases, active SwiGLU clamps), bf16
checkpoints, save_hf round trip, grouped vs looped experts, flavors."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from posttrain.models import build_model, get_model_spec, load_hf, save_hf
from posttrain.models.common import moe
from posttrain.models.gpt_oss.model import GptOssExperts

REPO = Path(__file__).resolve().parents[2]


def _load_verifier():
    spec = importlib.util.spec_from_file_location("verify_hf_parity", REPO / "scripts" / "verify_hf_parity.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


verify = _load_verifier()


@pytest.fixture(scope="module")
def random_gpt_oss(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return verify.make_random_hf_model("gpt_oss", tmp_path_factory.mktemp("gpt_oss"))


@pytest.mark.parametrize("attn_backend", ["sdpa", "flex"])
def test_gpt_oss_logits_match_transformers(random_gpt_oss: Path, attn_backend: str) -> None:
    report = verify.compare_logits(random_gpt_oss, dtype=torch.float32, seq_len=40, batch=2,
                                   attn_backend=attn_backend)
    assert report.rel < 1e-5, report


def test_gpt_oss_bf16_checkpoint_loads_within_bf16_tolerance(random_gpt_oss: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(random_gpt_oss), dtype=torch.bfloat16).save_pretrained(str(tmp_path))
    model = load_hf(tmp_path, dtype=torch.bfloat16)
    assert model.layers["0"].feed_forward.experts.gate_up_proj.dtype == torch.bfloat16
    report = verify.compare_logits(tmp_path, dtype=torch.bfloat16, seq_len=24, batch=1)
    assert report.rel < 5e-2, report


def test_bf16_under_the_reference_routing_leaves_only_rounding_and_near_tie_flips(random_gpt_oss: Path) -> None:
    # Without it, one tie in a bf16 router logit sends a token to other experts (0.2 relative, measured).
    report = verify.compare_logits(random_gpt_oss, dtype=torch.bfloat16, seq_len=45, batch=2, attn_backend="flex",
                                   follow_reference_routing=True)
    assert report.routing_decisions == 3 * (2 * 45 + 45 + 2 * 45)  # 3 MoE layers: batch, packed row, hidden states
    assert report.rel < 5e-2, report
    assert report.routing_flips <= 0.03 * report.routing_decisions and max(report.flip_margins, default=0) < 3e-2


def test_a_wrong_router_shows_as_routing_flips_under_the_reference_routing(random_gpt_oss: Path) -> None:
    ours = load_hf(random_gpt_oss).eval()
    with torch.no_grad():
        router = ours.layers["1"].feed_forward.router
        router.bias.copy_(router.bias.flip(0))  # experts' biases swapped: another routing, same logit scale
    report = verify.compare_logits(random_gpt_oss, ours=ours, seq_len=40, batch=2, follow_reference_routing=True)
    assert report.routing_flips > 0.1 * report.routing_decisions / 3, report.routing_flips
    assert max(report.flip_margins) > 0.1, max(report.flip_margins)


def test_gpt_oss_sinks_take_probability_mass(random_gpt_oss: Path) -> None:
    model = load_hf(random_gpt_oss).eval()
    ids = torch.randint(0, 1000, (1, 20))
    with torch.no_grad():
        with_sinks = model(ids)
        for block in model.layers.values():
            block.attention.sinks.fill_(-1e4)  # a sink of -inf is plain softmax attention
        without = model(ids)
    assert (with_sinks - without).abs().max() > 1e-3


def test_gpt_oss_save_hf_round_trips_through_transformers(random_gpt_oss: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    ours = load_hf(random_gpt_oss).eval()
    save_hf(ours, tmp_path / "out")
    assert load_hf(tmp_path / "out").args == ours.args
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32).eval()
    ids = torch.randint(0, ours.args.vocab_size, (2, 24))
    with torch.no_grad():
        expected = ref(input_ids=ids, use_cache=False).logits
        got = ours(ids)
    assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-5


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="this torch has no torch._grouped_mm")
def test_gpt_oss_grouped_experts_match_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    args = get_model_spec("gpt_oss").flavors["debug"]
    experts = GptOssExperts(args)
    experts.init_weights(0.2, 0.2)
    torch.nn.init.normal_(experts.gate_up_proj_bias, std=0.5)
    torch.nn.init.normal_(experts.down_proj_bias, std=0.5)
    counts = torch.tensor([5, 0, 9, 1, 3, 0, 11, 2])  # empty groups, sizes off the alignment
    x = torch.randn(int(counts.sum()), args.dim, requires_grad=True)
    inputs = [x, *experts.parameters()]  # the biases too: rows outside every group once leaked into their grads
    looped = experts(x, counts)
    g_looped = torch.autograd.grad(looped.square().sum(), inputs)
    monkeypatch.setattr(moe, "GROUPED_MM_ON_CPU", True)
    try:
        grouped = experts(x, counts)
    except RuntimeError as err:
        pytest.skip(f"torch._grouped_mm does not run on this CPU build: {err}")
    g_grouped = torch.autograd.grad(grouped.square().sum(), inputs)
    torch.testing.assert_close(grouped, looped, rtol=0, atol=1e-6 * looped.abs().max().item())  # outputs O(10)
    for got, want in zip(g_grouped, g_looped):  # gradients up to O(1e3)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6 * want.abs().max().item())


@pytest.mark.parametrize(("flavor", "total_b", "active_b"), [("20b", 20.9, 3.6), ("120b", 116.8, 5.1)])
def test_gpt_oss_flavors_have_the_published_sizes(flavor: str, total_b: float, active_b: float) -> None:
    model = build_model("gpt_oss", flavor, "meta")
    total = sum(p.numel() for p in model.parameters()) / 1e9
    assert abs(total - total_b) < 0.1 * total_b, total
    assert abs(model.active_params_per_token() / 1e9 - active_b) < 0.1 * active_b
    spec = get_model_spec("gpt_oss")
    assert spec.args_from_hf_config(spec.hf_config_from_args(model.args)) == model.args


def test_gpt_oss_debug_flavor_trains_one_step() -> None:
    torch.manual_seed(0)
    model = build_model("gpt_oss", "debug", "cpu")
    ids = torch.randint(0, model.args.vocab_size, (2, 40))
    document_ids = torch.tensor([[0] * 25 + [1] * 15, [0] * 40])
    position_ids = torch.stack([torch.cat([torch.arange(25), torch.arange(15)]), torch.arange(40)])
    logits = model(ids, position_ids=position_ids, document_ids=document_ids)
    torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    assert model.layers["1"].attention.sinks.grad.abs().sum() > 0
    assert model.layers["0"].feed_forward.experts.gate_up_proj_bias.grad.abs().sum() > 0


def test_quantized_gpt_oss_checkpoints_are_refused() -> None:
    spec = get_model_spec("gpt_oss")
    config = spec.hf_config_from_args(spec.flavors["debug"])
    config["quantization_config"] = {"quant_method": "mxfp4"}
    with pytest.raises(NotImplementedError, match="MXFP4"):
        spec.args_from_hf_config(config)
