"""Which implementation of the head losses a run uses (`training.loss_impl`).

* ``fused`` (default): gradients made chunk by chunk inside the forward (cross-entropy, distillation) or in one
  fused recompute (log-probs), one `[chunk, vocab]` buffer in the matmul dtype, the head's gradient in the
  weight's dtype (`fused_cross_entropy.py`, `fused_log_probs.py`, `fused_distillation.py`);
* ``chunked``: the earlier chunked path (fp32 chunk buffers and head-gradient accumulator; log-probs and
  distillation through per-chunk activation checkpointing), kept selectable to compare against.
"""

from __future__ import annotations

from collections.abc import Callable

from posttrain.losses.cross_entropy import chunked_cross_entropy, token_log_probs
from posttrain.losses.fused_cross_entropy import fused_linear_cross_entropy
from posttrain.losses.fused_log_probs import fused_token_log_probs

__all__ = ["LOSS_IMPLS", "cross_entropy_for", "token_log_probs_for"]

LOSS_IMPLS = ("fused", "chunked")


def _check(impl: str) -> None:
    if impl not in LOSS_IMPLS:
        raise ValueError(f"loss implementation {impl!r} is not one of {', '.join(LOSS_IMPLS)}")


def cross_entropy_for(impl: str) -> Callable:
    """`fn(hidden, weight, labels, *, vocab_size, chunk_size, ignore_index) -> (loss_sum, n_tokens)`."""
    _check(impl)
    return fused_linear_cross_entropy if impl == "fused" else chunked_cross_entropy


def token_log_probs_for(impl: str) -> Callable:
    """`fn(hidden, weight, target_ids, *, vocab_size, chunk_size, ignore_index, temperature) -> log-probs`."""
    _check(impl)
    return fused_token_log_probs if impl == "fused" else token_log_probs
