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

`grpo.share_prompts` packs a prompt's completions (a GRPO group, or the part of it in this minibatch) after one
copy of the prompt (`shared_prompt_batch`): the completions attend to that copy and to themselves
(`models/common/shared_prompts.py`), so the prompt's positions are computed once per group and row instead of
once per completion; per completion the inputs, positions, labels and attended keys are the same as above.
"""

from __future__ import annotations

import array
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import torch

from posttrain.models.common.shared_prompts import shared_document_id
from posttrain.rl.batches import PER_TOKEN_KEYS, chunk, completion_batch, response_values


def completion_positions(row: dict[str, Any]) -> int:
    """Positions a completion takes in a packed row (0 for one with no response token)."""
    if not row["token_ids"]:
        return 0
    return len(row["prompt_ids"]) + len(row["token_ids"]) - 1


def _check_fits(row: dict[str, Any], row_len: int) -> None:
    """A completion longer than `row_len` is refused naming the setting that bounds it."""
    n = completion_positions(row)
    if n > row_len:
        raise ValueError(
            f"grpo.micro_batch_tokens ({row_len}) is shorter than a completion with its prompt ({n} "
            f"positions: {len(row['prompt_ids'])} prompt + {len(row['token_ids'])} response tokens - 1); "
            "raise it to at least the longest prompt + grpo.max_new_tokens"
        )


def _first_fit_decreasing(sizes: list[int], row_len: int) -> list[list[int]]:
    """Indices into `sizes` (each at most `row_len`, 0 left out), one list per row of `row_len`."""
    order = sorted((i for i, n in enumerate(sizes) if n > 0), key=lambda i: (-sizes[i], i))
    packs: list[list[int]] = []
    free: list[int] = []
    for i in order:
        slot = next((p for p, room in enumerate(free) if room >= sizes[i]), None)
        if slot is None:
            packs.append([])
            free.append(row_len)
            slot = len(packs) - 1
        packs[slot].append(i)
        free[slot] -= sizes[i]
    return packs


def pack_order(rows: list[dict[str, Any]], row_len: int) -> list[list[int]]:
    """Indices into `rows`, one list per packed row (first-fit decreasing; rows with no response are left out).
    A completion longer than `row_len` is refused naming the setting that bounds it."""
    for r in rows:
        _check_fits(r, row_len)
    return _first_fit_decreasing([completion_positions(r) for r in rows], row_len)


class _RowLists:
    """One packed row being built as Python lists, converted once per key at the end: per-completion tensor
    writes (six small torch calls per completion) took ~18 ms of host time per 256 completions, time the GPU
    waits for between minibatches."""

    def __init__(self, present: list[str]) -> None:
        self.present = present  # the per-token keys every completion carries
        self.input_ids: list[int] = []
        self.labels: list[int] = []
        self.position_ids: list[int] = []
        self.document_ids: list[int] = []
        self.advantages: list[float] = []
        self.per_token: dict[str, list[float]] = {k: [] for k in present}

    def add(self, tokens: list[int], start: int, doc: int, targets: list[int], advantage: float = 0.0,
            values: dict[str, list[float]] | None = None) -> None:
        """`tokens` at positions `start`, ... of document `doc`, with their labels, advantage and per-token
        values (zeros without)."""
        self.input_ids += tokens
        self.position_ids += range(start, start + len(tokens))
        self.document_ids += [doc] * len(tokens)
        self.labels += targets
        self.advantages += [advantage] * len(tokens)
        for k in self.present:
            self.per_token[k] += values[k] if values else [0.0] * len(tokens)

    def batch(self, row_len: int, pad_id: int, n_targets: int | None) -> dict[str, torch.Tensor]:
        """The row padded to `row_len` (document -1, labels -100, positions from 0) as `[1, row_len]` tensors."""
        pad = row_len - len(self.input_ids)
        self.add([pad_id] * pad, 0, -1, [-100] * pad)
        batch = {
            "input_ids": _row(self.input_ids, "q"),
            "labels": _row(self.labels, "q"),
            "position_ids": _row(self.position_ids, "q"),
            "document_ids": _row(self.document_ids, "q"),
            "advantages": _row(self.advantages, "f"),
            **{k: _row(v, "f") for k, v in self.per_token.items()},
        }
        if n_targets is not None:
            batch["n_targets"] = torch.tensor(n_targets)
        return batch


def _completion_values(r: dict[str, Any], present: list[str], where: str) -> dict[str, list[float]]:
    """A completion's per-token values, each list as long as its response."""
    for k in present:
        if len(r[k]) != len(r["token_ids"]):
            raise ValueError(f"{where} has {len(r[k])} {k} values for {len(r['token_ids'])} tokens")
    return {k: r[k] for k in present}


def packed_batch(
    rows: list[dict[str, Any]], *, row_len: int, pad_id: int, sequence_targets: bool = False
) -> dict[str, torch.Tensor]:
    """One micro-batch `[1, row_len]` holding `rows` (each with a response token) back to back. Keys as
    `completion_batch`: input_ids, labels, position_ids, document_ids, advantages, the per-token values every
    row carries, and with `sequence_targets` `n_targets` = the number of completions."""
    # a row of padding only carries every key (zeros, as completion_batch's padding rows): the loss reads them
    row = _RowLists([k for k in PER_TOKEN_KEYS if all(r.get(k) is not None for r in rows)])
    for doc, r in enumerate(rows):
        prompt, response = r["prompt_ids"], r["token_ids"]
        if not response or len(row.input_ids) + len(prompt) + len(response) - 1 > row_len:
            raise ValueError(f"packed_batch: completion {doc} is empty or does not fit in {row_len} positions")
        values = _completion_values(r, row.present, f"packed_batch: completion {doc}")
        # label j of the response sits at len(prompt) - 1 + j
        row.add(prompt[:-1], 0, doc, [-100] * (len(prompt) - 1))
        row.add(prompt[-1:] + response[:-1], len(prompt) - 1, doc, list(response), float(r["advantage"]), values)
    return row.batch(row_len, pad_id, len(rows) if sequence_targets else None)


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


def prompt_groups(rows: list[dict[str, Any]]) -> list[list[int]]:
    """Indices of the rows with a response token, grouped by identical prompt (groups and members in order)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, r in enumerate(rows):
        if r["token_ids"]:
            groups.setdefault(tuple(r["prompt_ids"]), []).append(i)
    return list(groups.values())


def shared_pack_order(rows: list[dict[str, Any]], row_len: int) -> list[list[list[int]]]:
    """Per packed row, its prompt groups (indices into `rows` whose completions share one copy of their prompt),
    first-fit decreasing by a group's positions (its prompt less the last token, then each completion's last
    prompt token and response less the last token). A group too long for one row is split, longest completions
    first; each part brings its own copy of the prompt."""
    parts: list[list[int]] = []
    sizes: list[int] = []
    for group in prompt_groups(rows):
        shared = len(rows[group[0]]["prompt_ids"]) - 1
        first_part = len(parts)
        for i in sorted(group, key=lambda i: (-len(rows[i]["token_ids"]), i)):
            _check_fits(rows[i], row_len)
            n = len(rows[i]["token_ids"])
            if len(parts) > first_part and sizes[-1] + n <= row_len:
                parts[-1].append(i)
                sizes[-1] += n
            else:
                parts.append([i])
                sizes.append(shared + n)
    for part in parts:
        part.sort()
    return [[parts[p] for p in pack] for pack in _first_fit_decreasing(sizes, row_len)]


def shared_prompt_batch(
    groups: list[list[dict[str, Any]]], *, row_len: int, pad_id: int, sequence_targets: bool = False
) -> tuple[dict[str, torch.Tensor], list[tuple[int, int]]]:
    """One micro-batch `[1, row_len]` holding `groups` (each: completions of one prompt, with a response token),
    and each completion's response span `(start, length)` in the row. Per group: `prompt[:-1]` once (document
    `shared_document_id(g, 0)`, positions 0..), then per completion `prompt[-1:] + response[:-1]` (document
    `(g, m)`, positions continuing the prompt's, labels the response), so a completion's inputs, positions and
    labels are those of `packed_batch` and attention (`document_mask_mod`: its prompt and itself) sees the same
    keys: the same log-probs, with the prompt computed once per group instead of once per completion."""
    rows = [r for group in groups for r in group]
    row = _RowLists([k for k in PER_TOKEN_KEYS if all(r.get(k) is not None for r in rows)])
    spans: list[tuple[int, int]] = []
    for g, group in enumerate(groups):
        prompt = group[0]["prompt_ids"]
        row.add(prompt[:-1], 0, shared_document_id(g, 0), [-100] * (len(prompt) - 1))
        for m, r in enumerate(group, start=1):
            response = r["token_ids"]
            if not response or r["prompt_ids"] != prompt:
                raise ValueError(f"shared_prompt_batch: group {g} member {m} has no response or another prompt")
            values = _completion_values(r, row.present, f"shared_prompt_batch: group {g} member {m}")
            spans.append((len(row.input_ids), len(response)))
            row.add(prompt[-1:] + response[:-1], len(prompt) - 1, shared_document_id(g, m), list(response),
                    float(r["advantage"]), values)
    if len(row.input_ids) > row_len:
        raise ValueError(f"shared_prompt_batch: {len(row.input_ids)} positions do not fit in {row_len}")
    return row.batch(row_len, pad_id, len(rows) if sequence_targets else None), spans


def values_at(values: torch.Tensor, spans: list[tuple[int, int]]) -> list[list[float]]:
    """Per-token outputs `[1, row_len]` of `shared_prompt_batch` -> each completion's response values."""
    flat = values[0].tolist()
    return [flat[start:start + n] for start, n in spans]


def micro_batches(
    rows: list[dict[str, Any]],
    *,
    micro_rows: int,
    micro_tokens: int,
    pad_id: int,
    sequence_targets: bool = False,
    share_prompts: bool = False,
    forwards_over_ranks: Callable[[int], int] = lambda n: n,
) -> Iterator[tuple[list[int], dict[str, torch.Tensor], Callable[[torch.Tensor], list[list[float]]]]]:
    """The forwards over `rows`: `(indices into rows, CPU batch, per-token [B, S] -> per-row response lists)`.

    `micro_tokens > 0`: packed rows of that many positions, as many forwards as `forwards_over_ranks(n)` (the
    most any data-parallel rank needs; the extra ones hold only padding), with `share_prompts` the completions of
    one prompt after one copy of it (`shared_prompt_batch`). Otherwise one completion per row,
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
    if share_prompts:
        shared = shared_pack_order(rows, micro_tokens)
        shared += [[] for _ in range(forwards_over_ranks(len(shared)) - len(shared))]
        for groups in shared:
            batch, spans = shared_prompt_batch([[rows[i] for i in g] for g in groups], row_len=micro_tokens,
                                               pad_id=pad_id, sequence_targets=sequence_targets)
            yield [i for g in groups for i in g], batch, partial(values_at, spans=spans)
        return
    packs = pack_order(rows, micro_tokens)
    packs += [[] for _ in range(forwards_over_ranks(len(packs)) - len(packs))]
    for indices in packs:
        piece = [rows[i] for i in indices]
        yield (indices, packed_batch(piece, row_len=micro_tokens, pad_id=pad_id, sequence_targets=sequence_targets),
               partial(packed_response_values, rows=piece))


def sliding_window_refusal(window: int, where: str) -> str:
    """Why a sliding-window model cannot share prompts: the window counts row positions (q - kv), so after a shared
    prompt it would also count the group's earlier completions and a completion would lose sight of its prompt."""
    return (f"grpo.share_prompts does not support sliding-window attention (sliding_window = {window} in {where}: "
            "the window would count the group's earlier completions); set grpo.share_prompts = false")
