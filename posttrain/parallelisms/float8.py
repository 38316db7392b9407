"""float8 training through torchao (``training.float8 = true``), rowwise (default) or tensorwise scaling.

Applied the way torchtitan applies its model converters: on the meta-device model, before
``parallelize`` (TP -> activation checkpointing -> compile -> FSDP). The ``nn.Linear`` layers of the
transformer blocks become torchao ``Float8Linear``: same parameter names and dtypes (checkpoints and HF
export do not change), but their matmuls run as float8 ``_scaled_mm`` with one scale per row
(``training.float8_recipe = "rowwise"``) or per tensor (``"tensorwise"``: fewer, cheaper scale computations, a
coarser quantisation). Kept in
high precision: everything outside ``model.layers`` (embeddings, the output head), MoE routers (small and
precision-sensitive), layers with a dimension not divisible by 16 (a float8 kernel requirement) and, unless
asked, the small gemms torchao measured as slower in float8 than in bf16 (its size heuristic for the recipe).

FSDP2's float8 all-gather (``enable_fsdp_float8_all_gather``, tensorwise only in torchao) is not turned on: the
weights are all-gathered in bf16 with either recipe. Tensorwise with tensor parallelism is refused by the config
(torchtitan gives it float8-aware TP styles, which this project does not have). Without torch.compile
the float8 casts run as many small eager kernels and the step is slower than bf16: the config refuses
``training.float8`` without ``compile.enabled``.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from posttrain.config.sections import FLOAT8_RECIPES
from posttrain.config.validate import FLOAT8_INSTALL_HINT

logger = logging.getLogger("posttrain")

MIN_CUDA_CAPABILITY = (8, 9)  # Ada (sm_89), Hopper (sm_90) and newer have float8 tensor cores
ROUTER_NAMES = frozenset({"router", "gate"})


class Float8Unavailable(RuntimeError):
    """float8 training cannot run here (torchao missing, or no float8 hardware); the message says why."""


def torchao_missing_reason() -> str | None:
    try:
        import torchao.float8  # noqa: F401
    except ImportError as err:
        return f"torchao is not importable ({err}); install it: {FLOAT8_INSTALL_HINT}"
    return None


def float8_unavailable_reason(device: torch.device) -> str | None:
    """Why float8 training cannot run on ``device``, or None when it can."""
    missing = torchao_missing_reason()
    if missing is not None:
        return missing
    if device.type != "cuda":
        return f"float8 matmuls need a CUDA GPU of compute capability >= 8.9 (Ada, Hopper or newer); this run is on {device.type}"
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CUDA_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        return (
            f"float8 matmuls need compute capability >= 8.9 (Ada, Hopper or newer); "
            f"{name} has {capability[0]}.{capability[1]}"
        )
    return None


@dataclass
class Float8Conversion:
    """What ``convert_to_float8`` did, by module name."""

    recipe: str = "rowwise"
    converted: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)  # name -> why it stays in high precision

    def summary(self) -> str:
        reasons: dict[str, int] = {}
        for reason in self.kept.values():
            reasons[reason] = reasons.get(reason, 0) + 1
        kept = "; ".join(f"{n} {reason}" for reason, n in sorted(reasons.items())) or "none"
        return f"float8 ({self.recipe}): {len(self.converted)} Linear layers converted; kept in high precision: {kept}"


def _small_gemm_filter(recipe: str):
    """torchao's size heuristic for ``recipe``: True for a Linear whose gemms are large enough to gain."""
    from torchao.float8 import _auto_filter_for_recipe

    return _auto_filter_for_recipe(recipe, filter_fqns=[])


def high_precision_reason(name: str, linear: nn.Linear, *, convert_small_gemms: bool,
                          recipe: str = "rowwise") -> str | None:
    """Why the Linear called ``name`` (a path from the model root) stays in high precision, or None."""
    if type(linear) is not nn.Linear:
        return f"a {type(linear).__name__} (already converted, or not a plain Linear)"
    if not name.startswith("layers."):
        return "outside the transformer blocks (output head)"
    if ROUTER_NAMES & set(name.split(".")):
        return "MoE router"
    out_features, in_features = linear.weight.shape
    if out_features % 16 or in_features % 16:
        return "with a dimension not divisible by 16"
    if not convert_small_gemms and not _small_gemm_filter(recipe)(linear, name):
        return f"too small to gain (torchao's {recipe} size heuristic)"
    return None


def convert_to_float8(model: nn.Module, *, convert_small_gemms: bool = False, emulate: bool = False,
                      recipe: str = "rowwise") -> Float8Conversion:
    """Swap the eligible ``nn.Linear`` layers of ``model`` for torchao ``Float8Linear`` (``recipe`` scaling), in place.

    Call on the unparallelized model (meta device is fine). ``emulate`` runs the float8 matmuls in high
    precision (torchao's emulation; for tests on a CPU, never for training).
    """
    missing = torchao_missing_reason()
    if missing is not None:
        raise Float8Unavailable(missing)
    from posttrain.models.common.lora import has_lora
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    if recipe not in FLOAT8_RECIPES:
        raise ValueError(f"float8 recipe {recipe!r}: one of {', '.join(FLOAT8_RECIPES)}")
    if has_lora(model):
        raise Float8Unavailable("LoRA adapters are attached; float8 training converts full fine-tuning's Linear layers only")
    config = Float8LinearConfig.from_recipe_name(recipe)
    if emulate:
        config = dataclasses.replace(config, emulate=True)
    report = Float8Conversion(recipe=recipe)

    def convert(module: nn.Module, name: str) -> bool:
        reason = high_precision_reason(name, module, convert_small_gemms=convert_small_gemms, recipe=recipe)
        if reason is None:
            report.converted.append(name)
        else:
            report.kept[name] = reason
        return reason is None

    convert_to_float8_training(model, module_filter_fn=convert, config=config)
    return report


def apply_float8_training(model: nn.Module, *, device: torch.device, convert_small_gemms: bool = False,
                          recipe: str = "rowwise") -> Float8Conversion:
    """Check the hardware, convert, log what was converted and what was kept (see the module docstring)."""
    reason = float8_unavailable_reason(device)
    if reason is not None:
        raise Float8Unavailable(reason)
    report = convert_to_float8(model, convert_small_gemms=convert_small_gemms, recipe=recipe)
    logger.info(report.summary())
    if not report.converted:
        logger.warning("float8: no Linear layer qualified; the run is plain bf16 (see training.float8_convert_small_gemms)")
    return report


__all__ = [
    "Float8Conversion",
    "Float8Unavailable",
    "apply_float8_training",
    "convert_to_float8",
    "float8_unavailable_reason",
    "high_precision_reason",
]
