"""The one exception the data pipeline raises, and its skippable kind."""

from __future__ import annotations


class DataError(ValueError):
    """Something about the data or the data settings that the user has to fix.

    The message is one sentence naming what to change (file and line, field, or config key).
    """


class BadRowError(DataError):
    """One row is unusable (malformed JSON, a missing field, an unknown role, a template failure).

    Raised unless `data.skip_bad_rows = true`, in which case the row is skipped, counted and logged.
    """


def data_worker_death(error: BaseException, data_names: str) -> str | None:
    """One line for torch's "DataLoader worker ... exited unexpectedly / is killed by signal" (raised from
    `next()`, or at any point by torch's SIGCHLD handler); None for any other error."""
    text = str(error).strip()
    if "DataLoader worker" not in text:
        return None
    return worker_death_message(text.splitlines()[0], data_names)


def worker_death_message(how: str, data_names: str) -> str:
    return (
        f"a data worker reading {data_names} died ({how}), most likely killed for memory: check "
        "data.max_row_bytes (a row is held many times over while it is tokenized), lower data.num_workers / "
        "data.prefetch, or set data.num_workers = 0 to see any error in the training process"
    )
