"""Next-event prediction on held-out sequences: accuracy (top-1) and recall@k, with the baselines a model
has to beat.

For every sequence and every position t >= `min_context` (the events seen so far are seq[:t]), the model
ranks all ids for seq[t]; recall@k is the fraction of positions whose true next event is among its top k
(accuracy = recall@1). Baselines, scored on exactly the same positions:
- `frequency`: always the k events most frequent in the training data (what "chance" looks like for a
  skewed catalogue; uniform chance is k / n_events);
- `bigram`: the k events that most often followed the previous event in the training data (knows the last
  event, nothing earlier).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from itertools import pairwise

import numpy as np
import torch
from torch import nn

from posttrain.datasets.sources import iter_file_rows, resolve_data_files
from posttrain.datasets.token_format import token_row_arrays


def read_sequences(spec: str) -> list[np.ndarray]:
    """Every `input_ids` sequence of a dataset (a jsonl / parquet / .npy / .bin file, glob or folder)."""
    sequences = []
    for data_file in resolve_data_files(spec):
        for row in iter_file_rows(data_file):
            if row.error is not None:
                raise ValueError(f"{row.where}: {row.error}")
            ids, _, _ = token_row_arrays(row.value or {}, row.where)
            sequences.append(ids)
    return sequences


def _positions(sequences: Sequence[np.ndarray], min_context: int) -> list[tuple[int, int]]:
    return [(i, t) for i, seq in enumerate(sequences) for t in range(min_context, len(seq))]


@torch.no_grad()
def model_recall_at_k(
    model: nn.Module,
    sequences: Sequence[np.ndarray],
    *,
    ks: Sequence[int] = (1, 5, 10),
    min_context: int = 1,
    batch_size: int = 32,
    n_events: int | None = None,
) -> dict[str, float]:
    """recall@k of `model(input_ids) -> logits [B, S, V]` (causal), over ids below `n_events` if given."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    hits = {k: 0 for k in ks}
    total = 0
    kmax = max(ks)
    for start in range(0, len(sequences), batch_size):
        batch = sequences[start : start + batch_size]
        width = max(len(s) for s in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        for row, seq in enumerate(batch):
            ids[row, : len(seq)] = torch.as_tensor(seq)  # right padding: a causal model never looks at it
        logits = model(ids.to(device)).float()
        if n_events is not None:
            logits = logits[..., :n_events]
        top = logits.topk(kmax, dim=-1).indices.cpu()  # [B, S, kmax]: predictions for position s + 1
        for row, seq in enumerate(batch):
            n = len(seq)
            if n <= min_context:
                continue
            target = torch.as_tensor(seq[min_context:])  # events t = min_context .. n-1
            predicted = top[row, min_context - 1 : n - 1]  # made after seeing events 0..t-1
            found = predicted == target[:, None]
            for k in ks:
                hits[k] += int(found[:, :k].any(dim=-1).sum())
            total += n - min_context
    model.train(was_training)
    return {f"recall@{k}": hits[k] / max(total, 1) for k in ks} | {"positions": float(total)}


def baseline_recall_at_k(
    train: Sequence[np.ndarray],
    sequences: Sequence[np.ndarray],
    *,
    kind: str,
    ks: Sequence[int] = (1, 5, 10),
    min_context: int = 1,
) -> dict[str, float]:
    """recall@k of the `frequency` or `bigram` baseline fitted on `train`."""
    unigram = Counter(int(e) for seq in train for e in seq)
    by_frequency = [e for e, _ in unigram.most_common()]
    kmax = max(ks)
    ranked: dict[int, list[int]] = {}
    if kind == "bigram":
        follow: dict[int, Counter] = defaultdict(Counter)
        for seq in train:
            for a, b in pairwise(seq):
                follow[int(a)][int(b)] += 1
        for a, counts in follow.items():
            top = [e for e, _ in counts.most_common(kmax)]
            ranked[a] = top + [e for e in by_frequency if e not in top][: kmax - len(top)]
    elif kind != "frequency":
        raise ValueError(f"unknown baseline {kind!r}; use frequency or bigram")
    hits = {k: 0 for k in ks}
    positions = _positions(sequences, min_context)
    for i, t in positions:
        seq = sequences[i]
        predicted = ranked.get(int(seq[t - 1]), by_frequency) if kind == "bigram" else by_frequency
        truth = int(seq[t])
        for k in ks:
            hits[k] += truth in predicted[:k]
    return {f"recall@{k}": hits[k] / max(len(positions), 1) for k in ks} | {"positions": float(len(positions))}


def next_event_report(
    model: nn.Module,
    train: Sequence[np.ndarray],
    held_out: Sequence[np.ndarray],
    *,
    ks: Sequence[int] = (1, 5, 10),
    min_context: int = 1,
    n_events: int | None = None,
) -> dict[str, dict[str, float]]:
    """{"model": ..., "frequency": ..., "bigram": ...}, each {"recall@k": ..., "positions": n}."""
    return {
        "model": model_recall_at_k(model, held_out, ks=ks, min_context=min_context, n_events=n_events),
        "frequency": baseline_recall_at_k(train, held_out, kind="frequency", ks=ks, min_context=min_context),
        "bigram": baseline_recall_at_k(train, held_out, kind="bigram", ks=ks, min_context=min_context),
    }
