"""Divergence guard: a step whose gradient norm is NaN / Inf is skipped; too many in a row stop the run.

The decision uses the global gradient norm, which is identical on every rank (it is reduced over all of
them), so all ranks skip or stop together without another collective. A NaN / Inf loss makes the gradients
non-finite too, so it is caught by the same test.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass


class DivergedError(SystemExit):
    """Raised when `max_consecutive` steps in a row were non-finite; its message names the step and the
    last good checkpoint, and it exits non-zero."""


@dataclass
class DivergenceGuard:
    max_consecutive: int  # 0 = no check at all
    skipped_steps: int = 0  # over the whole run (this process)
    consecutive: int = 0
    last_good_step: int = 0  # the last step whose update was applied

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
        return False

    def check_limit(self, step: int, last_good_checkpoint: Callable[[int], str | None]) -> None:
        """Stop the run once `max_consecutive` non-finite steps came in a row. `last_good_checkpoint(s)`, the
        newest checkpoint at or before step s, is asked only then."""
        if self.enabled and self.consecutive >= self.max_consecutive:
            where = last_good_checkpoint(self.last_good_step) or "none (no checkpoint was saved before the divergence)"
            raise DivergedError(
                f"training diverged: {self.consecutive} consecutive steps up to step {step} had a non-finite "
                f"loss or gradient (each was skipped; training.max_consecutive_bad_steps = {self.max_consecutive}). "
                f"Last good checkpoint: {where}. Lower optimizer.lr or training.max_grad_norm, check the data "
                "around this step, and restart from that checkpoint."
            )
