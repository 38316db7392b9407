"""A row format: event rows whose first events are context only (a user's first clicks say little)."""

from __future__ import annotations

from typing import Any

import numpy as np

COLD_START_EVENTS = 2


def skip_cold_start(row: dict[str, Any], where: str, tokenizer: Any) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, loss_mask): every event trained except the first COLD_START_EVENTS; no tokenizer used."""
    if "input_ids" not in row:
        raise ValueError(f"{where}: an event row needs input_ids (it has {sorted(row)})")
    ids = np.asarray(row["input_ids"], dtype=np.int64)
    mask = np.ones(ids.shape[0], dtype=bool)
    mask[:COLD_START_EVENTS] = False
    return ids, mask
