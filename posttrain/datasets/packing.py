"""On-the-fly packing of tokenized documents into fixed `seq_len` rows.

A packed row holds, per position:
- input_ids: the documents' tokens back to back, then `pad_id`;
- labels: the NEXT token of the same document where that next token's loss mask is true, else -100. The
  last token of each document is -100, so no position predicts across a document boundary; padding is -100;
- position_ids: 0, 1, 2, ... restarting at every document (padding counts 0, 1, ... as one more document);
- document_ids: 0, 1, 2, ... per document in the row; padding is `PAD_DOCUMENT_ID` (-1): the attention mask
  ("causal AND same document id", `models.common.attention.document_mask_mod`) never lets a real token attend
  to padding, and lets a padding position attend only to itself.

Best fit (`BestFitBuffer` + `pack_best_fit`): the packer holds up to `pack_buffer` documents; while a row is
being filled it takes the longest held document that fits the space left (the oldest among equal lengths),
refilling the buffer after each take, and emits the row when nothing held fits. `padding` mode puts one
document per row, for comparison. Documents longer than seq_len are truncated or dropped first
(`fit_to_length`); one left with no target token is dropped; both are counted by the caller.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from posttrain.datasets.sft_format import TokenizedSample

IGNORE_INDEX = -100
PAD_DOCUMENT_ID = -1


@dataclass
class PackedRow:
    """One row of `seq_len` positions (numpy int64 arrays) and what it holds."""

    input_ids: np.ndarray
    labels: np.ndarray
    position_ids: np.ndarray
    document_ids: np.ndarray
    num_documents: int
    num_tokens: int  # real (non-padding) tokens
    num_targets: int  # positions with a label


def document_labels(input_ids: np.ndarray, loss_mask: np.ndarray) -> np.ndarray:
    """labels[i] = input_ids[i + 1] where loss_mask[i + 1], else -100; the last position is always -100."""
    labels = np.full(input_ids.shape[0], IGNORE_INDEX, dtype=np.int64)
    if input_ids.shape[0] > 1:
        labels[:-1] = np.where(loss_mask[1:], input_ids[1:], IGNORE_INDEX)
    return labels


def num_targets(sample: TokenizedSample) -> int:
    """How many positions of this document get a label (loss-mask trues after the first token)."""
    return int(sample.loss_mask[1:].sum())


def fit_to_length(sample: TokenizedSample, seq_len: int, overlong: str) -> tuple[TokenizedSample | None, str]:
    """The sample as it will be packed, and what happened: kept, truncated, dropped_overlong, dropped_no_target.

    An overlong sample is cut to its first seq_len tokens (`overlong = "truncate"`) or dropped ("drop"); a
    truncated sample with no target left counts as dropped_overlong; any other sample without a target
    token (e.g. a chat with no assistant turn) as dropped_no_target.
    """
    if len(sample) > seq_len:
        if overlong == "drop":
            return None, "dropped_overlong"
        segments = sample.segment_ids[:seq_len] if sample.segment_ids is not None else None
        cut = TokenizedSample(sample.input_ids[:seq_len], sample.loss_mask[:seq_len], sample.where, segments)
        if num_targets(cut) == 0:
            return None, "dropped_overlong"
        return cut, "truncated"
    if num_targets(sample) == 0:
        return None, "dropped_no_target"
    return sample, "kept"


def build_row(documents: list[TokenizedSample], seq_len: int, pad_id: int) -> PackedRow:
    """Lay documents out in one row of seq_len positions (they must fit). A sample with segment_ids is
    several documents: each gets its own document id and positions restarting at 0."""
    input_ids = np.full(seq_len, pad_id, dtype=np.int64)
    labels = np.full(seq_len, IGNORE_INDEX, dtype=np.int64)
    position_ids = np.zeros(seq_len, dtype=np.int64)
    document_ids = np.full(seq_len, PAD_DOCUMENT_ID, dtype=np.int64)
    start = 0
    doc_index = 0
    for doc in documents:
        n = len(doc)
        end = start + n
        if end > seq_len:
            raise ValueError(f"documents of {end} tokens do not fit a row of {seq_len}")
        input_ids[start:end] = doc.input_ids
        labels[start:end] = document_labels(doc.input_ids, doc.loss_mask)
        if doc.segment_ids is None:
            position_ids[start:end] = np.arange(n)
            document_ids[start:end] = doc_index
            doc_index += 1
        else:  # segments 0, 0, 1, 1, 1, ...: positions restart where a segment starts
            seg = doc.segment_ids
            seg_start = np.flatnonzero(np.concatenate([[True], seg[1:] != seg[:-1]]))
            seg_len = np.diff(np.append(seg_start, n))
            position_ids[start:end] = np.arange(n) - np.repeat(seg_start, seg_len)
            document_ids[start:end] = doc_index + np.repeat(np.arange(seg_start.size), seg_len)
            doc_index += int(seg_start.size)
        start = end
    position_ids[start:] = np.arange(seq_len - start)
    return PackedRow(
        input_ids, labels, position_ids, document_ids,
        num_documents=doc_index,
        num_tokens=start,
        num_targets=int((labels != IGNORE_INDEX).sum()),
    )


class BestFitBuffer:
    """Documents waiting to be packed, ordered by length for best-fit lookups."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(int(capacity), 1)
        self._keys: list[tuple[int, int]] = []  # (length, -arrival) ascending
        self._samples: dict[int, TokenizedSample] = {}
        self._arrivals = 0

    def __len__(self) -> int:
        return len(self._keys)

    def is_full(self) -> bool:
        return len(self._keys) >= self.capacity

    def add(self, sample: TokenizedSample) -> None:
        arrival = self._arrivals
        self._arrivals += 1
        bisect.insort(self._keys, (len(sample), -arrival))
        self._samples[arrival] = sample

    def take_longest_fitting(self, space: int) -> TokenizedSample | None:
        """The longest document of at most `space` tokens (the oldest among equals), removed; or None."""
        i = bisect.bisect_right(self._keys, (space, 1)) - 1
        if i < 0:
            return None
        _, neg_arrival = self._keys.pop(i)
        return self._samples.pop(-neg_arrival)

    def take_oldest(self) -> TokenizedSample | None:
        if not self._keys:
            return None
        arrival = min(self._samples)
        self._keys.remove((len(self._samples[arrival]), -arrival))
        return self._samples.pop(arrival)

    def state_dict(self) -> dict[str, Any]:
        # Token ids as int32 bytes: a compact, exact record of what is held.
        return {
            "arrivals": self._arrivals,
            "samples": [
                (arrival, s.input_ids.astype(np.int32).tobytes(), np.packbits(s.loss_mask).tobytes(), len(s), s.where)
                + (() if s.segment_ids is None else (s.segment_ids.astype(np.int32).tobytes(),))
                for arrival, s in sorted(self._samples.items())
            ],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._arrivals = state["arrivals"]
        self._keys, self._samples = [], {}
        for arrival, ids, mask, n, where, *segments in state["samples"]:
            sample = TokenizedSample(
                np.frombuffer(ids, dtype=np.int32).astype(np.int64),
                np.unpackbits(np.frombuffer(mask, dtype=np.uint8), count=n).astype(bool),
                where,
                np.frombuffer(segments[0], dtype=np.int32).astype(np.int64) if segments else None,
            )
            self._samples[arrival] = sample
            bisect.insort(self._keys, (n, -arrival))


def pack_best_fit(
    buffer: BestFitBuffer, refill: Callable[[], None], seq_len: int
) -> list[TokenizedSample]:
    """Fill one row: repeatedly take the longest held document that fits, refilling after each take.

    `refill()` tops the buffer up to capacity (or as far as the data goes). Returns [] when nothing is held.
    """
    refill()
    documents: list[TokenizedSample] = []
    space = seq_len
    while space > 0:
        doc = buffer.take_longest_fitting(space)
        if doc is None:
            break
        documents.append(doc)
        space -= len(doc)
        refill()
    return documents


def pack_one(buffer: BestFitBuffer, refill: Callable[[], None]) -> list[TokenizedSample]:
    """`padding` mode: the oldest held document alone in its row."""
    refill()
    doc = buffer.take_oldest()
    return [] if doc is None else [doc]
