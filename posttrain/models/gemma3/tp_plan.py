"""Gemma 3's tensor-parallel plan: the dense-decoder plan plus the two extra (sandwich) norms per block."""

from __future__ import annotations

import torch.nn as nn
from torch.distributed.tensor.parallel import SequenceParallel

from posttrain.models.common.tp_plan import TPPlan, dense_decoder_tp_plan


def tp_plan(model: nn.Module, *, loss_parallel: bool = False) -> TPPlan:
    """The post-attention / post-ffn norms act on the row-parallel outputs, already reduce-scattered to the
    sequence shard (``Shard(1)``): SequenceParallel like the pre-norms, handing back local tensors because
    their output joins the (local) residual stream directly. The embedding scale is a plain multiply."""
    plan = dense_decoder_tp_plan(model, loss_parallel=loss_parallel)
    plan.block["post_attention_norm"] = SequenceParallel(use_local_output=True)
    plan.block["post_ffn_norm"] = SequenceParallel(use_local_output=True)
    return plan
