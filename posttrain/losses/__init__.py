"""Losses: tensors in, tensors out."""

from posttrain.losses.cross_entropy import chunked_cross_entropy, token_log_probs
from posttrain.losses.fused_cross_entropy import fused_linear_cross_entropy
from posttrain.losses.fused_distillation import fused_distillation_loss
from posttrain.losses.fused_log_probs import fused_token_log_probs
from posttrain.losses.impl import LOSS_IMPLS, cross_entropy_for, token_log_probs_for
from posttrain.losses.targets import find_target_index

__all__ = [
    "LOSS_IMPLS",
    "chunked_cross_entropy",
    "cross_entropy_for",
    "fused_distillation_loss",
    "fused_linear_cross_entropy",
    "fused_token_log_probs",
    "find_target_index",
    "token_log_probs",
    "token_log_probs_for",
]
