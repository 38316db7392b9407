"""Qwen3 dense models (HF model_type "qwen3")."""

from posttrain.models.common.tp_plan import dense_decoder_tp_plan
from posttrain.models.registry import ModelSpec

from . import hf_adapter
from .args import QWEN3_FLAVORS, Qwen3Args
from .model import Qwen3Model

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
    tp_plan=dense_decoder_tp_plan,
)

__all__ = ["MODEL_SPEC", "QWEN3_FLAVORS", "Qwen3Args", "Qwen3Model"]
