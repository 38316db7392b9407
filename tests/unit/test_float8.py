"""training.float8: config refusals, the hardware refusal, which Linear layers torchao converts, and that a
converted model still trains (torchao's float8 emulation on the CPU; the real float8 kernels need a GPU)."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
import torch.nn as nn

from posttrain.config import ConfigError, config_from_dict
from posttrain.models.common.lora import apply_lora
from posttrain.models.registry import get_model_spec, resolve_scratch_args
from posttrain.parallelisms.float8 import (
    Float8Unavailable,
    convert_to_float8,
    float8_unavailable_reason,
    high_precision_reason,
)

FLOAT8_ON = {"training": {"float8": True}, "compile": {"enabled": True}}


def float8_config(**sections):
    tables = copy.deepcopy(FLOAT8_ON)
    for name, values in sections.items():
        tables.setdefault(name, {}).update(values)
    return config_from_dict(tables)


def meta_model(family: str, flavor: str = "debug") -> nn.Module:
    spec = get_model_spec(family)
    with torch.device("meta"):
        return spec.model_cls(resolve_scratch_args(spec, flavor))


# --- config ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sections", "needle"),
    [
        ({"compile": {"enabled": False}}, "needs compile.enabled = true"),
        ({"lora": {"rank": 8}}, "cannot be combined with LoRA"),
        ({"model": {"backend": "hf", "hf_path": "x"}}, "model.backend = 'native' only"),
        ({"training": {"mixed_precision": "fp32"}}, "needs bf16 compute"),
    ],
)
def test_float8_config_refusals_name_the_key(sections, needle):
    with pytest.raises(ConfigError, match="training.float8") as err:
        float8_config(**sections)
    assert needle in str(err.value)
    assert err.value.key == "training.float8"


def test_float8_without_torchao_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)  # `import torchao` now fails, as if not installed
    with pytest.raises(ConfigError, match=r"needs torchao, which is not installed: pip install 'posttrain\[float8\]'"):
        float8_config()
    assert "pip install 'posttrain[float8]'" in float8_unavailable_reason(torch.device("cpu"))


def test_float8_off_by_default_and_accepted_when_complete():
    pytest.importorskip("torchao")
    assert config_from_dict({}).training.float8 is False
    cfg = float8_config()
    assert cfg.training.float8 and not cfg.training.float8_convert_small_gemms
    assert cfg.training.float8_recipe == "rowwise"
    assert float8_config(training={"float8_recipe": "tensorwise"}).training.float8_recipe == "tensorwise"


def test_float8_recipe_refusals_name_the_key():
    pytest.importorskip("torchao")
    with pytest.raises(ConfigError, match="training.float8_recipe") as err:
        float8_config(training={"float8_recipe": "blockwise"})
    assert "rowwise" in str(err.value) and "tensorwise" in str(err.value)
    with pytest.raises(ConfigError, match="tensor parallelism") as err:
        float8_config(training={"float8_recipe": "tensorwise"}, parallelism={"tp": 2})
    assert err.value.key == "training.float8_recipe"
    assert float8_config(training={"float8_recipe": "rowwise"}, parallelism={"tp": 2}).parallelism.tp == 2


def test_cpu_is_refused_as_hardware_without_float8():
    pytest.importorskip("torchao")
    reason = float8_unavailable_reason(torch.device("cpu"))
    assert "compute capability >= 8.9" in reason and "on cpu" in reason


def test_building_the_model_on_cpu_is_refused_in_one_line():
    pytest.importorskip("torchao")
    from posttrain.parallelisms import ParallelDims
    from posttrain.trainer import build_training_model

    cfg = float8_config(model={"name": "qwen3", "flavor": "debug"})
    with pytest.raises(SystemExit) as exit_:
        build_training_model(cfg, parallel_dims=ParallelDims(1, 1, 1, world_size=1), device=torch.device("cpu"),
                             mixed_precision="bf16", tokenizer_vocab_size=2048)
    message = str(exit_.value.code)
    assert message.startswith("training.float8 = true: float8 matmuls need a CUDA GPU of compute capability >= 8.9")
    assert "\n" not in message


# --- which Linear layers are converted ---------------------------------------------------------


def test_blocks_convert_and_the_head_stays_high_precision():
    pytest.importorskip("torchao")
    from torchao.float8.float8_linear import Float8Linear

    model = meta_model("qwen3")
    keys = sorted(model.state_dict())
    report = convert_to_float8(model, convert_small_gemms=True)
    per_block = ["attention.wq", "attention.wk", "attention.wv", "attention.wo",
                 "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]
    assert sorted(report.converted) == sorted(f"layers.{i}.{n}" for i in range(2) for n in per_block)
    assert report.kept == {"output": "outside the transformer blocks (output head)"}
    assert isinstance(model.layers["1"].feed_forward.w2, Float8Linear)
    assert type(model.output) is nn.Linear
    assert sorted(model.state_dict()) == keys  # checkpoints and HF export see the same names
    again = convert_to_float8(model, convert_small_gemms=True)
    assert again.converted == [] and len(again.kept) == 15
    assert "14 Linear layers converted" in report.summary()


def test_moe_router_stays_high_precision():
    pytest.importorskip("torchao")
    report = convert_to_float8(meta_model("qwen3_moe"), convert_small_gemms=True)
    assert report.kept["layers.0.feed_forward.router"] == "MoE router"
    assert "layers.0.attention.wq" in report.converted


def test_dims_not_divisible_by_16_stay_high_precision():
    pytest.importorskip("torchao")
    with torch.device("meta"):
        odd, even = nn.Linear(24, 4096), nn.Linear(4096, 8192)
    assert high_precision_reason("layers.0.x", odd, convert_small_gemms=True) == "with a dimension not divisible by 16"
    assert high_precision_reason("layers.0.x", even, convert_small_gemms=True) is None
    assert high_precision_reason("head.x", even, convert_small_gemms=True).startswith("outside the transformer blocks")


def test_small_gemms_are_kept_unless_asked_qwen3_1_7b():
    """torchao's rowwise heuristic on the benchmark shape: only the MLP's up/gate projections (6144 x 2048)
    are large enough by default; every block Linear when asked."""
    pytest.importorskip("torchao")
    default = convert_to_float8(meta_model("qwen3", "1.7B"))
    assert {name.split(".", 2)[2] for name in default.converted} == {"feed_forward.w1", "feed_forward.w3"}
    assert sum(r.startswith("too small") for r in default.kept.values()) == 28 * 5
    everything = convert_to_float8(meta_model("qwen3", "1.7B"), convert_small_gemms=True)
    assert len(everything.converted) == 28 * 7


def test_tensorwise_heuristic_converts_attention_and_mlp_projections_qwen3_1_7b():
    """torchao's tensorwise heuristic rates more of the hidden-2048 gemms as worth it than the rowwise one: every
    block Linear but wk / wv (1024 x 2048), and the layers carry the tensorwise scaling."""
    pytest.importorskip("torchao")
    from torchao.float8.config import ScalingGranularity

    model = meta_model("qwen3", "1.7B")
    report = convert_to_float8(model, recipe="tensorwise")
    assert {name.split(".", 2)[2] for name in report.converted} == {
        "attention.wq", "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"}
    assert report.kept["layers.0.attention.wk"] == "too small to gain (torchao's tensorwise size heuristic)"
    assert report.summary().startswith("float8 (tensorwise): 140 Linear layers converted")
    config = model.layers["0"].feed_forward.w1.config
    assert config.cast_config_input.scaling_granularity is ScalingGranularity.TENSORWISE
    rowwise = meta_model("qwen3")
    convert_to_float8(rowwise, convert_small_gemms=True)
    granularity = rowwise.layers["0"].feed_forward.w1.config.cast_config_input.scaling_granularity
    assert granularity is ScalingGranularity.AXISWISE
    with pytest.raises(ValueError, match="float8 recipe 'blockwise'"):
        convert_to_float8(meta_model("qwen3"), recipe="blockwise")


def test_lora_model_is_refused():
    pytest.importorskip("torchao")
    model = meta_model("qwen3")
    apply_lora(model, rank=8, alpha=16.0, targets=["wq", "wv"])
    with pytest.raises(Float8Unavailable, match="LoRA"):
        convert_to_float8(model)


# --- a converted model still computes the same function ----------------------------------------


@pytest.mark.parametrize("recipe", ["rowwise", "tensorwise"])
def test_converted_model_trains_close_to_bf16_emulated_on_cpu(recipe: str):
    pytest.importorskip("torchao")
    spec = get_model_spec("qwen3")
    torch.manual_seed(0)
    model = spec.model_cls(resolve_scratch_args(spec, "debug"))
    model.init_weights()
    reference = copy.deepcopy(model).to(torch.bfloat16)
    convert_to_float8(model, convert_small_gemms=True, emulate=True, recipe=recipe)
    model.to(torch.bfloat16)
    tokens = torch.randint(0, 2048, (2, 32), generator=torch.Generator().manual_seed(1))

    def loss_and_grad(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = m(tokens).float()
        loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        return logits.detach(), loss.detach(), m.layers["0"].feed_forward.w1.weight.grad.float()

    logits8, loss8, grad8 = loss_and_grad(model)
    logits, loss, grad = loss_and_grad(reference)
    assert not torch.equal(logits8, logits)  # the matmuls really went through float8 casts
    assert (logits8 - logits).abs().max() < 0.05 * logits.abs().max()
    assert abs(loss8 - loss) < 0.01 * loss
    assert (grad8 - grad).norm() < 0.25 * grad.norm()
