"""Model families, their registry, and Hugging Face checkpoint I/O."""

from posttrain.models.hf import load_hf, save_hf
from posttrain.models.registry import ModelSpec, build_model, get_model_spec, get_model_spec_for

__all__ = ["ModelSpec", "build_model", "get_model_spec", "get_model_spec_for", "load_hf", "save_hf"]
