"""Family lookup, flavors, meta-device builds and HF config.json <-> args conversion."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from posttrain.models import build_model, get_model_spec
from posttrain.models.registry import list_model_specs

# parameter counts of the released checkpoints
KNOWN_SIZES = {("llama3", "1B"): 1_235_814_400, ("llama3", "8B"): 8_030_261_248, ("qwen3", "8B"): 8_190_735_360}


def test_lookup_by_family_name_or_hf_model_type() -> None:
    assert get_model_spec("llama3") is get_model_spec("llama")
    assert get_model_spec("qwen3").hf_model_types == ("qwen3",)
    with pytest.raises(KeyError, match="llama3"):
        get_model_spec("gpt2")


@pytest.mark.parametrize(("family", "flavor"), sorted(KNOWN_SIZES))
def test_flavors_build_on_meta_with_the_released_sizes(family: str, flavor: str) -> None:
    model = build_model(family, flavor)  # meta: no memory
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == KNOWN_SIZES[(family, flavor)]


def test_build_model_overrides_fields_and_rejects_unknown_ones() -> None:
    model = build_model("qwen3", "debug", "cpu", attn_backend="flex", vocab_size=1000)
    assert model.args.attn_backend == "flex" and model.args.padded_vocab_size == 1024
    assert get_model_spec("qwen3").flavors["debug"].vocab_size == 2048  # the flavor itself is untouched
    with pytest.raises(TypeError, match="no_such_field"):
        build_model("qwen3", "debug", no_such_field=1)


@pytest.mark.parametrize(
    ("family", "flavor"), [(spec.name, flavor) for spec in list_model_specs() for flavor in spec.flavors]
)
def test_hf_config_round_trip(family: str, flavor: str) -> None:
    from transformers import AutoConfig

    spec = get_model_spec(family)
    args = spec.flavors[flavor]
    config = spec.hf_config_from_args(args)
    assert spec.args_from_hf_config(config) == args
    hf = AutoConfig.for_model(config.pop("model_type"), **config)
    assert (hf.hidden_size, hf.num_key_value_heads, hf.head_dim) == (args.dim, args.n_kv_heads, args.head_dim)
    assert hf.tie_word_embeddings == args.tie_embeddings


def test_reads_transformers_5_rope_parameters() -> None:
    spec = get_model_spec("llama")
    legacy = spec.hf_config_from_args(spec.flavors["8B"])
    v5 = {k: v for k, v in legacy.items() if k not in ("rope_theta", "rope_scaling")}
    v5["rope_parameters"] = {**legacy["rope_scaling"], "rope_theta": legacy["rope_theta"]}
    assert spec.args_from_hf_config(v5) == spec.flavors["8B"]
    plain = {**v5, "rope_parameters": {"rope_type": "default", "rope_theta": 1234.0}}
    args = spec.args_from_hf_config(plain)
    assert args.rope_scaling is None and args.rope_theta == 1234.0


def test_unsupported_hf_features_are_refused() -> None:
    spec = get_model_spec("qwen3")
    config = spec.hf_config_from_args(spec.flavors["debug"])
    with pytest.raises(NotImplementedError, match="use_sliding_window"):
        spec.args_from_hf_config({**config, "use_sliding_window": True})
    with pytest.raises(NotImplementedError, match="hidden_act"):
        spec.args_from_hf_config({**config, "hidden_act": "gelu"})


def test_init_weights_after_meta_build_keeps_tied_head() -> None:
    model = build_model("qwen3", "debug")
    model.to_empty(device="cpu")
    model.init_weights()
    assert model.output.weight is model.tok_embeddings.weight
    assert torch.isfinite(model(torch.zeros(1, 4, dtype=torch.long))).all()
    assert dataclasses.is_dataclass(model.args) and model.args.padded_vocab_size % 64 == 0
