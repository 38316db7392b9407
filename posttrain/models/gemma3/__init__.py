"""Gemma 3 text models (HF model_type "gemma3_text")."""

from posttrain.models.registry import ModelSpec

from . import hf_adapter
from .args import GEMMA3_FLAVORS, Gemma3Args
from .model import Gemma3Model
from .tp_plan import tp_plan

MODEL_SPEC = ModelSpec(
    name="gemma3",
    hf_model_types=(hf_adapter.HF_MODEL_TYPE,),
    args_cls=Gemma3Args,
    model_cls=Gemma3Model,
    flavors=GEMMA3_FLAVORS,
    args_from_hf_config=hf_adapter.args_from_hf_config,
    hf_config_from_args=hf_adapter.hf_config_from_args,
    to_hf_name=hf_adapter.to_hf_name,
    from_hf_name=hf_adapter.from_hf_name,
    tp_plan=tp_plan,
)

__all__ = ["GEMMA3_FLAVORS", "MODEL_SPEC", "Gemma3Args", "Gemma3Model"]
