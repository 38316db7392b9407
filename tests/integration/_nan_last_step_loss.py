"""A `training.loss` for tests: the SFT cross-entropy, made NaN on call `NAN_AT_CALL` (one call per step
with no gradient accumulation), so a chosen step is skipped as non-finite."""

from __future__ import annotations

from posttrain.recipes.sft import sft_loss

NAN_AT_CALL = 4
calls = 0


def loss(model, batch, n_global):
    global calls
    calls += 1
    out = sft_loss(model, batch, n_global, chunk_size=4096)
    if calls == NAN_AT_CALL:
        out.loss_sum = out.loss_sum * float("nan")
    return out
