"""The data mixer: weights respected statistically, deterministic per seed, resumable."""

from __future__ import annotations

from collections import Counter

import pytest
from sft_data_fakes import FakeTokenizer, texts_of, write_jsonl

from posttrain.config.sections import DataSection
from posttrain.datasets.counter_rng import CounterRNG
from posttrain.datasets.dataloader import build_sft_dataloader
from posttrain.datasets.errors import DataError
from posttrain.datasets.mixer import WeightedMixer
from posttrain.datasets.sources import SourceRow


class CountingSource:
    """An endless source: row n of source k is {"k": k, "n": n}."""

    def __init__(self, k: int) -> None:
        self.k, self.n = k, 0

    def next_row(self) -> SourceRow:
        self.n += 1
        return SourceRow({"k": self.k, "n": self.n - 1}, f"src{self.k}")

    def state_dict(self) -> dict:
        return {"n": self.n}

    def load_state_dict(self, state: dict) -> None:
        self.n = state["n"]


def mixer(weights, seed: int = 0) -> WeightedMixer:
    return WeightedMixer([CountingSource(k) for k in range(len(weights))], weights, CounterRNG(seed, "mix", 0))


def draw(m: WeightedMixer, n: int) -> list[tuple[int, int]]:
    return [(i, row.value["n"]) for i, row in (m.next_row() for _ in range(n))]


def test_weights_are_respected():
    n = 20000
    counts = Counter(i for i, _ in draw(mixer([5, 3, 2]), n))
    for i, share in enumerate([0.5, 0.3, 0.2]):
        assert abs(counts[i] / n - share) < 0.015
    assert 0 not in Counter(i for i, _ in draw(mixer([0, 1]), 200))


def test_deterministic_per_seed():
    assert draw(mixer([1, 1, 1], seed=7), 500) == draw(mixer([1, 1, 1], seed=7), 500)
    assert draw(mixer([1, 1, 1], seed=7), 500) != draw(mixer([1, 1, 1], seed=8), 500)


def test_resumes_exactly():
    original = mixer([2, 1], seed=3)
    draw(original, 123)
    state = original.state_dict()
    expected = draw(original, 200)
    resumed = mixer([2, 1], seed=3)
    resumed.load_state_dict(state)
    assert draw(resumed, 200) == expected


def test_bad_weights_name_the_setting():
    with pytest.raises(DataError, match="data.weights has 1 entries for 2"):
        WeightedMixer([CountingSource(0), CountingSource(1)], [1.0], CounterRNG(0))
    with pytest.raises(DataError, match="non-negative"):
        mixer([1, -1])


def test_mixed_paths_through_the_loader(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"a{i}"} for i in range(50)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"b{i}"} for i in range(50)])
    data = DataSection(paths=[str(a), str(b)], weights=[3.0, 1.0], num_workers=0, shuffle_buffer=10)
    loader = build_sft_dataloader(
        data, FakeTokenizer(), seq_len=64, micro_batch_size=4, dp_rank=0, dp_world_size=1, seed=0
    )
    batches = [next(loader) for _ in range(60)]
    texts = texts_of(batches)
    share_a = sum(t.startswith("a") for t in texts) / len(texts)
    assert 0.68 < share_a < 0.82, share_a
    stats = batches[-1]["stats"]
    assert stats["epoch/0"] >= 1 and "epoch/1" in stats  # a (weight 3) wrapped around more often
