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

from collections.abc import Callable
from functools import partial

from posttrain.models.registry import get_model_spec
from posttrain.parallelisms.grad_clip import clip_divisor, clip_grad_norm_, get_total_grad_norm
from posttrain.parallelisms.parallel_dims import ParallelDims
from posttrain.parallelisms.parallelize import parallelize_decoder


def get_parallelize_fn(family: str) -> Callable:
    """The family's ``parallelize(model, parallel_dims, *, mixed_precision, ac, compile, parallelism)``.

    ``family`` is a posttrain family name, an HF model_type or a ``ModelSpec`` import path. Its ``ModelSpec``
    decides: its own ``parallelize_fn`` when it sets one, else the shared decoder order (TP -> AC -> compile
    -> FSDP, ``parallelize_decoder``) with the spec's ``tp_plan``.
    """
    spec = get_model_spec(family)
    if spec.parallelize_fn is not None:
        return spec.parallelize_fn
    return partial(parallelize_decoder, tp_plan=spec.tp_plan)


__all__ = ["ParallelDims", "clip_divisor", "clip_grad_norm_", "get_parallelize_fn", "get_total_grad_norm"]
