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
