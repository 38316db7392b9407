"""One decode step over the first ``n`` slots of a ``SlotKVCache``, entirely on the device.

Every slot carries its state in fixed device buffers (``SlotState``): the token to feed, its position, the tokens
and log-probs generated so far, its length budget and whether it is done. A step feeds each slot's token,
samples the next one, appends it, and marks a slot done at a stop token or at its budget. Done and free slots
run too (their outputs are discarded, their position stays put): the step has no branch that depends on the
data, so it never waits for the host and can be captured as a CUDA graph and replayed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from posttrain.inference.engine import SamplingParams
from posttrain.inference.sampling import sample_next_tokens
from posttrain.inference.slot_cache import SlotKVCache


@dataclass
class SlotState:
    """Per-slot decode state (``slots`` rows); ``out_tokens`` / ``out_log_probs`` hold ``max_new + 1`` columns
    (a done slot keeps writing one column past its last token, never over it)."""

    tokens: torch.Tensor  # [slots] long: the token fed at the next step
    positions: torch.Tensor  # [slots] long: its position
    out_tokens: torch.Tensor  # [slots, max_new + 1] long
    out_log_probs: torch.Tensor  # [slots, max_new + 1] fp32
    n_generated: torch.Tensor  # [slots] long
    budgets: torch.Tensor  # [slots] long: new tokens allowed
    done: torch.Tensor  # [slots] bool: finished, or no sequence in the slot
    stop_ids: torch.Tensor  # [n_stop] long, padded with -1

    @classmethod
    def empty(cls, slots: int, max_new: int, n_stop: int, device: torch.device) -> SlotState:
        long = dict(dtype=torch.long, device=device)
        return cls(
            tokens=torch.zeros(slots, **long),
            positions=torch.zeros(slots, **long),
            out_tokens=torch.zeros(slots, max_new + 1, **long),
            out_log_probs=torch.zeros(slots, max_new + 1, dtype=torch.float32, device=device),
            n_generated=torch.zeros(slots, **long),
            budgets=torch.zeros(slots, **long),
            done=torch.ones(slots, dtype=torch.bool, device=device),
            stop_ids=torch.full((n_stop,), -1, **long),
        )

    def is_stop(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids[:, None] == self.stop_ids[None, :]).any(dim=-1)

    def start(self, slots: torch.Tensor, first_ids: torch.Tensor, first_log_probs: torch.Tensor,
              prompt_lengths: torch.Tensor, budgets: torch.Tensor) -> None:
        """Begin new sequences in ``slots`` from their first sampled token (sampled from the prefill)."""
        self.tokens[slots] = first_ids
        self.positions[slots] = prompt_lengths
        self.out_tokens[slots, 0] = first_ids
        self.out_log_probs[slots, 0] = first_log_probs
        self.n_generated[slots] = 1
        self.budgets[slots] = budgets
        self.done[slots] = self.is_stop(first_ids) | (budgets <= 1)

    def move_rows(self, source_rows: torch.Tensor) -> None:
        """Rows ``source_rows`` become the first rows, in place; the rest become free."""
        n = source_rows.numel()
        for buf in (self.tokens, self.positions, self.out_tokens, self.out_log_probs, self.n_generated,
                    self.budgets, self.done):
            buf[:n] = buf.index_select(0, source_rows)
        self.free(torch.arange(n, self.done.numel(), device=self.done.device))

    def free(self, rows: torch.Tensor) -> None:
        """Mark ``rows`` free: done, feeding at position 0 (inside any attended length)."""
        self.done[rows] = True
        self.positions[rows] = 0


def decode_step(model: nn.Module, state: SlotState, cache: SlotKVCache, n: int, sampling: SamplingParams,
                generator: torch.Generator | None) -> None:
    """Advance slots ``0 .. n-1`` by one token (``cache`` is the cache of those rows, long enough for every
    position they feed)."""
    tokens, positions = state.tokens[:n], state.positions[:n]
    n_generated, done = state.n_generated[:n], state.done[:n]
    vocab_size = model.args.vocab_size
    logits = model(tokens[:, None], position_ids=positions[:, None], kv_cache=cache,
                   output_fn=lambda h, w: F.linear(h[:, -1], w[:vocab_size]))
    ids, log_probs = sample_next_tokens(logits, sampling, generator)
    live = ~done
    state.out_tokens[:n].scatter_(1, n_generated[:, None], ids[:, None])
    state.out_log_probs[:n].scatter_(1, n_generated[:, None], log_probs[:, None])
    grown = n_generated + live.long()
    done |= live & (state.is_stop(ids) | (grown >= state.budgets[:n]))
    n_generated.copy_(grown)
    tokens.copy_(torch.where(live, ids, tokens))
    positions.add_(live.long())
