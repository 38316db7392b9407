"""Preference pairs (prompt / chosen / rejected) tokenized and packed so one forward scores both answers.

Row formats (one JSON object per row):
- conversational: ``prompt`` is a list of messages, ``chosen`` / ``rejected`` lists of (assistant) messages
  that continue it (TRL's form). Rendered with the tokenizer's chat template; only the answers' assistant
  turns are trained (their end-of-turn token included).
- implicit prompt: ``chosen`` / ``rejected`` are whole conversations (lists of messages) with no ``prompt``;
  the assistant turns are trained (the shared ones cancel between chosen and rejected).
- text: ``prompt``, ``chosen``, ``rejected`` strings; the answer (and EOS) is trained.

Packing: each pair becomes two documents laid side by side, [chosen, rejected], and pairs fill `seq_len`
rows in order (a pair never spans two rows). A micro-batch is a dict of `[B, S]` LongTensors like the SFT
loader's (``input_ids``, ``labels``, ``position_ids``, ``document_ids``) plus:
- ``sequence_ids`` `[B, S]`: for every position, the index of its sequence in the micro-batch, 2k for pair
  k's chosen answer and 2k + 1 for its rejected one; -1 on padding. Per-sequence sums of token log-probs are
  ``index_add`` over it (see `posttrain.losses.preference.sum_by_sequence`);
- ``sequence_ends`` `[2P]`: the flat index (row * S + position) of each sequence's last token (the
  reward model's score is read there);
- ``pair_ids`` `[P]`: each pair's index in the dataset (for cached reference log-probs);
- ``n_targets`` (int): the number of pairs P, the unit the trainer averages DPO losses and metrics over.

The whole file is tokenized once up front (preference sets are small next to SFT corpora); every epoch
shuffles them with (seed, epoch); data-parallel rank r always owns pairs r, r + world, r + 2 world, ... (so
reference log-probs precomputed per rank stay valid) and the loader's state is (epoch, cursor): resuming
is exact.
"""

from __future__ import annotations

import logging

import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from posttrain.datasets.columns import rename_columns
from posttrain.datasets.errors import BadRowError, DataError
from posttrain.datasets.packing import IGNORE_INDEX, PAD_DOCUMENT_ID, document_labels
from posttrain.datasets.sources import bad_row_error, iter_file_rows, resolve_data_files
from posttrain.losses.targets import find_target_index

__all__ = [
    "PreferenceDataLoader",
    "PreferencePair",
    "load_preference_pairs",
    "pack_pairs",
    "take_pairs_for_rows",
    "tokenize_preference_row",
]

logger = logging.getLogger(__name__)


@dataclass
class PreferencePair:
    """One tokenized pair: ids and loss masks of the chosen and the rejected document."""

    chosen_ids: np.ndarray
    chosen_mask: np.ndarray
    rejected_ids: np.ndarray
    rejected_mask: np.ndarray
    index: int  # position in the dataset

    def __len__(self) -> int:
        return len(self.chosen_ids) + len(self.rejected_ids)


def _document(tokenizer: Any, prompt: Any, answer: Any, where: str, field: str) -> tuple[list[int], list[bool]]:
    if prompt is None:
        if not isinstance(answer, list):
            raise BadRowError(f"{where}: without a prompt, {field} must be a list of messages (a whole conversation)")
        return tokenizer.tokenize_messages(answer)
    if isinstance(prompt, str) != isinstance(answer, str):
        raise BadRowError(f"{where}: prompt and {field} must both be strings or both be lists of messages")
    if not isinstance(prompt, (str, list)):
        raise BadRowError(f"{where}: prompt must be a string or a list of messages, got {type(prompt).__name__}")
    return tokenizer.tokenize_prompt_completion(prompt, answer)


def tokenize_preference_row(row: dict[str, Any], tokenizer: Any, *, index: int, where: str) -> PreferencePair:
    """Tokenize one prompt / chosen / rejected row (see the module docstring for the formats)."""
    for field in ("chosen", "rejected"):
        if field not in row:
            raise BadRowError(f"{where}: a preference row needs 'chosen' and 'rejected' (and usually 'prompt')")
    prompt = row.get("prompt")
    try:
        c_ids, c_mask = _document(tokenizer, prompt, row["chosen"], where, "chosen")
        r_ids, r_mask = _document(tokenizer, prompt, row["rejected"], where, "rejected")
    except DataError:
        raise
    except Exception as e:  # the template or tokenizer refused the row
        raise BadRowError(f"{where}: the tokenizer could not render this row ({type(e).__name__}: {e})") from e
    return PreferencePair(
        np.asarray(c_ids, dtype=np.int64), np.asarray(c_mask, dtype=bool),
        np.asarray(r_ids, dtype=np.int64), np.asarray(r_mask, dtype=bool), index,
    )


def _fit(pair: PreferencePair, seq_len: int, overlong: str) -> PreferencePair | None:
    """The pair as it will be packed (both answers cut to seq_len // 2 when it is too long), or None."""
    if len(pair) <= seq_len:
        fitted = pair
    elif overlong == "drop":
        return None
    else:
        half = seq_len // 2
        fitted = PreferencePair(pair.chosen_ids[:half], pair.chosen_mask[:half], pair.rejected_ids[:half],
                                pair.rejected_mask[:half], pair.index)
    if not (fitted.chosen_mask[1:].any() and fitted.rejected_mask[1:].any()):
        return None  # an answer with no trained token has no log-prob to compare
    return fitted


def load_preference_pairs(
    path: str, tokenizer: Any, *, seq_len: int, overlong: str = "truncate", skip_bad_rows: bool = False,
    field: str = "data.path", max_row_bytes: int = 0, columns: Mapping[str, str] | None = None,
) -> tuple[list[PreferencePair], dict[str, int]]:
    """Read and tokenize every row of `path` (file / glob / folder; `field` is the config key that named it);
    return the usable pairs and counts. The first dropped pair is logged with its file:line. `columns`
    (`[data.columns]`) renames the rows' own columns to prompt / chosen / rejected first."""
    pairs: list[PreferencePair] = []
    stats = {"rows": 0, "dropped": 0, "bad_rows": 0}
    for data_file in resolve_data_files(path, field=field):
        for src in iter_file_rows(data_file, max_row_bytes=max_row_bytes):
            stats["rows"] += 1
            try:
                row = src.value
                if row is None:
                    raise bad_row_error(src)
                row = rename_columns(row, columns or {}, src.where)
                pair = tokenize_preference_row(row, tokenizer, index=len(pairs), where=src.where)
            except BadRowError:
                if not skip_bad_rows:
                    raise
                stats["bad_rows"] += 1
                continue
            fitted = _fit(pair, seq_len, overlong)
            if fitted is None:
                stats["dropped"] += 1
                if stats["dropped"] == 1:
                    logger.warning("%s: pair dropped (%d tokens for seq_len = %d, data.overlong = %s, or no trained "
                                   "token left); further drops are counted", src.where, len(pair), seq_len, overlong)
                continue
            pairs.append(fitted)
    if not pairs:
        raise DataError(f"{path}: no usable preference pair (rows: {stats['rows']}, dropped: {stats['dropped']})")
    return pairs, stats


def pack_pairs(pairs: Sequence[PreferencePair], *, seq_len: int, rows: int, pad_id: int) -> dict[str, Any]:
    """Lay `pairs` out, in order, in `rows` rows of `seq_len` (they must fit; see `take_pairs_for_rows`)."""
    input_ids = np.full((rows, seq_len), pad_id, dtype=np.int64)
    labels = np.full((rows, seq_len), IGNORE_INDEX, dtype=np.int64)
    position_ids = np.tile(np.arange(seq_len, dtype=np.int64), (rows, 1))
    document_ids = np.full((rows, seq_len), PAD_DOCUMENT_ID, dtype=np.int64)
    sequence_ids = np.full((rows, seq_len), -1, dtype=np.int64)
    ends: list[int] = []
    row, col, doc = 0, 0, 0
    for k, pair in enumerate(pairs):
        if col + len(pair) > seq_len:
            row, col, doc = row + 1, 0, 0
        if row >= rows or len(pair) > seq_len:
            raise ValueError(f"{len(pairs)} pairs do not fit {rows} rows of {seq_len}")
        for j, (ids, mask) in enumerate(((pair.chosen_ids, pair.chosen_mask), (pair.rejected_ids, pair.rejected_mask))):
            n = len(ids)
            sl = slice(col, col + n)
            input_ids[row, sl] = ids
            labels[row, sl] = document_labels(ids, mask)
            position_ids[row, sl] = np.arange(n)
            document_ids[row, sl] = doc
            sequence_ids[row, sl] = 2 * k + j
            ends.append(row * seq_len + col + n - 1)
            col, doc = col + n, doc + 1
        if col < seq_len:
            position_ids[row, col:] = np.arange(seq_len - col)
    if (sequence_ids[labels != IGNORE_INDEX] < 0).any():  # every labelled position belongs to a sequence
        raise ValueError("pack_pairs: a labelled position outside every sequence")
    labels_t = torch.from_numpy(labels)
    return {
        "input_ids": torch.from_numpy(input_ids),
        "labels": labels_t,
        "target_index": find_target_index(labels_t),  # the loss then never waits for the device to find them
        "position_ids": torch.from_numpy(position_ids),
        "document_ids": torch.from_numpy(document_ids),
        "sequence_ids": torch.from_numpy(sequence_ids),
        "sequence_ends": torch.tensor(ends, dtype=torch.int64),
        "pair_ids": torch.tensor([p.index for p in pairs], dtype=torch.int64),
        "n_targets": len(pairs),
    }


def take_pairs_for_rows(pairs: Sequence[PreferencePair], start: int, *, seq_len: int, rows: int) -> int:
    """How many pairs from `start` on fill `rows` rows of `seq_len` in order (at least one)."""
    row, col, i = 0, 0, start
    while i < len(pairs):
        n = len(pairs[i])
        if col + n > seq_len:
            row, col = row + 1, 0
            if row >= rows:
                break
        col += n
        i += 1
    return max(i - start, 1)


class PreferenceDataLoader:
    """Endless micro-batches of packed pairs for one data-parallel rank; `state_dict` resumes exactly."""

    def __init__(
        self, pairs: list[PreferencePair], *, seq_len: int, micro_batch_size: int, pad_id: int, seed: int,
        dp_rank: int = 0, dp_world_size: int = 1, shuffle: bool = True, load_stats: dict[str, int] | None = None,
    ) -> None:
        if len(pairs) < dp_world_size:
            raise DataError(f"{len(pairs)} preference pairs cannot feed {dp_world_size} data-parallel ranks")
        self.pairs = pairs
        self.seq_len, self.rows, self.pad_id = seq_len, micro_batch_size, pad_id
        self.seed, self.dp_rank, self.dp_world_size, self.shuffle = seed, dp_rank, dp_world_size, shuffle
        self.epoch, self.cursor = 0, 0
        self._order: list[int] | None = None
        self._pairs_seen = 0
        self._load_stats = dict(load_stats or {})

    def _epoch_order(self) -> list[int]:
        if self._order is None:  # this rank always owns the same pairs (see batches_once); only their order changes
            order = list(range(self.dp_rank, len(self.pairs), self.dp_world_size))
            if self.shuffle:
                random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
            self._order = order
        return self._order

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        order = self._epoch_order()
        if self.cursor >= len(order):
            self.epoch, self.cursor, self._order = self.epoch + 1, 0, None
            order = self._epoch_order()
        shard = [self.pairs[i] for i in order]
        n = take_pairs_for_rows(shard, self.cursor, seq_len=self.seq_len, rows=self.rows)
        batch = pack_pairs(shard[self.cursor : self.cursor + n], seq_len=self.seq_len, rows=self.rows, pad_id=self.pad_id)
        self.cursor += n
        self._pairs_seen += n
        return batch

    def batches_once(self) -> Iterator[dict[str, Any]]:
        """Every pair of this rank exactly once, in dataset order (for precomputing reference log-probs)."""
        shard = self.pairs[self.dp_rank :: self.dp_world_size]
        start = 0
        while start < len(shard):
            n = take_pairs_for_rows(shard, start, seq_len=self.seq_len, rows=self.rows)
            yield pack_pairs(shard[start : start + n], seq_len=self.seq_len, rows=self.rows, pad_id=self.pad_id)
            start += n

    @property
    def stats(self) -> dict[str, int]:
        return {**self._load_stats, "pairs": self._pairs_seen, "epoch": self.epoch}

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "cursor": self.cursor, "pairs_seen": self._pairs_seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._pairs_seen = int(state.get("pairs_seen", 0))
        self._order = None
