"""Llama 3 <-> Hugging Face ``LlamaForCausalLM``: state-dict names and config.json."""

from __future__ import annotations

from typing import Any

from posttrain.models.common.hf_config import dense_args_from_hf_config, dense_hf_config_from_args
from posttrain.models.common.hf_names import DENSE_DECODER_MODULES, StateDictNameMap
from .args import Llama3Args

HF_MODEL_TYPE = "llama"
HF_ARCHITECTURE = "LlamaForCausalLM"

NAME_MAP = StateDictNameMap(
    [(ours, hf) for ours, hf in DENSE_DECODER_MODULES if not ours.endswith(("q_norm", "k_norm"))]
)


def to_hf_name(name: str) -> str | None:
    return NAME_MAP.to_hf(name)


def from_hf_name(name: str) -> str | None:
    return NAME_MAP.from_hf(name)


def args_from_hf_config(config: dict[str, Any]) -> Llama3Args:
    return dense_args_from_hf_config(config, Llama3Args, qk_norm=False)


def hf_config_from_args(args: Llama3Args) -> dict[str, Any]:
    config = dense_hf_config_from_args(args, model_type=HF_MODEL_TYPE, architecture=HF_ARCHITECTURE)
    config["mlp_bias"] = False
    config["pretraining_tp"] = 1
    return config
