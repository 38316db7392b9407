"""Preference losses over per-sequence log-probabilities: the DPO family and the Bradley-Terry reward loss.

Every function here works on one value per *pair* (chosen vs rejected) and returns one loss per pair, so a
caller can sum them and divide by the global number of pairs.

DPO (Rafailov et al. 2023), with h = (log pi(y_c) - log ref(y_c)) - (log pi(y_r) - log ref(y_r)):
- ``sigmoid``: -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h). With label smoothing eps > 0
  this is conservative DPO (cDPO, Mitchell 2023): the labels are assumed flipped with probability eps.
- ``ipo`` (Azar et al. 2023): (h - 1 / (2 beta))^2, on the summed log-probs as in the paper.
- ``simpo`` (Meng et al. 2024): reference-free, length-normalized: h' = beta (log pi(y_c) / |y_c| -
  log pi(y_r) / |y_r|) - gamma, loss = -(1 - eps) log sigmoid(h') - eps log sigmoid(-h').

Implicit rewards (for metrics): beta (log pi - log ref) for sigmoid / ipo; beta log pi / |y| for simpo.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from posttrain.losses.impl import token_log_probs_for
from posttrain.losses.targets import find_target_index

__all__ = [
    "LOSS_TYPES",
    "PreferenceLoss",
    "bradley_terry_loss",
    "preference_loss",
    "sequence_log_probs",
    "sum_by_sequence",
]

LOSS_TYPES = ("sigmoid", "ipo", "simpo")


@dataclass
class PreferenceLoss:
    """Per-pair values, each `[n_pairs]`: the loss (differentiable) and detached implicit rewards."""

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor


def sum_by_sequence(values: Tensor, sequence_index: Tensor, n_sequences: int) -> Tensor:
    """`out[s] = sum(values[i] for i where sequence_index[i] == s)`, shape `[n_sequences]`, differentiable."""
    out = torch.zeros(n_sequences, dtype=values.dtype, device=values.device)
    return out.index_add(0, sequence_index, values)


def sequence_log_probs(
    hidden: Tensor,
    weight: Tensor,
    *,
    labels: Tensor,
    sequence_ids: Tensor,
    n_sequences: int,
    vocab_size: int,
    chunk_size: int = 0,
    ignore_index: int = -100,
    loss_impl: str = "fused",
    target_index: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Summed log-probs of each sequence's trained tokens and their count, both `[n_sequences]` (fp32).

    `hidden` `[..., D]` / `weight` `[padded_vocab, D]` as a model's `output_fn` receives them; `labels` and
    `sequence_ids` `[...]` (the sequence each position belongs to). Only labelled positions are projected,
    `chunk_size` at a time (0: auto), so the `[tokens, vocab]` logits never exist whole; `loss_impl` picks
    the fused log-probs (default) or the chunked ones (`posttrain.losses.impl`).
    `target_index`: the labelled positions made on the host with the batch (`datasets.preference.pack_pairs`, which
    also guarantees each belongs to a sequence); without it they are found and checked here, two waits for the device.
    """
    flat_labels = labels.reshape(-1)
    positions = find_target_index(flat_labels, ignore_index) if target_index is None else target_index
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)
    logps = token_log_probs_for(loss_impl)(h, weight, flat_labels.index_select(0, positions), vocab_size=vocab_size, chunk_size=chunk_size)
    seq = sequence_ids.reshape(-1).index_select(0, positions)
    if target_index is None and seq.numel() and int(seq.min()) < 0:
        raise ValueError("a labelled position has sequence id -1 (padding); the batch's sequence_ids are wrong")
    return sum_by_sequence(logps, seq, n_sequences), sum_by_sequence(torch.ones_like(logps), seq, n_sequences)


def preference_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor | None = None,
    reference_rejected_logps: Tensor | None = None,
    *,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
) -> PreferenceLoss:
    """The DPO-family loss per pair from summed sequence log-probs (all `[n_pairs]`, fp32).

    `reference_*` of None means a reference assigning log-prob 0 (reference-free DPO); `simpo` ignores the
    reference and needs `chosen_lengths` / `rejected_lengths` (trained tokens per sequence).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type {loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if loss_type == "simpo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("simpo needs chosen_lengths and rejected_lengths (trained tokens per sequence)")
        chosen_avg = policy_chosen_logps / chosen_lengths.clamp(min=1).to(policy_chosen_logps.dtype)
        rejected_avg = policy_rejected_logps / rejected_lengths.clamp(min=1).to(policy_rejected_logps.dtype)
        logits = beta * (chosen_avg - rejected_avg) - simpo_gamma
        losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
        return PreferenceLoss(losses, (beta * chosen_avg).detach(), (beta * rejected_avg).detach())

    chosen_ratio = policy_chosen_logps
    rejected_ratio = policy_rejected_logps
    if reference_chosen_logps is not None:
        chosen_ratio = chosen_ratio - reference_chosen_logps
    if reference_rejected_logps is not None:
        rejected_ratio = rejected_ratio - reference_rejected_logps
    h = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    else:  # ipo
        if label_smoothing:
            raise ValueError("label_smoothing applies to the sigmoid and simpo losses, not ipo")
        losses = (h - 1 / (2 * beta)) ** 2
    return PreferenceLoss(losses, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach())


def bradley_terry_loss(chosen_scores: Tensor, rejected_scores: Tensor) -> Tensor:
    """Per-pair -log sigmoid(r_chosen - r_rejected): the reward model's negative log-likelihood."""
    return -F.logsigmoid(chosen_scores - rejected_scores)
