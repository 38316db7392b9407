"""A two-head decoder over event IDs: head 1 is the usual next-event projection (tied to the embeddings),
head 2 a small linear classifier of the next event's category (event id // events_per_category)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from posttrain.models.common.transformer import Transformer, TransformerArgs
from posttrain.models.registry import ModelSpec


@dataclass
class TwoHeadArgs(TransformerArgs):
    events_per_category: int = 30
    n_categories: int = 10
    category_loss_weight: float = 0.5


class TwoHeadEventModel(Transformer):
    """`model(input_ids)` gives next-event logits like any posttrain model; `category_head` reads the same
    final hidden states (the loss calls it inside `output_fn`, where FSDP has gathered the weights)."""

    def __init__(self, args: TwoHeadArgs) -> None:
        super().__init__(args)
        self.category_head = nn.Linear(args.dim, args.n_categories)

    @torch.no_grad()
    def init_weights(self, buffer_device: torch.device | str | None = None) -> None:
        super().init_weights(buffer_device)
        nn.init.normal_(self.category_head.weight, std=self.args.init_std)
        nn.init.zeros_(self.category_head.bias)

    def category_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, S, n_categories]: the category of the event after each position."""
        return self.forward(input_ids, output_fn=lambda hidden, weight: self.category_head(hidden))


def _no_hf(*_: Any) -> Any:
    raise NotImplementedError("event_two_head has no Hugging Face counterpart; leave checkpoint.export_hf off")


MODEL_SPEC = ModelSpec(
    name="event_two_head",
    hf_model_types=(),
    args_cls=TwoHeadArgs,
    model_cls=TwoHeadEventModel,
    flavors={
        "debug": TwoHeadArgs(
            dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=320, ffn_dim=256, tie_embeddings=True,
            max_seq_len=512,
        ),
    },
    args_from_hf_config=_no_hf,
    hf_config_from_args=_no_hf,
    to_hf_name=lambda name: None,
    from_hf_name=lambda name: None,
    tp_plan=None,  # FSDP, AC and compile in the shared order; category_head has no tensor-parallel style
)
