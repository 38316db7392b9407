"""Model + optimizer(s) as one `torch.distributed.checkpoint` Stateful.

`get_state_dict` / `set_state_dict` name every parameter and optimizer state by its fully qualified name
and keep sharded (FSDP2) or tensor-parallel parameters as DTensors, so DCP stores global tensors plus their
shard layout. A checkpoint written under one layout (FSDP x2, TP, one process) therefore loads under
another: DCP reads the pieces each rank now owns.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)


class ModelOptimizerState:
    """Wraps a model and its optimizers for `dcp.save` / `dcp.load` (sharded state dicts, no gathering).

    `optimizers` may be one optimizer, several (e.g. one per parameter group kind) or none (weights only,
    e.g. to load a checkpoint's model into a module for export or evaluation).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizers: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] | None = None,
    ) -> None:
        self.model = model
        if optimizers is None:
            self.optimizers: list[torch.optim.Optimizer] = []
        elif isinstance(optimizers, torch.optim.Optimizer):
            self.optimizers = [optimizers]
        else:
            self.optimizers = list(optimizers)
        self.options = StateDictOptions(full_state_dict=False)

    def state_dict(self) -> dict[str, Any]:
        if not self.optimizers:
            return {"model": get_model_state_dict(self.model, options=self.options)}
        model_sd, optim_sd = get_state_dict(self.model, self.optimizers, options=self.options)
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not self.optimizers:
            set_model_state_dict(self.model, state_dict["model"], options=self.options)
            return
        set_state_dict(
            self.model,
            self.optimizers,
            model_state_dict=state_dict["model"],
            optim_state_dict=state_dict["optim"],
            options=self.options,
        )
