"""Draw rows from several datasets by weight, deterministically for a seed, resumably.

Each draw picks dataset i with probability weights[i] / sum(weights) (renormalized over the datasets not yet
exhausted, which only happens in finite runs) from a counter-based random stream, so the state is the draw
count plus each dataset's own state. Weights are per row (sample), not per token.
"""

from __future__ import annotations

from typing import Any, Protocol

from posttrain.datasets.counter_rng import CounterRNG
from posttrain.datasets.errors import DataError
from posttrain.datasets.sources import SourceRow


class RowSource(Protocol):
    def next_row(self) -> SourceRow | None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class WeightedMixer:
    """`next_row()` -> (dataset index, row), or None once every dataset is exhausted."""

    def __init__(self, sources: list[RowSource], weights: list[float] | None, rng: CounterRNG) -> None:
        if not sources:
            raise DataError("no datasets to mix; set data.path or data.paths")
        weights = list(weights) if weights else [1.0] * len(sources)
        if len(weights) != len(sources):
            raise DataError(
                f"data.weights has {len(weights)} entries for {len(sources)} data.paths; give one weight per path"
            )
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise DataError(f"data.weights = {weights} must be non-negative with a positive sum")
        self.sources = sources
        self.weights = [float(w) for w in weights]
        self.rng = rng
        self.exhausted = [w == 0 for w in self.weights]
        self.draws_per_source = [0] * len(sources)

    def _pick(self) -> int | None:
        live = [(i, w) for i, w in enumerate(self.weights) if not self.exhausted[i]]
        if not live:
            return None
        if len(live) == 1:
            return live[0][0]
        u = self.rng.random() * sum(w for _, w in live)
        for i, w in live:
            u -= w
            if u < 0:
                return i
        return live[-1][0]

    def next_row(self) -> tuple[int, SourceRow] | None:
        while True:
            i = self._pick()
            if i is None:
                return None
            row = self.sources[i].next_row()
            if row is not None:
                self.draws_per_source[i] += 1
                return i, row
            self.exhausted[i] = True

    def state_dict(self) -> dict[str, Any]:
        return {
            "draws": self.rng.draws,
            "exhausted": list(self.exhausted),
            "draws_per_source": list(self.draws_per_source),
            "sources": [s.state_dict() for s in self.sources],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["sources"]) != len(self.sources):
            raise DataError(
                f"the data state was saved with {len(state['sources'])} datasets but {len(self.sources)} are "
                f"configured now; resume with the same data.paths"
            )
        self.rng.draws = state["draws"]
        self.exhausted = list(state["exhausted"])
        self.draws_per_source = list(state["draws_per_source"])
        for source, sub in zip(self.sources, state["sources"]):
            source.load_state_dict(sub)
