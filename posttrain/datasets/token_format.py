"""`data.format = "tokens"`: rows that are already token ids (event or item IDs, pre-tokenized text); no
tokenizer is involved.

A row (a jsonl object, a parquet row, or one document of a `.npy` / `.bin` token file, see token_files.py):
- `input_ids`: a list (or 1-D array) of non-negative ints below the model's vocabulary size;
- `loss_mask` (optional): one bool / 0 / 1 per id, true where the id is a training target;
- `labels` (optional, instead of loss_mask): Hugging Face's unshifted convention, one per id, equal to the id
  where it is trained and -100 where not (the packer shifts; other targets cannot be expressed this way);
- `document_ids` (optional): one int per id; the row holds several documents back to back (a change of value
  starts a new one), which attend only within themselves, restart their positions, and never predict across
  a boundary. Rows without it are one document.
Without loss_mask / labels every id after the first of each document is trained.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from posttrain.datasets.errors import BadRowError

IGNORE_INDEX = -100
_FIX = "fix the row or set data.skip_bad_rows = true to skip and count such rows"


def _int_array(value: Any, field: str, where: str) -> np.ndarray:
    if isinstance(value, np.ndarray):
        if value.ndim != 1 or not (np.issubdtype(value.dtype, np.integer) or value.dtype == bool):
            raise BadRowError(f"{where}: {field} must be a 1-D integer array, got {value.dtype} {value.shape}; {_FIX}")
        return value.astype(np.int64, copy=False)
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value
    ):
        kind = type(value).__name__ if not isinstance(value, (list, tuple)) else "a list with non-integers"
        raise BadRowError(f"{where}: {field} must be a list of integers, got {kind}; {_FIX}")
    return np.asarray(value, dtype=np.int64)


def token_row_arrays(
    row: dict[str, Any], where: str, *, vocab_size: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(input_ids int64, loss_mask bool, segment_ids int64 or None) of one `tokens` row, validated."""
    if "input_ids" not in row or row["input_ids"] is None:
        raise BadRowError(
            f"{where}: the row has no 'input_ids' field, which data.format = tokens needs (it has {sorted(row)}); "
            f"{_FIX}, or set data.format"
        )
    ids = _int_array(row["input_ids"], "input_ids", where)
    n = ids.shape[0]
    if n == 0:
        raise BadRowError(f"{where}: input_ids is empty; {_FIX}")
    low, high = int(ids.min()), int(ids.max())
    if low < 0:
        raise BadRowError(f"{where}: input_ids holds the negative id {low}; token ids start at 0; {_FIX}")
    if vocab_size is not None and high >= vocab_size:
        raise BadRowError(
            f"{where}: input_ids holds the id {high} but the model's vocabulary has {vocab_size} ids "
            f"(0..{vocab_size - 1}); raise model.vocab_size or {_FIX}"
        )

    if row.get("loss_mask") is not None and row.get("labels") is not None:
        raise BadRowError(f"{where}: the row has both loss_mask and labels; give one of them; {_FIX}")
    if row.get("loss_mask") is not None:
        mask = _int_array(row["loss_mask"], "loss_mask", where)
        if mask.shape[0] != n:
            raise BadRowError(f"{where}: loss_mask has {mask.shape[0]} values for {n} input_ids; {_FIX}")
        if not np.isin(mask, (0, 1)).all():
            raise BadRowError(f"{where}: loss_mask must hold only true/false (or 1/0); {_FIX}")
        mask = mask.astype(bool)
    elif row.get("labels") is not None:
        labels = _int_array(row["labels"], "labels", where)
        if labels.shape[0] != n:
            raise BadRowError(f"{where}: labels has {labels.shape[0]} values for {n} input_ids; {_FIX}")
        mask = labels != IGNORE_INDEX
        bad = np.flatnonzero(mask & (labels != ids))
        if bad.size:
            i = int(bad[0])
            raise BadRowError(
                f"{where}: labels[{i}] is {int(labels[i])} but input_ids[{i}] is {int(ids[i])}; labels are unshifted "
                f"(equal to input_ids where trained, -100 where not); use loss_mask, or {_FIX}"
            )
    else:
        mask = np.ones(n, dtype=bool)

    segments = None
    if row.get("document_ids") is not None:
        doc = _int_array(row["document_ids"], "document_ids", where)
        if doc.shape[0] != n:
            raise BadRowError(f"{where}: document_ids has {doc.shape[0]} values for {n} input_ids; {_FIX}")
        starts = np.concatenate([[True], doc[1:] != doc[:-1]])
        if starts.sum() > 1:
            segments = np.cumsum(starts) - 1
            mask = mask & ~starts  # a document's first token is predicted by nothing inside it
    return ids, mask, segments
