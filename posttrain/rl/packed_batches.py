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

import array
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
    row carries, and with `sequence_targets` `n_targets` = the number of completions.

    Built as Python lists and converted once per key: per-completion tensor writes (six small torch calls per
    completion) took ~18 ms of host time per 256 completions, time the GPU waits for between minibatches."""
    # a row of padding only carries every key (zeros, as completion_batch's padding rows): the loss reads them
    present = [k for k in PER_TOKEN_KEYS if all(r.get(k) is not None for r in rows)]
    input_ids: list[int] = []
    labels: list[int] = []
    position_ids: list[int] = []
    document_ids: list[int] = []
    advantages: list[float] = []
    per_token: dict[str, list[float]] = {k: [] for k in present}
    for doc, r in enumerate(rows):
        prompt, response = r["prompt_ids"], r["token_ids"]
        n_in = len(prompt) + len(response) - 1
        if not response or len(input_ids) + n_in > row_len:
            raise ValueError(f"packed_batch: completion {doc} is empty or does not fit in {row_len} positions")
        input_ids += prompt
        input_ids += response[:-1]
        position_ids += range(n_in)
        document_ids += [doc] * n_in
        before = [-100] * (len(prompt) - 1)  # label j of the response sits at len(prompt) - 1 + j
        labels += before
        labels += response
        advantages += [0.0] * len(before)
        advantages += [float(r["advantage"])] * len(response)
        for k in present:
            if len(r[k]) != len(response):
                raise ValueError(f"packed_batch: completion {doc} has {len(r[k])} {k} values for {len(response)} tokens")
            per_token[k] += [0.0] * len(before)
            per_token[k] += r[k]
    pad = row_len - len(input_ids)
    input_ids += [pad_id] * pad
    labels += [-100] * pad
    position_ids += range(pad)
    document_ids += [-1] * pad
    advantages += [0.0] * pad
    batch = {
        "input_ids": _row(input_ids, "q"),
        "labels": _row(labels, "q"),
        "position_ids": _row(position_ids, "q"),
        "document_ids": _row(document_ids, "q"),
        "advantages": _row(advantages, "f"),
        **{k: _row(v + [0.0] * pad, "f") for k, v in per_token.items()},
    }
    if sequence_targets:
        batch["n_targets"] = torch.tensor(len(rows))
    return batch


def _row(values: list, typecode: str) -> torch.Tensor:
    """`[1, len(values)]` int64 ("q") or float32 ("f"): through an array's buffer, ~7x faster than torch.tensor on a
    16k-element list (the tensor keeps the array alive)."""
    return torch.frombuffer(array.array(typecode, values), dtype=torch.long if typecode == "q" else torch.float32)[None]


def packed_response_values(values: torch.Tensor, rows: list[dict[str, Any]]) -> list[list[float]]:
    """The inverse for per-token outputs `[1, row_len]` of `packed_batch(rows)`: each row's response values."""
    flat = values[0].tolist()  # one conversion, not one per row
    out, at = [], 0
    for r in rows:
        n_in = completion_positions(r)
        out.append(flat[at + len(r["prompt_ids"]) - 1 : at + n_in])
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
