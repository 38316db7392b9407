"""Parallelism as plain functions over PyTorch's distributed APIs.

Order of use in a trainer::

    dims = ParallelDims.from_config(cfg.parallelism, world_size); dims.build_mesh(device_type)
    model = build_model(name, flavor, device="meta")
    get_parallelize_fn(name)(model, dims, mixed_precision=..., ac=..., compile=..., parallelism=...)
    model.to_empty(device=device)
    init_weights_sharded(model, seed)  or  load_hf_weights_sharded(model, hf_dir)   # posttrain.models.sharded_load
    ... loss.backward(); clip_grad_norm_(model.parameters(), max_norm) ...
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from posttrain.parallelisms.grad_clip import clip_grad_norm_, get_total_grad_norm
from posttrain.parallelisms.parallel_dims import ParallelDims

# family name -> module holding its ``parallelize(model, parallel_dims, *, mixed_precision, ac, compile, parallelism)``
PARALLELIZE_MODULES: dict[str, str] = {
    "llama3": "posttrain.models.llama3.parallelize",
    "qwen3": "posttrain.models.qwen3.parallelize",
    "gemma3": "posttrain.models.gemma3.parallelize",
    "qwen3_moe": "posttrain.models.qwen3_moe.parallelize",
    "gpt_oss": "posttrain.models.gpt_oss.parallelize",
}


def get_parallelize_fn(family: str) -> Callable:
    """The family's ``parallelize`` (``ModelSpec.parallelize_fn`` when the registry sets one).

    ``family`` is a posttrain family name or an HF model_type.
    """
    from posttrain.models.registry import get_model_spec

    spec = get_model_spec(family)
    if getattr(spec, "parallelize_fn", None) is not None:
        return spec.parallelize_fn
    module = PARALLELIZE_MODULES.get(spec.name)
    if module is None:
        raise NotImplementedError(
            f"model family {spec.name!r} has no parallelize plan yet; known: {sorted(PARALLELIZE_MODULES)}"
        )
    return importlib.import_module(module).parallelize


__all__ = ["PARALLELIZE_MODULES", "ParallelDims", "clip_grad_norm_", "get_parallelize_fn", "get_total_grad_norm"]
