"""Tensor-parallel plans: which PyTorch ``ParallelStyle`` each module of a family gets (Megatron-style, with
sequence parallelism). A family's ``ModelSpec.tp_plan`` names one of these; ``posttrain.parallelisms`` applies it.

The residual stream between blocks is sharded on the sequence dimension (``Shard(1)``): norms run on
their sequence shard (``SequenceParallel``), the input of attention / feed-forward is all-gathered, the
q/k/v and gate/up projections are column-sharded (each rank owns whole heads / a slice of the hidden
dimension), and the output / down projections are row-sharded and reduce-scattered back to ``Shard(1)``.
Attention infers its head count from the projection width (``view(B, S, -1, head_dim)``), so it runs on
its local heads unchanged. The embedding is row-sharded over the vocabulary; the output head column-sharded
over the vocabulary, with logits gathered (``Replicate``) or left vocab-sharded for a loss-parallel
cross-entropy (``Shard(-1)``).

Qwen3's per-head q/k RMSNorm weights are replicated; their input is the local heads, so they are marked as
sharded on the head dimension (``SequenceParallel(sequence_dim=2)``) and their gradients are all-reduced
over the TP group by DTensor.

Every parameter must be covered by some style: after the plan is applied, a parameter it left out is named
in an error (a plain tensor among DTensors would fail much later, at the optimizer step).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch.nn as nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
)


@dataclass
class TPPlan:
    """``root``: styles for module paths of the whole model; ``block``: styles for paths inside each block."""

    root: dict[str, ParallelStyle] = field(default_factory=dict)
    block: dict[str, ParallelStyle] = field(default_factory=dict)


# ``tp_plan(model, *, loss_parallel=False) -> TPPlan``
TPPlanFn = Callable[..., TPPlan]


def dense_decoder_tp_plan(model: nn.Module, *, loss_parallel: bool = False) -> TPPlan:
    """The plan for the shared dense decoder (Llama 3, Qwen3): module names as in ``common/transformer.py``.

    ``loss_parallel``: ``model(input_ids)`` returns logits as a DTensor sharded over the vocabulary, for a
    cross-entropy under ``torch.distributed.tensor.parallel.loss_parallel()``; it needs an unpadded
    vocabulary (logits are sliced to vocab_size otherwise). The ``output_fn`` path is not affected: its
    function always receives full tensors.
    """
    args = getattr(model, "args", None)
    if loss_parallel and args is not None and args.padded_vocab_size != args.vocab_size:
        raise ValueError(
            f"parallelism.loss_parallel needs a vocabulary that is a multiple of 64 (logits would be sliced from "
            f"{args.padded_vocab_size} to {args.vocab_size} columns); set parallelism.loss_parallel=false"
        )
    root: dict[str, ParallelStyle] = {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "norm": SequenceParallel(),
        "output": ColwiseParallel(
            input_layouts=Shard(1),
            output_layouts=Shard(-1) if loss_parallel else Replicate(),
            use_local_output=not loss_parallel,
        ),
    }
    block: dict[str, ParallelStyle] = {
        "attention_norm": SequenceParallel(),
        # Attention.forward(x, cos, sin, mask): only x is gathered from its sequence shard
        "attention": PrepareModuleInput(
            input_layouts=(Shard(1), None, None, None),
            desired_input_layouts=(Replicate(), None, None, None),
            use_local_output=True,
        ),
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
        "ffn_norm": SequenceParallel(),
        "feed_forward": PrepareModuleInput(
            input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True
        ),
        "feed_forward.w1": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
        "feed_forward.w3": ColwiseParallel(),
    }
    first_block = next(iter(model.layers.children()))
    if getattr(first_block.attention, "q_norm", None) is not None:
        # input [B, S, local heads, head_dim]: sharded on the head dimension
        block["attention.q_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
        block["attention.k_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
    return TPPlan(root=root, block=block)
