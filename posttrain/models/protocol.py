"""What posttrain asks of a model: the required surface, and the optional hooks with their defaults.

Required of every model (``common/transformer.py``'s ``Transformer`` has them all):
  ``args``                   its sizes (``vocab_size``, ``dim``, ``n_layers``, ``n_heads``, ``head_dim``,
                             ``tie_embeddings``, ...), a dataclass named by ``ModelSpec.args_cls``
  ``forward(input_ids, *, position_ids=None, document_ids=None, output_fn=None)``
                             logits ``[B, S, vocab_size]``, or ``output_fn(hidden, output_weight)``'s result
  ``init_weights(buffer_device=None)``

Optional hooks, declared by ``OptionalModelHooks``. The rest of posttrain reads them only through the
functions of this module, so each has one documented default; a model offers a hook by defining the method.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn


class OptionalModelHooks(Protocol):
    def moe_aux_loss(self) -> torch.Tensor | None:
        """The router's load-balancing loss of the last forward, already scaled by its coefficient
        (differentiable; the SFT loss adds it per target token). Default: None (no auxiliary loss)."""
        ...

    def moe_metrics(self) -> dict[str, torch.Tensor]:
        """Per-forward statistics logged like the loss (e.g. ``moe_load_imbalance``). Default: none."""
        ...

    def param_active_fraction(self, name: str) -> float:
        """The share of parameter ``name`` one token computes with (MoE experts: top_k / n_experts); MFU and
        the dry run count active parameters with it. Default: 1.0."""
        ...

    def mfu_unavailable_reason(self, seq_len: int) -> str | None:
        """Why the MFU formula would be wrong for this model at ``seq_len`` (then ``mfu`` is logged as null).
        Default: None (the formula applies)."""
        ...

    def init_buffers(self, buffer_device: torch.device | str | None) -> None:
        """Recompute non-persistent buffers (RoPE tables) after ``to_empty`` when weights are loaded instead
        of initialised. Default: nothing to do."""
        ...


def moe_aux_loss(model: nn.Module) -> torch.Tensor | None:
    hook = getattr(model, "moe_aux_loss", None)
    return hook() if hook is not None else None


def moe_metrics(model: nn.Module) -> dict[str, torch.Tensor]:
    hook = getattr(model, "moe_metrics", None)
    return hook() if hook is not None else {}


def param_active_fraction(model: nn.Module, name: str) -> float:
    hook = getattr(model, "param_active_fraction", None)
    return hook(name) if hook is not None else 1.0


def mfu_unavailable_reason(model: nn.Module, seq_len: int) -> str | None:
    hook = getattr(model, "mfu_unavailable_reason", None)
    return hook(seq_len) if hook is not None else None


def init_buffers(model: nn.Module, buffer_device: torch.device | str | None) -> None:
    hook = getattr(model, "init_buffers", None)
    if hook is not None:
        hook(buffer_device)
