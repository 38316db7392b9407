"""Reward-model training: a scalar value head scored at each answer's last token, Bradley-Terry loss over pairs.

The model is built with `model.head = "value"` (set here when the config leaves it at "lm"): a
`Linear(dim, 1)` attached as `model.score` before parallelizing (see `posttrain/models/common/heads.py`), so
FSDP shards it with the root module and it runs inside the forward through `output_fn`. Data are the DPO
pairs (`posttrain.datasets.preference`): one forward scores the chosen and the rejected answer of every
packed pair, read at each sequence's last token. Loss per pair: -log sigmoid(r_chosen - r_rejected).

Logged per pair: loss, reward_accuracy (ties count one half), reward_margin, chosen_score, rejected_score;
with data.eval_path the same on held-out pairs (eval_*) before training and at the end. With
`checkpoint.export_hf` the folder loads in transformers as `<Family>ForSequenceClassification` (`score.weight`,
num_labels 1), which reads the score at the last non-padding token, as training did.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch
from torch import nn

from posttrain.config import JobConfig
from posttrain.losses.preference import bradley_terry_loss
from posttrain.models.common.heads import head_output_fn
from posttrain.recipes.pairwise import build_preference_loader, evaluate_pairs
from posttrain.trainer import LossOutput, Trainer

logger = logging.getLogger("posttrain")


def pair_scores(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen scores, rejected scores), each `[pairs]` fp32, from one forward of the packed pairs."""
    scores = model(
        batch["input_ids"], position_ids=batch["position_ids"], document_ids=batch["document_ids"],
        output_fn=head_output_fn(model),
    )
    per_sequence = scores.reshape(-1).index_select(0, batch["sequence_ends"]).float()
    return per_sequence[0::2], per_sequence[1::2]


def reward_model_loss(model: nn.Module, batch: dict[str, torch.Tensor], n_global: torch.Tensor | None) -> LossOutput:
    chosen, rejected = pair_scores(model, batch)
    margin = (chosen - rejected).detach()
    metrics = {
        "reward_accuracy": ((margin > 0).float() + 0.5 * (margin == 0).float()).sum(),
        "reward_margin": margin.sum(),
        "chosen_score": chosen.detach().sum(),
        "rejected_score": rejected.detach().sum(),
    }
    n_pairs = torch.tensor(int(batch["n_targets"]), device=chosen.device)
    return LossOutput(loss_sum=bradley_terry_loss(chosen, rejected).sum(), n_targets=n_pairs, metrics=metrics)


def with_value_head(cfg: JobConfig) -> JobConfig:
    if cfg.model.head == "value":
        return cfg
    if cfg.model.head != "lm":
        raise SystemExit(f"the reward_model recipe trains a scalar head: set model.head = 'value' (got {cfg.model.head!r})")
    logger.info("reward_model: model.head set to 'value' (a scalar score head, model.score)")
    return replace(cfg, model=replace(cfg.model, head="value"))


def run(cfg: JobConfig) -> None:
    cfg = with_value_head(cfg)
    trainer = Trainer(cfg)
    trainer.set_data_loader(build_preference_loader(trainer, cfg.data.path))
    eval_loader = None
    if cfg.data.eval_path:
        eval_loader = build_preference_loader(trainer, cfg.data.eval_path, shuffle=False, field="data.eval_path")
    trainer.resume()
    if eval_loader is not None and trainer.step == 0:
        trainer.metrics.log(0, evaluate_pairs(trainer, eval_loader, reward_model_loss))
    trainer.fit(reward_model_loss)
    if eval_loader is not None:
        trainer.metrics.log(trainer.step, evaluate_pairs(trainer, eval_loader, reward_model_loss))
    if getattr(trainer.model.args, "pad_token_id", None) is None:  # HF's classifier finds the last token by it
        trainer.model.args.pad_token_id = trainer.tokenizer.pad_id
    trainer.export_hf()
    trainer.close()
