"""What the config adds to a freshly built model before it is parallelized, and how those parts are filled
after the base weights are loaded: a non-LM output head (``model.head``), LoRA adapters (``[lora]``) and
embedding rows for tokens added by config (``tokenizer.add_special_tokens`` / ``add_tokens_file``).

Order in ``build_training_model``: build on meta (with the grown vocabulary) -> ``add_config_modules``
(head, then LoRA, so FSDP / AC / compile see the final module tree) -> parallelize -> ``to_empty`` -> load
or init the base weights -> ``init_config_modules`` (new vocabulary rows, adapters, head).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from torch import nn

from posttrain.config import JobConfig
from posttrain.models.common.heads import attach_head, get_head, init_head
from posttrain.models.common.lora import apply_lora, has_lora, init_lora_adapters
from posttrain.models.registry import ModelSpec
from posttrain.models.vocab_growth import init_new_vocab_rows

logger = logging.getLogger("posttrain")


def read_tokens_file(path: str | os.PathLike[str]) -> list[str]:
    """Tokens to add, one per line (surrounding whitespace and blank lines ignored)."""
    file = Path(path)
    if not file.is_file():
        raise SystemExit(f"tokenizer.add_tokens_file: {file} is not a file (one token per line)")
    return [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]


def count_config_tokens(tokenizer_cfg) -> int:
    """How many tokens the ``[tokenizer]`` section lists for adding (an upper bound on those it added)."""
    n = len(tokenizer_cfg.add_special_tokens)
    if tokenizer_cfg.add_tokens_file:
        n += len(read_tokens_file(tokenizer_cfg.add_tokens_file))
    return n


def add_config_modules(model: nn.Module, cfg: JobConfig, *, tp_enabled: bool) -> None:
    """Attach the configured head and LoRA adapters to a model built on the meta device (not yet parallel).
    Under TP the family's plan is rewritten for the adapted modules (``parallelisms/lora_tp.py``)."""
    attach_head(model, cfg.model.head, num_labels=cfg.model.num_labels)
    lora = cfg.lora
    if lora.rank < 0:
        raise SystemExit(f"lora.rank must be 0 (off) or positive, got {lora.rank}")
    if lora.rank == 0:
        return
    if tp_enabled and (lora.dropout > 0 or "output" in lora.targets):
        raise SystemExit("with parallelism.tp > 1, LoRA needs lora.dropout = 0 and no 'output' in lora.targets")
    try:
        adapted = apply_lora(model, rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout, targets=lora.targets)
    except ValueError as err:
        raise SystemExit(str(err)) from err
    head = get_head(model)
    if head is not None:  # a new head must learn, whatever else is frozen
        head.requires_grad_(True)
    logger.info("LoRA rank %d alpha %g on %d modules (%s)", lora.rank, lora.alpha, len(adapted),
                ", ".join(sorted(lora.targets)))


def init_config_modules(
    model: nn.Module,
    cfg: JobConfig,
    *,
    hf_folder: Path | None,
    spec: ModelSpec,
    grown_from_vocab: int | None,
) -> None:
    """After the base weights are in place: mean-initialize added vocabulary rows (when loaded from a
    checkpoint; a random init already covers them), then initialize adapters and the head."""
    if grown_from_vocab is not None and hf_folder is not None:
        init_new_vocab_rows(model, hf_folder, spec, grown_from_vocab, model.args.vocab_size)
    if grown_from_vocab is not None and has_lora(model):
        logger.warning("LoRA freezes the embeddings: the %d added tokens keep their initial rows; fine-tune "
                       "fully (lora.rank = 0) to train them", model.args.vocab_size - grown_from_vocab)
    if has_lora(model):
        init_lora_adapters(model, seed=cfg.job.seed)
    init_head(model, seed=cfg.job.seed)
