"""Qwen3-MoE against transformers (random tiny config: 6 experts, top-3, a dense layer via mlp_only_layers,
GQA, head_dim != hidden / heads), per-expert checkpoint names both ways, grouped vs looped experts, the
load-balancing loss, active-parameter counting and the SFT loss's aux term."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from posttrain.models import build_model, get_model_spec, load_hf, save_hf
from posttrain.models.common import moe

REPO = Path(__file__).resolve().parents[2]


def _load_verifier():
    spec = importlib.util.spec_from_file_location("verify_hf_parity", REPO / "scripts" / "verify_hf_parity.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


verify = _load_verifier()


@pytest.fixture(scope="module")
def random_moe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return verify.make_random_hf_model("qwen3_moe", tmp_path_factory.mktemp("qwen3_moe"))


def test_qwen3_moe_logits_match_transformers(random_moe: Path) -> None:
    report = verify.compare_logits(random_moe, dtype=torch.float32, seq_len=40, batch=2)
    assert report.rel < 1e-5, report


def test_qwen3_moe_layers_follow_mlp_only_layers(random_moe: Path) -> None:
    model = load_hf(random_moe)
    kinds = [type(block.feed_forward).__name__ for block in model.layers.values()]
    assert kinds == ["MoE", "FeedForward", "MoE"]
    assert model.layers["0"].feed_forward.experts.w1.shape == (6, 40, 64)
    args = get_model_spec("qwen3_moe").flavors["debug"]
    assert [type(args).is_moe_layer(args.__class__(**{**args.__dict__, "decoder_sparse_step": 2}), i)
            for i in range(4)] == [False, True, False, True]


def test_qwen3_moe_save_hf_writes_per_expert_tensors_transformers_loads(random_moe: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    ours = load_hf(random_moe).eval()
    out = save_hf(ours, tmp_path / "out", max_shard_size="100KB")  # sharded: experts split over files too
    names = set()
    for file in out.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            names.update(f.keys())
    assert "model.layers.2.mlp.experts.5.down_proj.weight" in names and "model.layers.1.mlp.up_proj.weight" in names
    assert load_hf(out).args == ours.args
    ref = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ids = torch.randint(0, ours.args.vocab_size, (2, 24))
    with torch.no_grad():
        expected = ref(input_ids=ids, use_cache=False).logits
        got = ours(ids)
    assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-5


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="this torch has no torch._grouped_mm")
def test_grouped_experts_match_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    layer = moe.MoE(24, 40, 6, 2, norm_topk_prob=False)
    layer.init_weights(0.3, 0.3)
    x = torch.randn(3, 29, 24, requires_grad=True)  # group sizes not multiples of the alignment
    looped = layer(x)
    (g_looped,) = torch.autograd.grad(looped.square().sum(), x)
    monkeypatch.setattr(moe, "GROUPED_MM_ON_CPU", True)
    try:
        grouped = layer(x)
    except RuntimeError as err:  # older torch: no CPU kernel
        pytest.skip(f"torch._grouped_mm does not run on this CPU build: {err}")
    (g_grouped,) = torch.autograd.grad(grouped.square().sum(), x)
    torch.testing.assert_close(grouped, looped, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_grouped, g_looped, rtol=1e-5, atol=1e-6)


def test_aux_loss_matches_transformers_per_layer(random_moe: Path) -> None:
    from transformers import AutoModelForCausalLM
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    ref = AutoModelForCausalLM.from_pretrained(str(random_moe), dtype=torch.float32).eval()
    ours = load_hf(random_moe).eval()
    ids = torch.randint(0, 1000, (2, 16))
    with torch.no_grad():
        router_logits = ref(input_ids=ids, use_cache=False, output_router_logits=True).router_logits
        ours(ids)
    expected = torch.stack([load_balancing_loss_func((logits,), 6, 3) for logits in router_logits]).mean()
    torch.testing.assert_close(ours.moe_aux_loss() / ours.args.router_aux_loss_coef, expected)
    counts = ours.tokens_per_expert()
    assert sorted(counts) == ["layers.0.feed_forward", "layers.2.feed_forward"]
    assert all(int(c.sum()) == 2 * 16 * 3 for c in counts.values())


def test_active_params_count_routed_experts_only() -> None:
    model = build_model("qwen3_moe", "30B-A3B", "meta")
    total = sum(p.numel() for p in model.parameters())
    active = model.active_params_per_token()
    assert 30.0e9 < total < 31.0e9  # Qwen3-30B-A3B: 30.5B parameters, 3.3B activated (embedding included)
    assert 3.0e9 < active < 3.1e9  # without the input embedding (0.31B), a lookup
    assert model.param_active_fraction("layers.0._checkpoint_wrapped_module.feed_forward.experts.w1") == 8 / 128
    assert model.param_active_fraction("layers.0.attention.wq.weight") == 1.0


def test_sft_loss_adds_the_weighted_aux_loss() -> None:
    from posttrain.recipes.sft import sft_loss

    torch.manual_seed(0)
    model = build_model("qwen3_moe", "debug", "cpu", router_aux_loss_coef=0.5)
    ids = torch.randint(0, model.args.vocab_size, (2, 32))
    labels = ids.clone()
    labels[:, :5] = -100
    batch = {"input_ids": ids, "labels": labels, "position_ids": torch.arange(32).expand(2, 32),
             "document_ids": torch.zeros(2, 32, dtype=torch.long)}
    out = sft_loss(model, batch, torch.tensor(54), chunk_size=16)
    aux = model.moe_aux_loss()
    plain = build_model("qwen3_moe", "debug", "cpu", router_aux_loss_coef=0.0)
    plain.load_state_dict(model.state_dict())
    plain_out = sft_loss(plain, batch, torch.tensor(54), chunk_size=16)
    torch.testing.assert_close(out.loss_sum, plain_out.loss_sum + aux * 54)
    assert set(out.metrics) == set(plain_out.metrics) == {"moe_aux_loss", "moe_load_imbalance"}
    out.loss_sum.backward()
    assert model.layers["0"].feed_forward.router.weight.grad.abs().sum() > 0
