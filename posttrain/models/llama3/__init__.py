"""Llama 3 / 3.1 / 3.2 (HF model_type "llama")."""

from posttrain.models.common.tp_plan import dense_decoder_tp_plan
from posttrain.models.registry import ModelSpec

from . import hf_adapter
from .args import LLAMA3_FLAVORS, Llama3Args
from .model import Llama3Model

MODEL_SPEC = ModelSpec(
    name="llama3",
    hf_model_types=(hf_adapter.HF_MODEL_TYPE,),
    args_cls=Llama3Args,
    model_cls=Llama3Model,
    flavors=LLAMA3_FLAVORS,
    args_from_hf_config=hf_adapter.args_from_hf_config,
    hf_config_from_args=hf_adapter.hf_config_from_args,
    to_hf_name=hf_adapter.to_hf_name,
    from_hf_name=hf_adapter.from_hf_name,
    tp_plan=dense_decoder_tp_plan,
)

__all__ = ["MODEL_SPEC", "LLAMA3_FLAVORS", "Llama3Args", "Llama3Model"]
