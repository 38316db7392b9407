"""Completions -> packed trainer micro-batches: several completions back to back in one row of a fixed length.

`grpo.micro_batch_tokens = T` makes every forward of the old / reference log-prob passes and of the policy
update one row of exactly T positions (the shape never changes, so a compiled block compiles once). A
completion occupies `len(prompt) + len(response) - 1` positions laid out as in `batches.completion_batch`
(input `prompt + response[:-1]`, label j of the response at `len(prompt) - 1 + j`); each completion is its own
document: position ids restart at 0 and the document id counts up, so attention (causal AND same document,
as for packed SFT rows) never crosses completions. The tail after the last completion is padding: document
id -1, labels -100, positions counting from 0 again (as `datasets/packing.py` lays out padding).

Which completions share a row: first-fit decreasing by length (fewest rows for the budget). A completion
with no response token (a `padding_row`) takes no space. The loss normalisation does not change: token-mean
counts labels, sequence-mean counts completions with a response token and `grpo_loss` separates them by
document id.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import torch

from posttrain.rl.batches import PER_TOKEN_KEYS, chunk, completion_batch, response_values


def completion_positions(row: dict[str, Any]) -> int:
    """Positions a completion takes in a packed row (0 for one with no response token)."""
    if not row["token_ids"]:
        return 0
    return len(row["prompt_ids"]) + len(row["token_ids"]) - 1


def pack_order(rows: list[dict[str, Any]], row_len: int) -> list[list[int]]:
    """Indices into `rows`, one list per packed row (first-fit decreasing; rows with no response are left out).
    A completion longer than `row_len` is refused naming the setting that bounds it."""
    sizes = [completion_positions(r) for r in rows]
    order = sorted((i for i, n in enumerate(sizes) if n > 0), key=lambda i: (-sizes[i], i))
    packs: list[list[int]] = []
    free: list[int] = []
    for i in order:
        if sizes[i] > row_len:
            raise ValueError(
                f"grpo.micro_batch_tokens ({row_len}) is shorter than a completion with its prompt ({sizes[i]} "
                f"positions: {len(rows[i]['prompt_ids'])} prompt + {len(rows[i]['token_ids'])} response tokens - 1); "
                "raise it to at least the longest prompt + grpo.max_new_tokens"
            )
        slot = next((p for p, room in enumerate(free) if room >= sizes[i]), None)
        if slot is None:
            packs.append([])
            free.append(row_len)
            slot = len(packs) - 1
        packs[slot].append(i)
        free[slot] -= sizes[i]
    return packs


def packed_batch(
    rows: list[dict[str, Any]], *, row_len: int, pad_id: int, sequence_targets: bool = False
) -> dict[str, torch.Tensor]:
    """One micro-batch `[1, row_len]` holding `rows` (each with a response token) back to back. Keys as
    `completion_batch`: input_ids, labels, position_ids, document_ids, advantages, the per-token values every
    row carries, and with `sequence_targets` `n_targets` = the number of completions."""
    input_ids = torch.full((row_len,), pad_id, dtype=torch.long)
    labels = torch.full((row_len,), -100, dtype=torch.long)
    position_ids = torch.zeros((row_len,), dtype=torch.long)
    document_ids = torch.full((row_len,), -1, dtype=torch.long)
    advantages = torch.zeros((row_len,), dtype=torch.float32)
    # a row of padding only carries every key (zeros, as completion_batch's padding rows): the loss reads them
    present = [k for k in PER_TOKEN_KEYS if all(r.get(k) is not None for r in rows)]
    per_token = {k: torch.zeros((row_len,), dtype=torch.float32) for k in present}
    at = 0
    for doc, r in enumerate(rows):
        ids = list(r["prompt_ids"]) + list(r["token_ids"])
        n_in = len(ids) - 1
        if not r["token_ids"] or at + n_in > row_len:
            raise ValueError(f"packed_batch: completion {doc} is empty or does not fit in {row_len} positions")
        input_ids[at : at + n_in] = torch.tensor(ids[:-1], dtype=torch.long)
        position_ids[at : at + n_in] = torch.arange(n_in)
        document_ids[at : at + n_in] = doc
        resp = slice(at + len(r["prompt_ids"]) - 1, at + n_in)
        labels[resp] = torch.tensor(r["token_ids"], dtype=torch.long)
        advantages[resp] = float(r["advantage"])
        for k in present:
            per_token[k][resp] = torch.tensor(r[k], dtype=torch.float32)
        at += n_in
    position_ids[at:] = torch.arange(row_len - at)
    batch = {
        "input_ids": input_ids[None],
        "labels": labels[None],
        "position_ids": position_ids[None],
        "document_ids": document_ids[None],
        "advantages": advantages[None],
        **{k: v[None] for k, v in per_token.items()},
    }
    if sequence_targets:
        batch["n_targets"] = torch.tensor(len(rows))
    return batch


def packed_response_values(values: torch.Tensor, rows: list[dict[str, Any]]) -> list[list[float]]:
    """The inverse for per-token outputs `[1, row_len]` of `packed_batch(rows)`: each row's response values."""
    out, at = [], 0
    for r in rows:
        n_in = completion_positions(r)
        out.append(values[0, at + len(r["prompt_ids"]) - 1 : at + n_in].tolist())
        at += n_in
    return out


def micro_batches(
    rows: list[dict[str, Any]],
    *,
    micro_rows: int,
    micro_tokens: int,
    pad_id: int,
    sequence_targets: bool = False,
    forwards_over_ranks: Callable[[int], int] = lambda n: n,
) -> Iterator[tuple[list[int], dict[str, torch.Tensor], Callable[[torch.Tensor], list[list[float]]]]]:
    """The forwards over `rows`: `(indices into rows, CPU batch, per-token [B, S] -> per-row response lists)`.

    `micro_tokens > 0`: packed rows of that many positions, as many forwards as `forwards_over_ranks(n)` (the
    most any data-parallel rank needs; the extra ones hold only padding). Otherwise one completion per row,
    right-padded, `micro_rows` rows per forward (0: all in one), as `completion_batch` lays them out; the
    caller already gave every rank as many rows (`split_evenly`)."""
    if micro_tokens <= 0:
        start = 0
        for piece in chunk(rows, micro_rows):
            yield (list(range(start, start + len(piece))),
                   completion_batch(piece, pad_id=pad_id, sequence_targets=sequence_targets),
                   partial(response_values, rows=piece))
            start += len(piece)
        return
    packs = pack_order(rows, micro_tokens)
    packs += [[] for _ in range(forwards_over_ranks(len(packs)) - len(packs))]
    for indices in packs:
        piece = [rows[i] for i in indices]
        yield (indices, packed_batch(piece, row_len=micro_tokens, pad_id=pad_id, sequence_targets=sequence_targets),
               partial(packed_response_values, rows=piece))
