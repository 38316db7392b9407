"""What a resume accepts from the checkpoint it found: the `before_load` hook of `CheckpointManager.load`.

A change of an immutable fingerprint entry (model, head, LoRA, vocabulary, data-parallel degree, recipe)
refuses the resume with one line. Mutable changes (lr, schedule, steps, data) are logged and applied by the
caller from the resumed step; when the training data changed, its reader position means nothing for the new
data, so the data loader starts the new data from its beginning.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from posttrain.checkpoint.fingerprint import DATA_KEYS, immutable_changes, mutable_changes, refusal_message

logger = logging.getLogger(__name__)


class ResumeFingerprintCheck:
    """Call with a checkpoint's metadata: raises SystemExit on an immutable change, logs mutable ones (on
    `log` ranks) and returns the state entries not to restore (`data_entry` when the data changed)."""

    def __init__(self, folder: Path, current: dict[str, Any], *, data_entry: str = "dataloader", log: bool = True) -> None:
        self.folder = folder
        self.current = current
        self.data_entry = data_entry
        self.log = log
        self.changes: list[tuple[str, Any, Any]] = []  # the mutable changes of the checkpoint accepted last

    def __call__(self, metadata: dict[str, Any]) -> list[str]:
        where = self.folder / f"step-{metadata.get('step')}"
        saved = metadata.get("fingerprint")
        if not saved:
            if self.log:
                logger.warning("checkpoint %s has no resume fingerprint (written by an older version): "
                               "model and config changes cannot be checked", where)
            return []
        refused = immutable_changes(saved, self.current)
        if refused:
            raise SystemExit(refusal_message(str(where), refused))
        self.changes = mutable_changes(saved, self.current)
        if self.log:
            for key, old, new in self.changes:
                logger.warning("resume from %s: %s changed %s -> %s; the new value applies from step %s on",
                               where, key, json.dumps(old), json.dumps(new), metadata.get("step", 0) + 1)
        if any(key in DATA_KEYS for key, _, _ in self.changes):
            if self.log:
                logger.warning("resume from %s: the training data changed, so it is read from its beginning "
                               "(the saved reader position belongs to the old data)", where)
            return [self.data_entry]
        return []
