"""GRPO's math as pure tensor functions: group advantages, the clipped policy loss, KL estimators, penalties.

Shapes: a rollout batch has N = num_prompts * group_size completions, laid out group by group (completions
i * G .. i * G + G - 1 answer prompt i). Per-token tensors are `[B, S]` rows (a row may pack several
sequences); `mask` is true on the generated tokens the loss covers (prompt and padding positions false).

Formulas (r: rewards of one group, t: a token, A: advantage, rho_t = exp(logp_t - old_logp_t)):

- advantage (GRPO):     A_i = (r_i - mean(r)) / (std(r) + eps), std with Bessel's correction (as TRL / verl);
  Dr. GRPO (scale="none"): A_i = r_i - mean(r).
- policy loss per token: l_t = max(-A rho_t, -A clip(rho_t, 1 - clip_low, 1 + clip_high)) (PPO's pessimistic
  clipped surrogate with DAPO's separate "clip-higher" upper bound).
- truncated importance sampling (TIS, Yao et al. 2025, "Your efficient RL framework secretly brings you
  off-policy RL training"): when the completions were sampled by an inference engine whose log-probs
  `engine_logp` differ from the trainer's, each token's policy loss is weighted by
  w_t = min(exp(old_logp_t - engine_logp_t), tis_cap), detached. Convention: `old_logp` is always the
  trainer-side log-prob of the policy that generated the batch (recomputed by the trainer before the update;
  with a single update per batch and no recomputation, pass `logp.detach()`, which makes rho_t = 1 and leaves
  w_t as the whole correction).
- KL to the reference, k3 estimator (Schulman 2020): k3_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1 >= 0,
  unbiased for KL(pi || ref) under samples of pi; added to the loss as kl_coef * k3_t (not weighted by w_t).
- aggregation: "token_mean" sums l_t over all masked tokens and counts tokens; "sequence_mean" averages l_t
  over each sequence's masked tokens and sums those means, counting sequences (GRPO's original 1/|o_i|).
  The caller divides the global sum by the global count, so microbatches and ranks add up exactly.
- DAPO soft overlong punishment, with L = max_new_tokens and C = buffer: 0 for |y| <= L - C,
  ((L - C) - |y|) / C for L - C < |y| <= L, -1 beyond; times `penalty`.
"""

from __future__ import annotations

import torch
from torch import Tensor

AGGREGATIONS = ("token_mean", "sequence_mean")
ADVANTAGE_SCALES = ("std", "none")


def _groups(rewards: Tensor, group_size: int) -> Tensor:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 (GRPO compares completions of one prompt), got {group_size}")
    if rewards.numel() % group_size != 0:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    return rewards.float().view(-1, group_size)


def group_advantages(rewards: Tensor, group_size: int, *, scale: str = "std", eps: float = 1e-6) -> Tensor:
    """Group-relative advantages `[N]` for rewards `[N]` laid out group by group (see the module docstring).

    scale="std": (r - group mean) / (group std + eps) (GRPO); scale="none": r - group mean (Dr. GRPO).
    A group whose rewards are all equal gets advantage 0 everywhere under both.
    """
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"advantage scale {scale!r} is not one of {ADVANTAGE_SCALES}")
    groups = _groups(rewards, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale == "std":
        centred = centred / (groups.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)


def zero_variance_groups(rewards: Tensor, group_size: int) -> Tensor:
    """BoolTensor `[N // group_size]`: true where every completion of the group got the same reward
    (such a group has zero advantage and teaches nothing; DAPO's dynamic sampling filters them)."""
    groups = _groups(rewards, group_size)
    return groups.amax(dim=1) == groups.amin(dim=1)


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token k3 KL estimate exp(ref - logp) - (ref - logp) - 1 (>= 0; differentiable in both)."""
    log_ratio = ref_logp - logp
    return torch.exp(log_ratio) - log_ratio - 1.0


def _segments(mask: Tensor, sequence_ids: Tensor | None) -> tuple[Tensor, Tensor, int]:
    """(segment index per position [B*S], valid mask [B*S], number of segment slots).

    Without sequence_ids every row is one sequence. With them, a sequence is a maximal run of equal ids
    within a row (packing keeps each sequence contiguous); id -1 marks padding and is never a sequence.
    Computed without a host sync.
    """
    b, s = mask.shape
    if sequence_ids is None:
        seg = torch.arange(b, device=mask.device).repeat_interleave(s)
        return seg, mask.reshape(-1), b
    if sequence_ids.shape != mask.shape:
        raise ValueError(f"sequence_ids {tuple(sequence_ids.shape)} must have mask's shape {tuple(mask.shape)}")
    starts = torch.ones_like(sequence_ids, dtype=torch.bool)
    starts[:, 1:] = sequence_ids[:, 1:] != sequence_ids[:, :-1]
    seg = torch.cumsum(starts.reshape(-1).long(), 0) - 1
    valid = (mask & (sequence_ids >= 0)).reshape(-1)
    return seg, valid, b * s


def grpo_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    ref_logp: Tensor | None = None,
    kl_coef: float = 0.0,
    engine_logp: Tensor | None = None,
    tis_cap: float | None = None,
    agg: str = "token_mean",
    sequence_ids: Tensor | None = None,
    entropy: Tensor | None = None,
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """The GRPO loss of one micro-batch as `(loss_sum, n_units, stats)` (formulas: module docstring).

    Per-token inputs are `[B, S]`: `logp` (the current policy, differentiable), `old_logp`, optional
    `ref_logp` / `engine_logp` / `entropy` (no gradient flows through old, engine or entropy values);
    `advantages` is `[B, S]` (already broadcast per token) or `[B]` (one per row); `mask` selects the tokens
    the loss covers. `tis_cap` (the TIS truncation C, e.g. 2.0) is required with `engine_logp`.
    `kl_coef > 0` needs `ref_logp`; a `ref_logp` with kl_coef 0 is only measured. `sequence_ids` (only for
    agg="sequence_mean") identify sequences in packed rows, -1 for padding; without it each row is one sequence.

    Returns `loss_sum` (fp32, differentiable), `n_units` (masked tokens for token_mean, sequences with at least
    one masked token for sequence_mean; the trainer divides the global sum by the global count), and `stats`:
    detached fp32 SUMS over the masked tokens, to be divided by `stats["tokens"]`: `tokens`, `pg_loss`
    (the clipped policy term, TIS-weighted), `ratio`, `clip_low` (tokens with A < 0 and rho < 1 - clip_low,
    whose gradient the clip removes), `clip_high` (A > 0 and rho > 1 + clip_high), and when given `kl`,
    `tis_weight`, `tis_truncated` (tokens with the raw weight above the cap), `entropy`.
    """
    if agg not in AGGREGATIONS:
        raise ValueError(f"agg {agg!r} is not one of {AGGREGATIONS}")
    if logp.dim() != 2:
        raise ValueError(f"logp must be [B, S], got shape {tuple(logp.shape)}")
    for name, t in (("old_logp", old_logp), ("mask", mask), ("ref_logp", ref_logp), ("engine_logp", engine_logp),
                    ("entropy", entropy)):
        if t is not None and t.shape != logp.shape:
            raise ValueError(f"{name} {tuple(t.shape)} must have logp's shape {tuple(logp.shape)}")
    if kl_coef and ref_logp is None:
        raise ValueError("kl_coef > 0 needs ref_logp (the reference model's log-probs)")
    if engine_logp is not None and tis_cap is None:
        raise ValueError("engine_logp needs tis_cap (the truncated importance-sampling cap, e.g. 2.0)")
    if sequence_ids is not None and agg != "sequence_mean":
        raise ValueError("sequence_ids only apply to agg='sequence_mean'")
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    adv = advantages.float().expand_as(logp)
    mask = mask.bool()
    maskf = mask.float()
    logp = logp.float()
    old_logp = old_logp.float().detach()

    # log-ratios are zeroed off the mask first, so padding values (even inf) reach neither the loss nor a gradient
    ratio = torch.exp(torch.where(mask, logp - old_logp, 0.0))
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(-adv * ratio, -adv * clipped)
    stats: dict[str, Tensor] = {}
    if engine_logp is not None:
        raw_weight = torch.exp(torch.where(mask, old_logp - engine_logp.float().detach(), 0.0))
        weight = torch.clamp(raw_weight, max=tis_cap)
        per_token = per_token * weight
        stats["tis_weight"] = (weight * maskf).sum()
        stats["tis_truncated"] = ((raw_weight > tis_cap) & mask).sum().float()
    pg_token = per_token
    if ref_logp is not None:
        kl = kl_k3(logp, torch.where(mask, ref_logp.float().detach(), logp.detach()))
        if kl_coef:
            per_token = per_token + kl_coef * kl
        stats["kl"] = (kl.detach() * maskf).sum()

    with torch.no_grad():
        stats["tokens"] = maskf.sum()
        stats["pg_loss"] = (pg_token.detach() * maskf).sum()
        stats["ratio"] = (ratio.detach() * maskf).sum()
        stats["clip_low"] = ((adv < 0) & (ratio < 1.0 - clip_low) & mask).sum().float()
        stats["clip_high"] = ((adv > 0) & (ratio > 1.0 + clip_high) & mask).sum().float()
        if entropy is not None:
            stats["entropy"] = (entropy.detach().float() * maskf).sum()

    if agg == "token_mean":
        # where() rather than a product: an inf / NaN at a masked-out position must not leak into the sum
        loss_sum = torch.where(mask, per_token, 0.0).sum()
        return loss_sum, mask.sum(), stats
    seg, valid, n_slots = _segments(mask, sequence_ids)
    flat = torch.where(valid, per_token.reshape(-1), 0.0)
    sums = torch.zeros(n_slots, dtype=flat.dtype, device=flat.device).index_add(0, seg, flat)
    counts = torch.zeros(n_slots, dtype=flat.dtype, device=flat.device).index_add(0, seg, valid.float())
    loss_sum = (sums / counts.clamp(min=1.0)).sum()
    return loss_sum, (counts > 0).sum(), stats


def overlong_penalty(lengths: Tensor, max_new_tokens: int, buffer: int, penalty: float = 1.0) -> Tensor:
    """DAPO's soft overlong punishment `[N]` (<= 0, to add to the rewards) for completion lengths `[N]`.

    0 up to max_new_tokens - buffer tokens, then falling linearly to -penalty at max_new_tokens (and
    -penalty beyond it).
    """
    if not 0 < buffer <= max_new_tokens:
        raise ValueError(f"overlong buffer must be in [1, max_new_tokens={max_new_tokens}], got {buffer}")
    lengths = lengths.float()
    soft_start = max_new_tokens - buffer
    ramp = (soft_start - lengths) / buffer
    out = torch.where(lengths <= soft_start, torch.zeros_like(lengths), ramp.clamp(min=-1.0))
    return out * penalty


def kl_penalized_rewards(
    rewards: Tensor, logp: Tensor, ref_logp: Tensor, mask: Tensor, kl_coef: float, *, estimator: str = "k1"
) -> Tensor:
    """KL as a reward penalty: r_i - kl_coef * sum_t KL_t over completion i's masked tokens, `[N]`.

    `logp` / `ref_logp` / `mask` are `[N, T]` (one completion per row; `logp` is the sampling policy's, e.g.
    the old log-probs). estimator "k1": logp - ref_logp (the classic RLHF per-token penalty); "k3": kl_k3.
    Detached: a reward carries no gradient.
    """
    if estimator == "k1":
        kl = logp - ref_logp
    elif estimator == "k3":
        kl = kl_k3(logp, ref_logp)
    else:
        raise ValueError(f"KL estimator {estimator!r} is not one of ('k1', 'k3')")
    per_seq = torch.where(mask.bool(), kl.float(), 0.0).sum(dim=1)
    return (rewards.float() - kl_coef * per_seq).detach()
