"""Losses: tensors in, tensors out."""

from posttrain.losses.cross_entropy import chunked_cross_entropy, token_log_probs

__all__ = ["chunked_cross_entropy", "token_log_probs"]
