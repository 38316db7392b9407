"""Training checkpoints: DCP save / load / resume with keep-last-k (see manager.py for the folder layout)."""

from posttrain.checkpoint.manager import CheckpointManager, Shared
from posttrain.checkpoint.model_state import ModelOptimizerState
from posttrain.checkpoint.rng import RNGState, rng_state, set_rng_state

__all__ = ["CheckpointManager", "ModelOptimizerState", "RNGState", "Shared", "rng_state", "set_rng_state"]
