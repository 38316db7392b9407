"""Reading torch.save'd checkpoint state without running code from it.

Every `torch.load` of a checkpoint uses `weights_only=True`: tensors, containers and plain values load; any
other pickled object (a payload someone slipped into `rank_0.pt`) is refused. The one exception is NumPy's
generator state (`np.random.get_state()`: an array of uint32), whose few reconstruction types are
allow-listed here. DCP's own `.metadata` is still read with pickle by PyTorch: checkpoint folders are
trusted input (see the README's security note).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch


def _numpy_rng_types() -> list[Any]:
    try:
        import numpy as np
    except ImportError:
        return []
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:
        from numpy.core.multiarray import _reconstruct
    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds an object that weights-only loading refuses."""


def load_state_file(path: Path) -> Any:
    """`torch.load(path)` with weights_only=True (NumPy generator state allowed), onto the CPU."""
    allowed = _numpy_rng_types()
    with torch.serialization.safe_globals(allowed):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            allowed_names = {f"{t.__module__}.{t.__qualname__}" for t in allowed}
            unsafe = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path) if g not in allowed_names]
            what = ", ".join(unsafe) if unsafe else str(err).strip().splitlines()[0]
            raise UnsafeCheckpointError(
                f"{path} holds objects a weights-only load refuses ({what}); checkpoint state must be "
                "tensors and plain values"
            ) from err
