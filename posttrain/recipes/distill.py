"""Knowledge distillation: a frozen teacher's distributions over the vocabulary, matched by the student.

Data and labels are SFT's (packed chat / prompt-completion / text rows). Per micro-batch: the teacher runs
first under no_grad and returns its final hidden states (its `output_fn` is the identity, so its logits are
never built); then the student's forward ends in `chunked_distillation_loss`, which projects both models'
hidden states through their own heads a chunk of positions at a time. Loss per trained token:
`ce_weight * cross-entropy + (1 - ce_weight) * divergence` (forward KL, reverse KL or generalized JSD at
`distill.temperature`). Logged per trained token: `kl` (forward KL(teacher || student) at temperature 1, the
progress measure whatever the training divergence), `ce` and `divergence`.

The teacher is built by `build_training_model` from `distill.teacher_hf_path` (or teacher_name / teacher_flavor,
random init: for tests only), sharded like the student but on its own; it must share the student's
tokenizer, which is checked.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
from torch import nn

from posttrain.config import JobConfig
from posttrain.config.sections import DistillSection
from posttrain.datasets.dataloader import build_sft_dataloader
from posttrain.datasets.tokenizer import HFTokenizer
from posttrain.losses.distillation import chunked_distillation_loss
from posttrain.losses.fused_distillation import fused_distillation_loss
from posttrain.models.hf import resolve_hf_folder
from posttrain.trainer import LossOutput, Trainer, build_training_model

logger = logging.getLogger("posttrain")

_PROBE_TEXTS = ("The quick brown fox jumps over the lazy dog.", "What is 12 + 46? The answer is 58.", "naïve café 日本 🙂")


def check_same_tokenizer(student: HFTokenizer, teacher: HFTokenizer) -> None:
    """Raise SystemExit unless both tokenizers have one vocabulary (size, special ids, and a few encodings)."""
    problems = []
    if student.vocab_size != teacher.vocab_size:
        problems.append(f"vocabulary sizes {student.vocab_size} (student) vs {teacher.vocab_size} (teacher)")
    if student.eos_id != teacher.eos_id:
        problems.append(f"eos ids {student.eos_id} vs {teacher.eos_id}")
    for text in _PROBE_TEXTS:
        if student.encode(text) != teacher.encode(text):
            problems.append(f"{text!r} encodes to {student.encode(text)[:8]}... vs {teacher.encode(text)[:8]}...")
            break
    if problems:
        raise SystemExit(
            f"distillation needs the student and the teacher to share one tokenizer, but {student.path} and "
            f"{teacher.path} differ: {'; '.join(problems)}. Pick a teacher of the student's family (or set "
            "tokenizer.path to the teacher's tokenizer if the student's vocabulary matches it)"
        )


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()


def teacher_config(cfg: JobConfig) -> JobConfig:
    """The student's config with the teacher's model section (no activation checkpointing: it never backprops)."""
    d = cfg.distill
    if not (d.teacher_hf_path or d.teacher_name or d.teacher_flavor):
        raise SystemExit("distill needs a teacher: set distill.teacher_hf_path (or teacher_name / teacher_flavor)")
    model = replace(
        cfg.model, hf_path=d.teacher_hf_path, name=d.teacher_name or cfg.model.name,
        flavor=d.teacher_flavor or cfg.model.flavor,
    )
    return replace(cfg, model=model, activation_checkpoint=replace(cfg.activation_checkpoint, mode="none", offload_blocks=0))


def build_teacher(trainer: Trainer) -> nn.Module:
    cfg = teacher_config(trainer.cfg)
    if cfg.model.hf_path:
        folder = resolve_hf_folder(cfg.model.hf_path)
        if _has_tokenizer(folder):
            check_same_tokenizer(trainer.tokenizer, HFTokenizer(folder))
    else:
        logger.warning("the teacher %s/%s is randomly initialized (no distill.teacher_hf_path): for tests only",
                       cfg.model.name, cfg.model.flavor)
    teacher = build_training_model(
        cfg, parallel_dims=trainer.parallel_dims, device=trainer.device, mixed_precision=trainer.mixed_precision,
        tokenizer_vocab_size=trainer.tokenizer.vocab_size, frozen=True,
    )
    teacher.requires_grad_(False)
    teacher.eval()
    return teacher


def _full(weight: torch.Tensor) -> torch.Tensor:
    """The whole output weight (a sharded DTensor is gathered; the teacher's is small next to its logits)."""
    return weight.full_tensor() if hasattr(weight, "full_tensor") else weight


def distill_loss(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    n_global: torch.Tensor,
    *,
    teacher: nn.Module,
    distill: DistillSection,
    chunk_size: int,
    loss_impl: str = "fused",
) -> LossOutput:
    inputs = {"position_ids": batch["position_ids"], "document_ids": batch["document_ids"]}
    with torch.no_grad():
        teacher_hidden = teacher(batch["input_ids"], **inputs, output_fn=lambda hidden, weight: hidden)
        teacher_weight = _full(teacher.output.weight).detach()
    common = dict(
        teacher_hidden=teacher_hidden, teacher_weight=teacher_weight, labels=batch["labels"],
        vocab_size=min(model.args.vocab_size, teacher.args.vocab_size), kind=distill.kind,
        temperature=distill.temperature, jsd_beta=distill.jsd_beta, chunk_size=chunk_size,
    )
    if loss_impl == "fused":  # the two terms' gradients are made in forward, weighted by ce_weight
        output_fn = partial(fused_distillation_loss, ce_weight=distill.ce_weight,
                            target_index=batch.get("target_index"), **common)  # made with the batch: no sync
        loss, div, ce, kl, n_tokens = model(batch["input_ids"], **inputs, output_fn=output_fn)
    else:
        div, ce, kl, n_tokens = model(batch["input_ids"], **inputs, output_fn=partial(chunked_distillation_loss, **common))
        loss = distill.ce_weight * ce + (1 - distill.ce_weight) * div
    return LossOutput(loss_sum=loss, n_targets=n_tokens, metrics={"kl": kl, "ce": ce.detach(), "divergence": div.detach()})


def check_distill_config(d: DistillSection) -> None:
    if d.temperature <= 0:
        raise SystemExit(f"distill.temperature must be > 0, got {d.temperature}")
    if not 0.0 <= d.ce_weight <= 1.0:
        raise SystemExit(f"distill.ce_weight must be in [0, 1], got {d.ce_weight}")
    if d.kind == "jsd" and not 0.0 < d.jsd_beta < 1.0:
        raise SystemExit(f"distill.jsd_beta must be in (0, 1), got {d.jsd_beta}")


def run(cfg: JobConfig) -> None:
    check_distill_config(cfg.distill)
    trainer = Trainer(cfg)
    teacher = build_teacher(trainer)
    trainer.set_data_loader(build_sft_dataloader(
        cfg.data, trainer.tokenizer, seq_len=cfg.training.seq_len, micro_batch_size=trainer.micro_batch_size,
        dp_rank=trainer.dp_rank, dp_world_size=trainer.dp_degree, seed=cfg.job.seed,
    ))
    trainer.resume()
    trainer.fit(partial(distill_loss, teacher=teacher, distill=cfg.distill, chunk_size=cfg.training.loss_chunk_size,
                        loss_impl=cfg.training.loss_impl))
    trainer.export_hf()
    trainer.close()
