"""Qwen3 <-> Hugging Face ``Qwen3ForCausalLM``: state-dict names and config.json."""

from __future__ import annotations

from typing import Any

from posttrain.models.common.hf_config import dense_args_from_hf_config, dense_hf_config_from_args
from posttrain.models.common.hf_names import DENSE_DECODER_MODULES, StateDictNameMap
from .args import Qwen3Args

HF_MODEL_TYPE = "qwen3"
HF_ARCHITECTURE = "Qwen3ForCausalLM"

NAME_MAP = StateDictNameMap(DENSE_DECODER_MODULES)


def to_hf_name(name: str) -> str | None:
    return NAME_MAP.to_hf(name)


def from_hf_name(name: str) -> str | None:
    return NAME_MAP.from_hf(name)


def args_from_hf_config(config: dict[str, Any]) -> Qwen3Args:
    if config.get("use_sliding_window", False):
        raise NotImplementedError("Qwen3 with use_sliding_window=true is not supported yet")
    return dense_args_from_hf_config(config, Qwen3Args, qk_norm=True)


def hf_config_from_args(args: Qwen3Args) -> dict[str, Any]:
    config = dense_hf_config_from_args(args, model_type=HF_MODEL_TYPE, architecture=HF_ARCHITECTURE)
    config.update(use_sliding_window=False, sliding_window=None, max_window_layers=args.n_layers)
    return config
