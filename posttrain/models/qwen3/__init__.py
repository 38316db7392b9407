"""Qwen3 dense models (HF model_type "qwen3")."""

from posttrain.models.qwen3 import hf_adapter
from posttrain.models.qwen3.args import QWEN3_FLAVORS, Qwen3Args
from posttrain.models.qwen3.model import Qwen3Model
from posttrain.models.registry import ModelSpec

MODEL_SPEC = ModelSpec(
    name="qwen3",
    hf_model_types=(hf_adapter.HF_MODEL_TYPE,),
    args_cls=Qwen3Args,
    model_cls=Qwen3Model,
    flavors=QWEN3_FLAVORS,
    args_from_hf_config=hf_adapter.args_from_hf_config,
    hf_config_from_args=hf_adapter.hf_config_from_args,
    to_hf_name=hf_adapter.to_hf_name,
    from_hf_name=hf_adapter.from_hf_name,
)

__all__ = ["MODEL_SPEC", "QWEN3_FLAVORS", "Qwen3Args", "Qwen3Model"]
