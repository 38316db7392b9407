"""LoRA: a frozen ``nn.Linear`` plus a trainable low-rank update, as a module you can see.

    y = base(x) + scaling * lora_b(lora_a(dropout(x))),   scaling = alpha / rank

``lora_a`` starts uniform in +-1/sqrt(in_features) (PEFT's and nn.Linear's default), ``lora_b`` at zero, so a
freshly adapted model computes exactly what the base model does. ``apply_lora`` swaps the named Linear
modules of a model (built on the meta device or not) for ``LoRALinear`` and freezes everything else.

Names: an adapted ``layers.0.attention.wq`` holds ``wq.base.weight`` (the frozen base, stored under the
base model's name ``wq.weight`` in HF checkpoints: see ``base_param_name``), ``wq.lora_a.weight`` [rank, in]
and ``wq.lora_b.weight`` [out, rank] (PEFT's ``lora_A`` / ``lora_B``).
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Iterable, Sequence

import torch
from torch import nn

_BASE_PARAM = re.compile(r"\.base\.(weight|bias)$")
_ADAPTER_PARAM = re.compile(r"(^|\.)lora_[ab]\.weight$")
# the module names apply_lora accepts (matched against the last segment of a module's path)
KNOWN_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "output")


def base_param_name(name: str) -> str:
    """``layers.0.attention.wq.base.weight`` -> ``layers.0.attention.wq.weight``; other names unchanged."""
    return _BASE_PARAM.sub(r".\1", name)


def is_adapter_param(name: str) -> bool:
    """Whether a parameter name is a LoRA adapter weight (absent from base-model checkpoints)."""
    return bool(_ADAPTER_PARAM.search(name))


class LoRALinear(nn.Module):
    """A frozen ``base`` Linear plus ``scaling * lora_b(lora_a(dropout(x)))``."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        self.base = base
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / rank
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_a = nn.Linear(base.in_features, rank, bias=False, **factory)
        self.lora_b = nn.Linear(rank, base.out_features, bias=False, **factory)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.base.requires_grad_(False)
        if base.weight.device.type != "meta":
            self.reset_lora_parameters()

    # The base's parameters under nn.Linear's names, so code that initializes `module.weight` keeps working.
    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @torch.no_grad()
    def reset_lora_parameters(self, generator: torch.Generator | None = None) -> None:
        bound = 1.0 / math.sqrt(self.base.in_features)
        self.lora_a.weight.uniform_(-bound, bound, generator=generator)
        self.lora_b.weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_b(self.lora_a(self.dropout(x))) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B @ A``: what merging adds to the base weight (differentiable)."""
        return (self.lora_b.weight @ self.lora_a.weight) * self.scaling

    def merged_weight(self) -> torch.Tensor:
        """The effective weight ``W + scaling * B @ A`` (differentiable in the adapters; no dropout)."""
        return self.base.weight + self.delta_weight()

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, scaling={self.scaling:g}"


def effective_weight(linear: nn.Module) -> torch.Tensor:
    """The weight a Linear or LoRALinear applies (merged for LoRA), e.g. for an ``output_fn`` head."""
    if isinstance(linear, LoRALinear):
        return linear.merged_weight()
    return linear.weight


def _split_target(name: str) -> tuple[str, str]:
    parent, _, leaf = name.rpartition(".")
    return parent, leaf


def apply_lora(
    model: nn.Module,
    *,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    targets: Sequence[str] = ("wq", "wk", "wv", "wo", "w1", "w2", "w3"),
) -> list[str]:
    """Replace every ``nn.Linear`` whose module name ends in one of ``targets`` by a ``LoRALinear``; freeze
    every other parameter. Returns the adapted module paths. Call before any parallelization."""
    unknown = sorted(set(targets) - set(KNOWN_TARGETS))
    if unknown:
        raise ValueError(f"lora.targets: unknown module name(s) {unknown}; choose from {list(KNOWN_TARGETS)}")
    if not targets:
        raise ValueError("lora.targets is empty: name the modules to adapt, e.g. ['wq', 'wv']")
    args = getattr(model, "args", None)
    if "output" in targets and getattr(args, "tie_embeddings", False):
        raise ValueError(
            "lora.targets has 'output' but the model ties its output head to the embedding; "
            "drop 'output' from lora.targets"
        )
    model.requires_grad_(False)
    chosen = [
        name for name, module in model.named_modules()
        if type(module) is nn.Linear and _split_target(name)[1] in targets
    ]
    if not chosen:
        raise ValueError(f"lora.targets {list(targets)} matched no nn.Linear module of {type(model).__name__}")
    for name in chosen:
        parent_name, leaf = _split_target(name)
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, LoRALinear(getattr(parent, leaf), rank, alpha, dropout))
    return chosen


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Adapted modules by path, wrapper segments (compile, activation checkpointing) removed."""
    from posttrain.models.sharded_load import canonical_name

    return {
        canonical_name(name): module
        for name, module in model.named_modules()
        if isinstance(module, LoRALinear)
    }


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


@torch.no_grad()
def init_lora_adapters(model: nn.Module, seed: int) -> None:
    """Initialize every adapter of a materialized (possibly sharded) model: ``lora_a`` uniform, ``lora_b`` 0.

    Each adapter's ``lora_a`` is drawn in full on the CPU from ``seed`` and its module path, and each rank
    copies its own slice, so the values do not depend on the parallel layout.
    """
    from posttrain.models.sharded_load import local_shard

    for name, module in lora_modules(model).items():
        a = module.lora_a.weight
        full = torch.empty(a.shape, dtype=torch.float32)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        bound = 1.0 / math.sqrt(module.in_features)
        full.uniform_(-bound, bound, generator=generator)
        local, slices = local_shard(a)
        local.copy_(full[slices])
        local_b, _ = local_shard(module.lora_b.weight)
        local_b.zero_()


def adapter_parameters(model: nn.Module) -> Iterable[tuple[str, nn.Parameter]]:
    return ((n, p) for n, p in model.named_parameters() if is_adapter_param(n))
