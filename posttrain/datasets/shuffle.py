"""One dataset's rows for one shard, epoch after epoch, through a seeded streaming shuffle buffer.

The buffer holds `buffer_size` rows; each output is a uniformly drawn buffered row, replaced by the next row
read. At the end of an epoch the buffer is drained before the next epoch starts, so every row of the shard
comes out exactly once per epoch. The draw sequence is keyed by (seed, dataset, shard, epoch), so each epoch
has its own order; the state is the reader position, the buffered rows and the draw count.
"""

from __future__ import annotations

from typing import Any

from posttrain.datasets.counter_rng import CounterRNG
from posttrain.datasets.errors import DataError
from posttrain.datasets.sources import ShardedRowStream, SourceRow


class ShuffledEpochs:
    """`next_row()` -> the next row (None only after `num_epochs` epochs; forever when it is None)."""

    def __init__(
        self,
        stream: ShardedRowStream,
        *,
        buffer_size: int,
        seed: int,
        source_index: int,
        num_epochs: int | None = None,
    ) -> None:
        self.stream = stream
        self.buffer_size = max(int(buffer_size), 0)
        self.seed = seed
        self.source_index = source_index
        self.num_epochs = num_epochs
        self.buffer: list[SourceRow] = []
        self.draining = False  # the reader reached the end of the current epoch
        self.finished = False
        self.rng = self._rng_for(stream.epoch)

    @property
    def epoch(self) -> int:
        return self.stream.epoch

    def _rng_for(self, epoch: int, draws: int = 0) -> CounterRNG:
        return CounterRNG(self.seed, "shuffle", self.source_index, self.stream.shard, epoch, draws=draws)

    def next_row(self) -> SourceRow | None:
        while not self.finished:
            if self.buffer_size == 0:
                row = self.stream.next_row()
                if row is not None:
                    return row
            else:
                while not self.draining and len(self.buffer) < self.buffer_size:
                    row = self.stream.next_row()
                    if row is None:
                        self.draining = True
                    else:
                        self.buffer.append(row)
                if self.buffer:
                    j = self.rng.randbelow(len(self.buffer))
                    self.buffer[j], self.buffer[-1] = self.buffer[-1], self.buffer[j]
                    return self.buffer.pop()
            self._end_epoch()
        return None

    def _end_epoch(self) -> None:
        stream = self.stream
        if stream.rows_in_epoch == 0:
            total = stream.global_rows_in_epoch
            files = ", ".join(f.path for f in stream.files[:3]) + (" ..." if len(stream.files) > 3 else "")
            if total == 0 or stream.num_shards == 1:
                raise DataError(f"{stream.name} ({files}) has no rows; check the data files")
            raise DataError(
                f"{stream.name} ({files}) gave data shard {stream.shard} no rows: it has "
                f"{'only ' + str(total) if total is not None else 'too few non-empty files or'} rows for "
                f"{stream.num_shards} shards (data-parallel ranks x data.num_workers); lower data.num_workers "
                f"or use more data"
            )
        next_epoch = stream.epoch + 1
        if self.num_epochs is not None and next_epoch >= self.num_epochs:
            self.finished = True
            return
        stream.start_epoch(next_epoch)
        self.rng = self._rng_for(next_epoch)
        self.draining = False

    def state_dict(self) -> dict[str, Any]:
        return {
            "stream": self.stream.state_dict(),
            "buffer": [r.to_state() for r in self.buffer],
            "draws": self.rng.draws,
            "draining": self.draining,
            "finished": self.finished,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state["stream"])
        self.buffer = [SourceRow.from_state(r) for r in state["buffer"]]
        self.rng = self._rng_for(self.stream.epoch, draws=state["draws"])
        self.draining = state["draining"]
        self.finished = state["finished"]
