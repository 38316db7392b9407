"""The trained positions of a batch, found on the host where the batch is made.

On the device, `(labels != ignore_index).nonzero()` waits for every queued kernel (its size is only known there),
stalling the step at the loss; the same index made with the CPU batch travels with it and costs nothing.
"""

from __future__ import annotations

from torch import Tensor


def find_target_index(labels: Tensor, ignore_index: int = -100) -> Tensor:
    """The flat positions (int64, ascending) of `labels` that are not `ignore_index`."""
    return (labels.reshape(-1) != ignore_index).nonzero().squeeze(1)
