"""The recipe: posttrain's SFT core with this package's loss, then a held-out evaluation of both heads,
written to <output_dir>/next_event_eval.json."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from posttrain.config import JobConfig
from posttrain.datasets.dataloader import build_sft_dataloader
from posttrain.evaluation.next_event import next_event_report, read_sequences
from posttrain.recipes.sft import build_loss_fn
from posttrain.trainer import Trainer


@torch.no_grad()
def category_accuracy(model: torch.nn.Module, sequences: list) -> float:
    correct = total = 0
    for seq in sequences:
        ids = torch.as_tensor(seq)[None]
        predicted = model.category_logits(ids)[0, :-1].argmax(-1)
        target = ids[0, 1:] // model.args.events_per_category
        correct += int((predicted == target).sum())
        total += target.numel()
    return correct / max(total, 1)


def run(cfg: JobConfig) -> None:
    trainer = Trainer(cfg)
    trainer.set_data_loader(build_sft_dataloader(
        cfg.data, trainer.tokenizer, seq_len=cfg.training.seq_len, micro_batch_size=trainer.micro_batch_size,
        dp_rank=trainer.dp_rank, dp_world_size=trainer.dp_degree, seed=cfg.job.seed,
        vocab_size=trainer.model_args.vocab_size,
    ))
    trainer.resume()
    trainer.fit(build_loss_fn(cfg))
    if cfg.data.eval_path and trainer.dist.is_main and trainer.dist.world_size == 1:
        model = trainer.model
        model.eval()
        held_out = read_sequences(cfg.data.eval_path)
        report = next_event_report(model, read_sequences(cfg.data.path), held_out)
        report["model"]["category_accuracy"] = category_accuracy(model, held_out)
        Path(cfg.job.output_dir, "next_event_eval.json").write_text(json.dumps(report, indent=1))
    trainer.close()
