"""AdamW with decoupled weight decay, and the warmup-then-decay learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.optim.lr_scheduler import LambdaLR

from posttrain.config.errors import ConfigError
from posttrain.parallelisms.grad_clip import get_total_grad_norm
from posttrain.triton_adamw import TritonAdamW, triton_adamw_available


def _no_decay(name: str, param: nn.Parameter) -> bool:
    # Norm weights, biases and other vectors are not decayed (the usual AdamW practice).
    return param.ndim < 2 or name.endswith(".bias")


def build_optimizer(model: nn.Module, cfg, device: torch.device) -> torch.optim.Optimizer:
    """`cfg` is the `[optimizer]` section. Only parameters that require grad are optimized (LoRA, frozen heads)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if _no_decay(name, param) else decay).append(param)
    if not decay and not no_decay:
        raise ValueError("no trainable parameters: every parameter has requires_grad=False")
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay, "decay": True},
        {"params": no_decay, "weight_decay": 0.0, "decay": False},
    ]
    kernel = adamw_kernel(cfg.fused, device, [p for g in groups for p in g["params"]])
    kwargs = {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2), "eps": cfg.eps}
    groups = [g for g in groups if g["params"]]
    if kernel == "triton":
        return TritonAdamW(groups, **kwargs)
    fused = kernel == "torch_fused"
    return torch.optim.AdamW(groups, fused=fused, foreach=None if fused else True, **kwargs)


def adamw_kernel(fused: str, device: torch.device, params: list[nn.Parameter]) -> str:
    """`optimizer.fused` -> "triton" (posttrain.triton_adamw: one launch per group), "torch_fused" or "foreach".
    auto: Triton on CUDA for plain (unsharded) parameters, torch's fused kernel for DTensors (FSDP / TP shards,
    not run through the Triton kernel on several GPUs here), foreach on CPU."""
    if fused == "triton":
        if not triton_adamw_available(device):
            raise ConfigError(f"optimizer.fused = \"triton\" needs a CUDA device and Triton installed (device: "
                              f"{device.type}); use auto", key="optimizer.fused")
        return "triton"
    if fused == "auto":
        if device.type != "cuda":
            return "foreach"
        sharded = any(isinstance(p, DTensor) for p in params)
        return "triton" if triton_adamw_available(device) and not sharded else "torch_fused"
    return {"true": "torch_fused", "false": "foreach"}[fused]


def total_grad_norm(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> torch.Tensor:
    """The 2-norm of `params`' gradients: from the optimizer's own tables where it has them (`TritonAdamW.grad_norm`,
    one launch per group), else `get_total_grad_norm`."""
    norm = optimizer.grad_norm(params) if isinstance(optimizer, TritonAdamW) else None
    return get_total_grad_norm(params) if norm is None else norm


def lr_multiplier(step: int, *, warmup_steps: int, total_steps: int, decay: str, min_lr_ratio: float) -> float:
    """Factor on the peak lr for optimizer step `step` (0-based): linear warmup, then decay to `min_lr_ratio`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if decay == "linear":
        shape = 1.0 - progress
    elif decay == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"lr_scheduler.decay: unknown decay {decay!r}")
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg, total_steps: int) -> LambdaLR:
    """`cfg` is the `[lr_scheduler]` section."""
    return LambdaLR(
        optimizer,
        lambda step: lr_multiplier(
            step,
            warmup_steps=cfg.warmup_steps,
            total_steps=total_steps,
            decay=cfg.decay,
            min_lr_ratio=cfg.min_lr_ratio,
        ),
    )


def apply_optimizer_config(optimizer: torch.optim.Optimizer, scheduler: LambdaLR, cfg) -> None:
    """After loading a checkpoint: the `[optimizer]` section `cfg` (peak lr, betas, eps, weight decay) replaces
    the saved hyper-parameters, the optimizer keeps this run's kernel (fused / foreach), and the lr follows this
    run's schedule from the resumed step on. With an unchanged config this reproduces the saved values exactly (the
    same `base_lr * multiplier(step)`)."""
    for group in optimizer.param_groups:
        # load_state_dict took the saved run's kernel flags: this run's optimizer keeps its own kernel
        group["fused"], group["foreach"] = optimizer.defaults.get("fused"), optimizer.defaults.get("foreach")
        group["initial_lr"] = cfg.lr
        group["betas"] = (cfg.beta1, cfg.beta2)
        group["eps"] = cfg.eps
        if group.get("decay", group["weight_decay"] != 0.0):  # the no-decay group (norms, biases) stays at 0
            group["weight_decay"] = cfg.weight_decay
    scheduler.base_lrs = [cfg.lr for _ in optimizer.param_groups]
    for group, base_lr, lr_lambda in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base_lr * lr_lambda(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
