"""Sampling the next token from last-position logits: temperature, top-k, top-p, and the log-prob the trainer
recomputes (``log_softmax(logits / T)`` at the sampled token, before the filters).

Only tensor operations with fixed shapes and no host synchronisation, so that a decode step that samples can be
captured as a CUDA graph. A token is drawn by the exponential race (``argmax(p_i / E_i)``, ``E_i ~ Exp(1)``),
which picks token i with probability p_i, as ``torch.multinomial`` would, without its host round trip.
"""

from __future__ import annotations

import torch

from posttrain.inference.engine import SamplingParams


def sample_next_tokens(
    logits: torch.Tensor, sampling: SamplingParams, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next token ids [B] and their log-probs [B] (fp32) from last-position logits [B, V]."""
    logits = logits.float()
    if sampling.temperature == 0:
        ids = logits.argmax(dim=-1)
        return ids, torch.log_softmax(logits, dim=-1).gather(1, ids[:, None]).squeeze(1)
    scaled = logits if sampling.temperature == 1 else logits / sampling.temperature  # x / 1 == x: skip the pass
    log_probs = torch.log_softmax(scaled, dim=-1)
    filtered = scaled
    if 0 < sampling.top_k < filtered.shape[-1]:
        kth = torch.topk(filtered, sampling.top_k, dim=-1).values[:, -1:]
        filtered = filtered.masked_fill(filtered < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = filtered.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass (the first always stays)
        drop_sorted = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= sampling.top_p
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        filtered = filtered.masked_fill(drop, float("-inf"))
    probs = log_probs.exp() if filtered is scaled else filtered.softmax(dim=-1)
    race = torch.empty_like(probs).exponential_(generator=generator)
    ids = (probs / race).argmax(dim=-1)
    return ids, log_probs.gather(1, ids[:, None]).squeeze(1)
