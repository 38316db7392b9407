"""`[data.columns]`: a dataset's own column names, mapped to the fields the row formats read.

    [data.columns]
    prompt = "question"      # the row's "question" column is the prompt
    completion = "answer"
    system = "sys"           # a system prompt column (chat, prompt/completion and Alpaca rows)

Each mapped column is renamed before the format is detected, so `data.format = "auto"` then sees an ordinary
prompt / completion (or messages, conversations, instruction / input / output, chosen / rejected ...) row. A
row without a mapped column is a bad row naming the mapping.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from posttrain.datasets.errors import BadRowError


def rename_columns(
    row: dict[str, Any], columns: Mapping[str, str] | tuple[tuple[str, str], ...], where: str
) -> dict[str, Any]:
    """`row` with each mapped column under its field name (`columns`: field -> the row's column)."""
    pairs = tuple(columns.items()) if isinstance(columns, Mapping) else columns
    if not pairs:
        return row
    missing = [(field, column) for field, column in pairs if column not in row]
    if missing:
        field, column = missing[0]
        raise BadRowError(
            f"{where}: data.columns.{field} = {column!r}, but the row has no {column!r} column (it has {sorted(row)}); "
            "fix data.columns or the row, or set data.skip_bad_rows = true to skip and count such rows"
        )
    targets = {field for field, _ in pairs}
    renamed = {key: value for key, value in row.items() if key in targets or key not in {c for _, c in pairs}}
    renamed.update({field: row[column] for field, column in pairs})
    return renamed
