"""Model families by name or HF ``model_type``; one small dataclass per family."""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

# Families shipped with posttrain; each package exposes MODEL_SPEC and is imported on first lookup.
BUILTIN_FAMILIES = ("llama3", "qwen3", "gemma3", "qwen3_moe", "gpt_oss")


@dataclass(frozen=True)
class ModelSpec:
    """Everything the rest of posttrain needs to know about a model family.

    Parts: ``args_cls`` (sizes; ``flavors`` names instances of it), ``model_cls`` (built from an args
    object), the HF adapter (``args_from_hf_config`` / ``hf_config_from_args``; ``to_hf_name`` /
    ``from_hf_name`` rename one state-dict key, None: the key has no counterpart).

    Parallelism: ``tp_plan(model, *, loss_parallel=False) -> TPPlan`` (``posttrain.models.common.tp_plan``;
    None: no tensor parallelism, ``parallelism.tp > 1`` is refused). ``parallelize_fn`` replaces the whole
    shared order (TP -> AC -> compile -> FSDP of ``posttrain.parallelisms.parallelize.parallelize_decoder``)
    for a family that needs another one; most leave it None. This dataclass is the one place a family is
    registered: ``posttrain.parallelisms.get_parallelize_fn`` reads both fields from it.
    """

    name: str
    hf_model_types: tuple[str, ...]
    args_cls: type
    model_cls: type[nn.Module]
    flavors: dict[str, Any]
    args_from_hf_config: Callable[[dict[str, Any]], Any]
    hf_config_from_args: Callable[[Any], dict[str, Any]]
    to_hf_name: Callable[[str], str | None]
    from_hf_name: Callable[[str], str | None]
    tp_plan: Callable[..., Any] | None = field(default=None)
    parallelize_fn: Callable[..., Any] | None = field(default=None)


_SPECS: dict[str, ModelSpec] = {}
_builtins_loaded = False


def register_model_spec(spec: ModelSpec) -> None:
    for key in (spec.name, *spec.hf_model_types):
        existing = _SPECS.get(key)
        if existing is not None and existing is not spec:
            raise ValueError(f"model name {key!r} is already registered by family {existing.name!r}")
        _SPECS[key] = spec


def _load_builtins() -> None:
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    for family in BUILTIN_FAMILIES:
        register_model_spec(importlib.import_module(f"posttrain.models.{family}").MODEL_SPEC)


def list_model_specs() -> list[ModelSpec]:
    _load_builtins()
    return list({id(spec): spec for spec in _SPECS.values()}.values())


def get_model_spec(name: str) -> ModelSpec:
    """A family by its posttrain name ("llama3", "qwen3"), HF model_type ("llama", "qwen3"), or a user's
    ``ModelSpec`` named by import path ("my_pkg.models:MY_SPEC"), registered on first use."""
    _load_builtins()
    if name not in _SPECS and ":" in name:
        _register_import_path(name)
    if name not in _SPECS:
        raise KeyError(f"unknown model {name!r}; known families and HF model types: {sorted(_SPECS)}")
    return _SPECS[name]


def _register_import_path(path: str) -> None:
    from posttrain.extensions import load_object

    try:
        spec = load_object(path, key="model.name")
    except ValueError as e:
        raise KeyError(str(e)) from e
    if not isinstance(spec, ModelSpec):
        raise KeyError(f"model.name = {path!r} is a {type(spec).__name__}, not a posttrain.models.registry.ModelSpec")
    register_model_spec(spec)
    _SPECS[path] = spec


def get_model_spec_for(model: nn.Module) -> ModelSpec:
    """The family of a built model (unwraps torch.compile), found by its args class."""
    model = getattr(model, "_orig_mod", model)
    args = getattr(model, "args", None)
    for spec in list_model_specs():
        if type(args) is spec.args_cls:
            return spec
    for spec in list_model_specs():
        if isinstance(model, spec.model_cls):
            return spec
    raise ValueError(f"{type(model).__name__} (args {type(args).__name__}) belongs to no registered family")


def resolve_args(spec: ModelSpec, flavor_or_args: str | Any, **overrides: Any) -> Any:
    """A fresh args object: a named flavor or a given args object, with field overrides applied."""
    if isinstance(flavor_or_args, str):
        if flavor_or_args not in spec.flavors:
            raise KeyError(f"{spec.name} has no flavor {flavor_or_args!r}; flavors: {sorted(spec.flavors)}")
        base = spec.flavors[flavor_or_args]
    elif isinstance(flavor_or_args, spec.args_cls):
        base = flavor_or_args
    else:
        raise TypeError(f"expected a flavor name or {spec.args_cls.__name__}, got {type(flavor_or_args).__name__}")
    unknown = set(overrides) - {f.name for f in dataclasses.fields(base)}
    if unknown:
        raise TypeError(f"{spec.args_cls.__name__} has no field(s) {sorted(unknown)}")
    args = dataclasses.replace(base, **overrides)
    if args.rope_scaling is not None:  # never share the flavor's dict
        args.rope_scaling = dict(args.rope_scaling)
    return args


def build_model(
    name: str, flavor_or_args: str | Any, device: torch.device | str = "meta", **overrides: Any
) -> nn.Module:
    """Build a model of family ``name``. On "meta" it is returned uninitialised (call ``to_empty`` then
    ``init_weights`` or load weights); on any other device it is materialised and initialised there."""
    spec = get_model_spec(name)
    args = resolve_args(spec, flavor_or_args, **overrides)
    with torch.device("meta"):
        model = spec.model_cls(args)
    if torch.device(device).type != "meta":
        model.to_empty(device=device)
        model.init_weights()
    return model


def resolve_scratch_args(spec: ModelSpec, flavor: str, *, vocab_size: int = 0, overrides: dict | None = None) -> Any:
    """Args of a model built from scratch: the flavor, its fields replaced by `overrides` (e.g. dim, n_layers)
    and its vocabulary by `vocab_size` (0 keeps the flavor's). Special-token ids the new vocabulary does not
    hold (a flavor's HF ids) are dropped, so an HF export stays loadable."""
    fields = dict(overrides or {})
    if vocab_size:
        fields["vocab_size"] = vocab_size
    args = resolve_args(spec, flavor, **fields)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(args, name, None)
        ids = value if isinstance(value, list) else [value]
        if value is not None and any(i is not None and i >= args.vocab_size for i in ids):
            setattr(args, name, None)
    return args
