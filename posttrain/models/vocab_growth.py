"""Vocabulary growth: tokens added by config (special markers, semantic IDs) get embedding / output rows.

The model is built with the grown vocabulary (still padded to a multiple of 64), the checkpoint's rows are
loaded into the first ``old_vocab`` rows (``load_hf_weights_sharded(..., checkpoint_vocab_size=old_vocab)``),
then ``init_new_vocab_rows`` sets rows ``old_vocab .. new_vocab`` to the mean of the checkpoint's rows, a
start that keeps the new tokens' logits near the average and the loss finite. The mean is streamed from the
safetensors in row blocks, so no rank holds the full matrix; each rank writes only its own shard's rows.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from posttrain.models.hf import resolve_hf_folder, safetensors_files
from posttrain.models.registry import ModelSpec
from posttrain.models.sharded_load import base_model_name, local_shard

_VOCAB_PARAMS = ("tok_embeddings.weight", "output.weight")
_ROWS_PER_READ = 8192


def grown_vocab_size(model_vocab: int, tokenizer_vocab: int, added_by_config: int) -> int | None:
    """The vocabulary to build, or None when the model's covers the tokenizer. Raises when the tokenizer is
    larger than the model for reasons other than tokens added by config (a tokenizer that is not the model's)."""
    if tokenizer_vocab <= model_vocab:
        return None
    if tokenizer_vocab - added_by_config > model_vocab:
        raise ValueError(
            f"the tokenizer has {tokenizer_vocab} tokens ({added_by_config} added by config) but the model's "
            f"vocabulary is {model_vocab}; use the model's own tokenizer (tokenizer.path) or a model with a "
            "larger vocabulary"
        )
    return tokenizer_vocab


def _checkpoint_row_mean(folder: Path, hf_name: str, rows: int) -> torch.Tensor:
    for file in safetensors_files(folder):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            if hf_name not in f.keys():
                continue
            sl = f.get_slice(hf_name)
            total = None
            for start in range(0, rows, _ROWS_PER_READ):
                block = sl[start : min(start + _ROWS_PER_READ, rows)].to(torch.float64).sum(0)
                total = block if total is None else total + block
            return (total / rows).to(torch.float32)
    raise KeyError(f"{hf_name} not found in {folder}")


@torch.no_grad()
def init_new_vocab_rows(
    model: nn.Module, hf_dir: str | os.PathLike[str], spec: ModelSpec, old_vocab: int, new_vocab: int
) -> None:
    """Set rows [old_vocab, new_vocab) of the embedding and (untied) output head to the mean of the
    checkpoint's first ``old_vocab`` rows. Every rank calls it; no collectives."""
    folder = resolve_hf_folder(hf_dir)
    for raw_name, param in model.named_parameters():  # a tied head appears once
        name = base_model_name(raw_name)
        if name not in _VOCAB_PARAMS:
            continue
        local, slices = local_shard(param)
        rows = slices[0]
        start, stop = max(rows.start, old_vocab), min(rows.stop, new_vocab)
        if start >= stop:
            continue
        mean = _checkpoint_row_mean(folder, spec.to_hf_name(name), old_vocab)[slices[1]]
        local[start - rows.start : stop - rows.start].copy_(mean.to(local.dtype).expand(stop - start, -1))
