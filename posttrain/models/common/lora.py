"""LoRA: a frozen ``nn.Linear`` plus a trainable low-rank update, as a module you can see.

    y = base(x) + scaling * lora_b(lora_a(dropout(x))),   scaling = alpha / rank

``lora_a`` starts uniform in +-1/sqrt(in_features) (PEFT's and nn.Linear's default), ``lora_b`` at zero, so a
freshly adapted model computes exactly what the base model does. ``apply_lora`` swaps the named Linear
modules of a model (built on the meta device or not) for ``LoRALinear`` and freezes everything else.

Names: an adapted ``layers.0.attention.wq`` holds ``wq.base.weight`` (the frozen base, stored under the
base model's name ``wq.weight`` in HF checkpoints: see ``base_param_name``), ``wq.lora_a.weight`` [rank, in]
and ``wq.lora_b.weight`` [out, rank] (PEFT's ``lora_A`` / ``lora_B``).

MoE experts (target ``experts``) hold their weights stacked, not as Linear modules. Each experts module names
its adapter slots (``lora_shapes``: ``gate_up`` and ``down``, HF's fused expert projections) and gets one
``ExpertLoRA`` per slot in ``experts.lora``: ``lora_a.weight`` [E, rank, in] and ``lora_b.weight``
[E, out, rank], expert e's output changing by ``scaling * B_e A_e x`` (computed inside the grouped expert
matmuls, ``ExpertGroups.lora``). The stacked base weights keep their names and stay frozen.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

_BASE_PARAM = re.compile(r"\.base\.(weight|bias)$")
_ADAPTER_PARAM = re.compile(r"(^|\.)lora_[ab]\.weight$")
# the module names apply_lora accepts (matched against the last segment of a module's path)
KNOWN_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "output", "experts")
# the stacked MoE experts: modules named ``experts`` that declare ``lora_shapes()`` (see ExpertLoRA)
EXPERTS_TARGET = "experts"


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


class StackedWeight(nn.Module):
    """One stacked parameter under a Linear-like name (``lora_a.weight``), so adapter names stay uniform."""

    def __init__(self, *shape: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))


class ExpertLoRA(nn.Module):
    """Per-expert low-rank adapters of one stacked expert projection: ``lora_a.weight`` [E, rank, in] and
    ``lora_b.weight`` [E, out, rank] (zero at init); expert e's output gains ``scaling * B_e A_e x``.

    The experts module applies it inside its grouped matmuls (``ExpertGroups.lora``); the update of the
    stacked weight, ``delta_weight`` [E, out, in], is what merging adds (in the owner's layout).
    """

    def __init__(
        self, n_experts: int, in_features: int, out_features: int, rank: int, alpha: float, *,
        device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        self.n_experts, self.in_features, self.out_features = n_experts, in_features, out_features
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / rank
        self.lora_a = StackedWeight(n_experts, rank, in_features, device=device, dtype=dtype)
        self.lora_b = StackedWeight(n_experts, out_features, rank, device=device, dtype=dtype)
        if self.lora_a.weight.device.type != "meta":
            self.reset_lora_parameters()

    @torch.no_grad()
    def reset_lora_parameters(self, generator: torch.Generator | None = None) -> None:
        bound = 1.0 / math.sqrt(self.in_features)
        self.lora_a.weight.uniform_(-bound, bound, generator=generator)
        self.lora_b.weight.zero_()

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B_e @ A_e`` for every expert, [E, out, in] (differentiable)."""
        return torch.bmm(self.lora_b.weight, self.lora_a.weight) * self.scaling

    def extra_repr(self) -> str:
        return f"n_experts={self.n_experts}, rank={self.rank}, alpha={self.alpha}, scaling={self.scaling:g}"


def _apply_expert_lora(model: nn.Module, rank: int, alpha: float) -> list[str]:
    """Give every experts module (named ``experts``, declaring ``lora_shapes``) its ``ExpertLoRA`` slots."""
    chosen = []
    for name, module in model.named_modules():
        if _split_target(name)[1] != EXPERTS_TARGET or not hasattr(module, "lora_shapes"):
            continue
        first = next(module.parameters())
        module.lora = nn.ModuleDict({
            slot: ExpertLoRA(module.n_experts, n_in, n_out, rank, alpha, device=first.device, dtype=first.dtype)
            for slot, (n_in, n_out) in module.lora_shapes().items()
        })
        chosen.append(name)
    if not chosen:
        raise ValueError(
            f"lora.targets has 'experts' but {type(model).__name__} has no stacked MoE experts "
            "(only the qwen3_moe and gpt_oss families have them)"
        )
    return chosen


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
    """Replace every ``nn.Linear`` whose module name ends in one of ``targets`` by a ``LoRALinear`` (and, for
    ``experts``, give the stacked MoE experts ``ExpertLoRA`` adapters); freeze every other parameter. Returns
    the adapted module paths. Call before any parallelization."""
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
    if EXPERTS_TARGET in targets and dropout > 0:
        raise ValueError(
            "lora.targets has 'experts', which supports no adapter dropout (PEFT's adapters on stacked expert "
            "parameters have none either); set lora.dropout = 0"
        )
    model.requires_grad_(False)
    linear_targets = set(targets) - {EXPERTS_TARGET}
    chosen = [
        name for name, module in model.named_modules()
        if type(module) is nn.Linear and _split_target(name)[1] in linear_targets
    ]
    if linear_targets and not chosen:
        raise ValueError(f"lora.targets {list(targets)} matched no nn.Linear module of {type(model).__name__}")
    for name in chosen:
        parent_name, leaf = _split_target(name)
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, LoRALinear(getattr(parent, leaf), rank, alpha, dropout))
    if EXPERTS_TARGET in targets:
        chosen += _apply_expert_lora(model, rank, alpha)
    return chosen


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Adapted modules by path, wrapper segments (compile, activation checkpointing) removed."""
    from posttrain.models.sharded_load import canonical_name

    return {
        canonical_name(name): module
        for name, module in model.named_modules()
        if isinstance(module, LoRALinear)
    }


def expert_lora_modules(model: nn.Module) -> dict[str, ExpertLoRA]:
    """Expert adapters by path (``layers.0.feed_forward.experts.lora.gate_up``), wrapper segments removed."""
    from posttrain.models.sharded_load import canonical_name

    return {
        canonical_name(name): module
        for name, module in model.named_modules()
        if isinstance(module, ExpertLoRA)
    }


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, (LoRALinear, ExpertLoRA)) for m in model.modules())


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") and hasattr(t, "device_mesh") else t


def expert_lora_update(experts: nn.Module, param_name: str) -> torch.Tensor | None:
    """What merging adds to the experts module's stacked parameter ``param_name`` (full, fp32, in that
    parameter's layout), or None when no adapter touches it. Gathers sharded adapters: under FSDP every rank
    must call it, in the same order."""
    adapters = getattr(experts, "lora", None)
    if adapters is None:
        return None
    deltas = {}
    for slot, adapter in adapters.items():
        b = _full(adapter.lora_b.weight.detach()).float()
        a = _full(adapter.lora_a.weight.detach()).float()
        deltas[slot] = torch.bmm(b, a) * adapter.scaling
    return experts.lora_update(param_name, deltas)


@torch.no_grad()
def init_lora_adapters(model: nn.Module, seed: int) -> None:
    """Initialize every adapter of a materialized (possibly sharded) model: ``lora_a`` uniform, ``lora_b`` 0.

    Each adapter's ``lora_a`` is drawn in full on the CPU from ``seed`` and its module path, and each rank
    copies its own slice, so the values do not depend on the parallel layout.
    """
    from posttrain.models.sharded_load import local_shard

    adapters: dict[str, LoRALinear | ExpertLoRA] = {**lora_modules(model), **expert_lora_modules(model)}
    for name, module in adapters.items():
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


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """The model's LoRA adapters (linear and expert) contribute nothing inside the block (base + 0 * B A = base,
    exactly): the frozen base serves as the reference model without a second copy."""
    modules = [m for m in model.modules() if isinstance(m, (LoRALinear, ExpertLoRA))]
    saved = [m.scaling for m in modules]
    for m in modules:
        m.scaling = 0.0
    try:
        yield
    finally:
        for m, scaling in zip(modules, saved):
            m.scaling = scaling
