"""Capture and restore every random number generator a training step may draw from.

Saved per rank (each rank's generators differ), so a resumed run draws the same dropout masks and
data-order decisions as the uninterrupted one.
"""

from __future__ import annotations

import random
from typing import Any

import torch

try:
    import numpy as np
except ImportError:  # numpy is optional for the generators themselves
    np = None


def rng_state() -> dict[str, Any]:
    """The state of Python's `random`, NumPy's global generator, torch's CPU generator and, when CUDA is
    available, every CUDA device's generator."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if np is not None:
        state["numpy"] = np.random.get_state()
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore generators from `rng_state()`'s dict. Keys it lacks are left alone; CUDA states are restored
    for as many devices as both the saved state and this machine have."""
    if "python" in state:
        random.setstate(state["python"])
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "numpy" in state and np is not None:
        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        for device, device_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(device_state, device)


class RNGState:
    """The generators as a checkpointable object: `state_dict()` captures, `load_state_dict()` restores.

    Put it in `CheckpointManager.save`'s state dict as a per-rank entry, e.g. `{"rng": RNGState()}`.
    """

    def state_dict(self) -> dict[str, Any]:
        return rng_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_rng_state(state)
