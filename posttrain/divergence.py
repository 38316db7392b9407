"""Divergence guard: a step whose gradient norm is NaN / Inf is skipped; too many in a row stop the run.

The decision uses the global gradient norm, which is identical on every rank (it is reduced over all of
them), so all ranks skip or stop together without another collective. A NaN / Inf loss makes the gradients
non-finite too, so it is caught by the same test.

Two ways to feed it: `step_is_good(step, float(norm))` decides on the host (the trainer waits for the
device); or, when the optimizer can skip a step on the device by itself (fused AdamW's `found_inf`),
`record(step, norm_tensor)` keeps the norm without waiting and `resolve()` reads the recorded norms later (at
log or checkpoint time, or one step late), with the same counts and decisions; only a stop for too many bad
steps in a row comes one step later.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


class DivergedError(SystemExit):
    """Raised when `max_consecutive` steps in a row were non-finite; its message names the step and the
    last good checkpoint, and it exits non-zero."""


@dataclass
class DivergenceGuard:
    max_consecutive: int  # 0 = no check at all
    skipped_steps: int = 0  # over the whole run (this process)
    consecutive: int = 0
    last_good_step: int = 0  # the last step whose update was applied
    last_bad_step: int = 0
    pending: list = field(default_factory=list)  # (step, norm on the host or pinned, CUDA event or None), unread

    @property
    def enabled(self) -> bool:
        return self.max_consecutive > 0

    @property
    def in_bad_streak(self) -> bool:
        return self.consecutive > 0

    def step_is_good(self, step: int, grad_norm: float) -> bool:
        """Record step `step`'s (global) gradient norm; False means: skip this step's update."""
        if math.isfinite(grad_norm):
            self.consecutive = 0
            self.last_good_step = step
            return True
        self.skipped_steps += 1
        self.consecutive += 1
        self.last_bad_step = step
        return False

    def record(self, step: int, grad_norm: torch.Tensor) -> None:
        """Keep step `step`'s norm (the optimizer skipped the update itself if it is non-finite) to be read by
        `resolve`. A CUDA norm is copied to pinned host memory behind an event: reading it later waits for that
        point of the stream only, not for the work queued after it."""
        value = grad_norm.detach().float().reshape(())
        event = None
        if value.is_cuda:
            host = torch.empty((), dtype=torch.float32, pin_memory=True)
            host.copy_(value, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            value = host
        self.pending.append((step, value, event))

    def resolve(self, up_to_step: int | None = None) -> list[tuple[int, float]]:
        """Read the recorded norms of steps <= `up_to_step` (all when None) and count them as `step_is_good`
        would have, in step order; returns the (step, norm) pairs that were non-finite."""
        bad = []
        while self.pending and (up_to_step is None or self.pending[0][0] <= up_to_step):
            step, value, event = self.pending.pop(0)
            if event is not None:
                event.synchronize()
            norm = float(value)
            if not self.step_is_good(step, norm):
                bad.append((step, norm))
        return bad

    def check_limit(self, step: int, last_good_checkpoint: Callable[[int], str | None]) -> None:
        """Stop the run once `max_consecutive` non-finite steps came in a row. `last_good_checkpoint(s)`, the
        newest checkpoint at or before step s, is asked only then."""
        if self.enabled and self.consecutive >= self.max_consecutive:
            where = last_good_checkpoint(self.last_good_step) or "none (no checkpoint was saved before the divergence)"
            raise DivergedError(
                f"training diverged: {self.consecutive} consecutive steps up to step {self.last_bad_step} had a non-finite "
                f"loss or gradient (each was skipped; training.max_consecutive_bad_steps = {self.max_consecutive}). "
                f"Last good checkpoint: {where}. Lower optimizer.lr or training.max_grad_norm, check the data "
                "around this step, and restart from that checkpoint."
            )
