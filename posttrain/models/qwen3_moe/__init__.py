"""Qwen3-MoE models (HF model_type "qwen3_moe")."""

from posttrain.models.registry import ModelSpec

from . import hf_adapter
from .args import QWEN3_MOE_FLAVORS, Qwen3MoeArgs
from .model import Qwen3MoeModel

MODEL_SPEC = ModelSpec(
    name="qwen3_moe",
    hf_model_types=(hf_adapter.HF_MODEL_TYPE,),
    args_cls=Qwen3MoeArgs,
    model_cls=Qwen3MoeModel,
    flavors=QWEN3_MOE_FLAVORS,
    args_from_hf_config=hf_adapter.args_from_hf_config,
    hf_config_from_args=hf_adapter.hf_config_from_args,
    to_hf_name=hf_adapter.to_hf_name,
    from_hf_name=hf_adapter.from_hf_name,
    tp_plan=None,  # experts are sharded by FSDP only: no tensor or expert parallelism yet
)

__all__ = ["MODEL_SPEC", "QWEN3_MOE_FLAVORS", "Qwen3MoeArgs", "Qwen3MoeModel"]
