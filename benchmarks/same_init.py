"""The same initial weights on both sides of bench_sft, and the loss check that this makes meaningful.

posttrain initialises out-projections with a depth-scaled std (0.02 / sqrt(2 L)), transformers with 0.02
everywhere. In pure bf16 an AdamW update of ~1e-5 is below half an ulp of a weight of magnitude 0.02 and rounds
away, so from their own inits the two sides learn at visibly different speeds although they compute the same
thing. bench_sft therefore takes posttrain's initial weights once, converts them with the project's own HF
export (`posttrain.rl.weight_sync.hf_weight_buckets`: save_hf's names, vocabulary padding dropped, a tied head
once, LoRA merged -- B is zero at init, so that is the base weight) and lets transformers' own checkpoint loader
turn them into its in-memory layout (e.g. the fused experts of Qwen3-MoE in transformers 5). Every HF peer then
loads that state dict, strictly, right after `from_config`.

With the same weights and data, the first-step loss of every run differs only by rounding, and the losses after
the same number of steps stay close. The tolerances are relative, for bf16 (they hold more easily in fp32):

* first step: FIRST_LOSS_RTOL = 0.1%. Both sides evaluate the same function of the same bf16 weights; they differ
  only in the order and rounding of bf16 intermediates (unit roundoff 2^-8 = 0.39% per value). Round-to-nearest
  is unbiased and the loss is a mean over B x S token losses (8,192 at 4096 x 2), so the rounding mostly
  averages out (measured on the CPU in bf16, Qwen3 debug shape, 256 tokens: 7e-6 relative); 0.1% leaves a wide
  margin for the GPU's other kernels (flash / cuDNN attention, fused and Liger cross-entropy). At random init the
  first loss is close to ln(vocab) whatever the weights (different inits moved it by 0.01% at Qwen3-1.7B, 0.19%
  at Llama-3.1-8B on the H200, 0.25% on the CPU debug shape), so this checks the forward, not the init; the
  first-step gradient norms (in the JSON, no verdict) are far more sensitive.
* last step: LAST_LOSS_RTOL = 2%. AdamW's first updates are nearly sign(g) x lr on both sides, so the
  trajectories part only where rounding flips an update. With different inits the last loss differed by 14% and
  more, seven times this tolerance (H200, benchmarks/results/2026-12-03_*, posttrain vs HF + Liger: Qwen3-1.7B
  9.32 vs 12.00 after 3 + 8 steps, Llama-3.2-1B seq 8192 10.25 vs 11.92 after 3 + 8, Llama-3.1-8B 6.01 vs 12.01
  after 2 + 6).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from posttrain.rl.weight_sync import hf_weight_buckets

FIRST_LOSS_RTOL = 1e-3
LAST_LOSS_RTOL = 2e-2


@dataclass
class InitialWeights:
    """posttrain's initial weights in the transformers model's own state-dict layout, on the CPU, taken once."""

    enabled: bool
    tensors: dict[str, torch.Tensor] | None = None
    source: str | None = None  # which posttrain model they came from
    error: str | None = None  # why they could not be taken (the peers then keep transformers' init)
    take_s: float | None = None

    def needed(self) -> bool:
        return self.enabled and self.tensors is None and self.error is None

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"enabled": self.enabled, "source": self.source, "error": self.error,
                               "take_s": self.take_s}
        if self.tensors is not None:
            out["tensors"] = len(self.tensors)
            out["gib"] = round(sum(t.numel() * t.element_size() for t in _unique(self.tensors)) / 2**30, 3)
        return out


def _unique(tensors: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Each storage once (a tied head shares the embedding's)."""
    seen: dict[int, torch.Tensor] = {}
    for t in tensors.values():
        seen.setdefault(t.untyped_storage().data_ptr(), t)
    return list(seen.values())


@torch.no_grad()
def take_initial_weights(model: nn.Module, hf_config: dict[str, Any], source: str, into: InitialWeights) -> None:
    """Copy ``model``'s weights to the CPU under transformers' names and layout, one tensor at a time (no second
    copy on the device), and keep them in ``into``. Call before the model's first step. A failure is recorded in
    ``into.error`` and printed (the peers then keep transformers' init); the caller's run goes on."""
    t0 = time.perf_counter()
    try:
        checkpoint = {name: t for bucket in hf_weight_buckets(model, device="cpu") for name, t in bucket}
        into.tensors = transformers_layout(checkpoint, hf_config)
    except Exception as err:  # noqa: BLE001 - a benchmark run must not die of its cross-check
        lines = str(err).strip().splitlines()
        into.error = f"{type(err).__name__}: {lines[0][:300] if lines else ''}"
        print(f"[same init] could not take posttrain's initial weights from {source}: {into.error}; the peers "
              "keep transformers' init", flush=True)
        return
    into.source = source
    into.take_s = round(time.perf_counter() - t0, 2)


def hf_model_class(hf_config: dict[str, Any]) -> type:
    import transformers

    name = (hf_config.get("architectures") or [None])[0]
    cls = getattr(transformers, name, None) if name else None
    if cls is None:
        raise ValueError(f"transformers {transformers.__version__} has no class {name!r} (config 'architectures')")
    return cls


def transformers_config(hf_config: dict[str, Any]):
    import transformers

    d = dict(hf_config)
    model_type = d.pop("model_type")
    d.pop("architectures", None)
    d["use_cache"] = False
    return transformers.AutoConfig.for_model(model_type, **d)


def transformers_layout(checkpoint: dict[str, torch.Tensor], hf_config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A checkpoint-format state dict (what save_hf writes) as the transformers model's own ``state_dict()``,
    through transformers' checkpoint loader on the CPU (tensors are shared, not copied, where no conversion
    applies). Raises when any key is missing, unexpected or of the wrong shape."""
    from transformers.utils import logging as hf_logging

    dtype = next(iter(checkpoint.values())).dtype
    progress = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model, info = hf_model_class(hf_config).from_pretrained(
            None, config=transformers_config(hf_config), state_dict=checkpoint, dtype=dtype, output_loading_info=True,
        )
    finally:
        if progress:
            hf_logging.enable_progress_bar()
    problems = {k: sorted(v) for k, v in info.items() if k != "error_msgs" and v}
    if problems or info.get("error_msgs"):
        raise KeyError(f"posttrain's HF export does not load into {type(model).__name__}: {problems} "
                       f"{info.get('error_msgs') or ''}".strip())
    return model.state_dict()


@torch.no_grad()
def load_initial_weights(model: nn.Module, weights: InitialWeights) -> None:
    """Copy the taken weights into a peer model built by ``from_config``; every key must match."""
    model.load_state_dict(weights.tensors, strict=True)


# --------------------------------------------------------------------------------------------- the check


def loss_agreement(ours: dict[str, Any], peer: dict[str, Any], *, comparable: str | None) -> dict[str, Any]:
    """posttrain run vs peer run: absolute and relative loss differences and whether they agree within the
    tolerances above. ``comparable``: None, or why the two do not compute the same thing (no verdict then)."""
    out: dict[str, Any] = {}
    # LoRA's gradient norm covers the adapters only
    for key in ("loss_first", "loss_last") + (() if ours.get("lora") else ("grad_norm_first",)):
        a, b = ours.get(key), peer.get(key)
        if a is not None and b is not None:
            out[f"{key}_abs_diff"] = abs(a - b)
            out[f"{key}_rel_diff"] = abs(a - b) / max(abs(b), 1e-12)
    why_not_last = None
    if ours.get("lora"):
        why_not_last = "LoRA trains adapters only"
    elif ours.get("steps_run") != peer.get("steps_run"):
        why_not_last = f"different step counts ({ours.get('steps_run')} vs {peer.get('steps_run')})"
    elif "loss_last_rel_diff" not in out:
        why_not_last = "no last loss"
    if comparable is not None:
        out["agree"] = None
        out["why_no_verdict"] = comparable
        return out
    if "loss_first_rel_diff" not in out:
        out["agree"] = None
        out["why_no_verdict"] = "no first loss"
        return out
    agree = out["loss_first_rel_diff"] <= FIRST_LOSS_RTOL
    if why_not_last is None:
        agree = agree and out["loss_last_rel_diff"] <= LAST_LOSS_RTOL
    else:
        out["last_not_compared"] = why_not_last
    out["agree"] = agree
    return out
