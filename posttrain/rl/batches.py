"""Completions -> trainer micro-batches: one completion per row, right-padded, labels on the response only.

A row holds `prompt + response[:-1]` as input and `prompt[1:] + response` as targets, so the label at
position `len(prompt) - 1 + j` is response token j; per-token values (old / reference / engine log-probs)
and the completion's advantage sit at the same positions, everything else is -100 (labels) or 0.
Padding has document id -1 and real tokens 0, so the trainer runs plain causal attention.
"""

from __future__ import annotations

from typing import Any

import torch

# Per-token values a completion may carry (lists as long as its response), copied into [B, S] tensors.
PER_TOKEN_KEYS = ("old_logp", "ref_logp", "engine_logp")


def padding_row() -> dict[str, Any]:
    """A row with no response token: it keeps every data-parallel rank at the same number of forwards."""
    return {"prompt_ids": [0, 0], "token_ids": [], "advantage": 0.0}


def completion_batch(rows: list[dict[str, Any]], *, pad_id: int, sequence_targets: bool = False) -> dict[str, torch.Tensor]:
    """Tensors for one micro-batch. Each row: `prompt_ids`, `token_ids`, `advantage` (float) and optionally
    the per-token lists of `PER_TOKEN_KEYS`. With `sequence_targets` the batch's `n_targets` is its number
    of completions with a response token (the unit of a sequence-mean loss); otherwise the trainer counts labels."""
    length = max(len(r["prompt_ids"]) + len(r["token_ids"]) - 1 for r in rows)
    b = len(rows)
    input_ids = torch.full((b, length), pad_id, dtype=torch.long)
    labels = torch.full((b, length), -100, dtype=torch.long)
    document_ids = torch.full((b, length), -1, dtype=torch.long)
    advantages = torch.zeros((b, length), dtype=torch.float32)
    present = [k for k in PER_TOKEN_KEYS if all(r.get(k) is not None for r in rows if r["token_ids"])]
    per_token = {k: torch.zeros((b, length), dtype=torch.float32) for k in present}
    n_sequences = 0
    for i, r in enumerate(rows):
        ids = list(r["prompt_ids"]) + list(r["token_ids"])
        n_in = len(ids) - 1
        input_ids[i, :n_in] = torch.tensor(ids[:-1], dtype=torch.long)
        document_ids[i, :n_in] = 0
        n_resp = len(r["token_ids"])
        if n_resp == 0:
            continue
        n_sequences += 1
        start = len(r["prompt_ids"]) - 1
        labels[i, start : start + n_resp] = torch.tensor(r["token_ids"], dtype=torch.long)
        advantages[i, start : start + n_resp] = float(r["advantage"])
        for k in present:
            per_token[k][i, start : start + n_resp] = torch.tensor(r[k], dtype=torch.float32)
    batch = {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": torch.arange(length).unsqueeze(0).expand(b, length).contiguous(),
        "document_ids": document_ids,
        "advantages": advantages,
        **per_token,
    }
    if sequence_targets:
        batch["n_targets"] = torch.tensor(n_sequences)
    return batch


def response_values(values: torch.Tensor, rows: list[dict[str, Any]]) -> list[list[float]]:
    """The inverse for per-token outputs: each row's values at its response positions, as lists."""
    out = []
    for i, r in enumerate(rows):
        start, n = len(r["prompt_ids"]) - 1, len(r["token_ids"])
        out.append(values[i, start : start + n].tolist())
    return out


def split_evenly(rows: list[dict[str, Any]], parts: int) -> list[list[dict[str, Any]]]:
    """`parts` lists of equal length (padding rows appended), row i going to part i % parts."""
    per_part = -(-len(rows) // parts) if rows else 1
    padded = rows + [padding_row() for _ in range(per_part * parts - len(rows))]
    return [padded[p::parts] for p in range(parts)]


def chunk(rows: list[Any], size: int) -> list[list[Any]]:
    """Consecutive pieces of at most `size` (size <= 0: one piece)."""
    if size <= 0:
        return [rows]
    return [rows[i : i + size] for i in range(0, len(rows), size)]
