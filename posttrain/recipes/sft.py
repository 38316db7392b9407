"""Supervised fine-tuning: packed chat / prompt-completion / text rows, cross-entropy on the trained tokens."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from posttrain.config import JobConfig
from posttrain.datasets.dataloader import build_sft_dataloader
from posttrain.losses import chunked_cross_entropy
from posttrain.trainer import LossOutput, Trainer


def sft_loss(model: nn.Module, batch: dict[str, torch.Tensor], n_global: torch.Tensor, *, chunk_size: int) -> LossOutput:
    """Sum of token cross-entropies over the micro-batch; the full [tokens, vocab] logits never exist."""
    output_fn = partial(
        chunked_cross_entropy, labels=batch["labels"], vocab_size=model.args.vocab_size, chunk_size=chunk_size
    )
    loss_sum, n_targets = model(
        batch["input_ids"],
        position_ids=batch["position_ids"],
        document_ids=batch["document_ids"],
        output_fn=output_fn,
    )
    return LossOutput(loss_sum=loss_sum, n_targets=n_targets)


def run(cfg: JobConfig) -> None:
    trainer = Trainer(cfg)
    trainer.data_loader = build_sft_dataloader(
        cfg.data,
        trainer.tokenizer,
        seq_len=cfg.training.seq_len,
        micro_batch_size=trainer.micro_batch_size,
        dp_rank=trainer.dp_rank,
        dp_world_size=trainer.dp_degree,
        seed=cfg.job.seed,
    )
    trainer.resume()
    trainer.fit(partial(sft_loss, chunk_size=cfg.training.loss_chunk_size))
    trainer.export_hf()
    trainer.close()
