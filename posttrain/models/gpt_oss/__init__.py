"""GPT-OSS models (HF model_type "gpt_oss"), bf16 checkpoints."""

from posttrain.models.registry import ModelSpec

from . import hf_adapter
from .args import GPT_OSS_FLAVORS, GptOssArgs
from .model import GptOssModel

MODEL_SPEC = ModelSpec(
    name="gpt_oss",
    hf_model_types=(hf_adapter.HF_MODEL_TYPE,),
    args_cls=GptOssArgs,
    model_cls=GptOssModel,
    flavors=GPT_OSS_FLAVORS,
    args_from_hf_config=hf_adapter.args_from_hf_config,
    hf_config_from_args=hf_adapter.hf_config_from_args,
    to_hf_name=hf_adapter.to_hf_name,
    from_hf_name=hf_adapter.from_hf_name,
    tp_plan=None,  # experts are sharded by FSDP only: no tensor or expert parallelism yet
)

__all__ = ["GPT_OSS_FLAVORS", "MODEL_SPEC", "GptOssArgs", "GptOssModel"]
