"""Cumulative counters of the data pipeline, so that nothing is dropped without being counted."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass
class DataStats:
    """Counts since the start of training (they survive resume). One instance per data shard.

    rows_read = skipped_bad_rows + dropped_overlong + dropped_no_target + samples + (documents still held by
    the packer).
    """

    rows_read: int = 0  # rows taken from the sources (after sharding and shuffling)
    skipped_bad_rows: int = 0  # malformed / invalid rows skipped (data.skip_bad_rows = true)
    dropped_overlong: int = 0  # longer than seq_len and dropped (or nothing trainable left after truncation)
    dropped_no_target: int = 0  # no trained token at all (e.g. no assistant turn)
    truncated: int = 0  # longer than seq_len, cut to seq_len and kept
    samples: int = 0  # documents placed in emitted rows
    rows: int = 0  # packed rows emitted (all-padding filler rows of a finite loader not included)
    tokens: int = 0  # real tokens in emitted rows
    trained_tokens: int = 0  # positions with a label
    padding_tokens: int = 0  # padding positions in emitted rows

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def load(self, counts: dict[str, int]) -> None:
        for f in fields(self):
            setattr(self, f.name, int(counts.get(f.name, 0)))

    @staticmethod
    def keys() -> list[str]:
        return [f.name for f in fields(DataStats)]
