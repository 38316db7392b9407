"""Exact resume: a fresh loader loaded with `state_dict()` after k batches yields exactly the next batches."""

from __future__ import annotations

import io

import pytest
import torch
from sft_data_fakes import FakeTokenizer, write_jsonl

from posttrain.config.sections import DataSection
from posttrain.datasets.dataloader import build_sft_dataloader
from posttrain.datasets.errors import DataError

TENSORS = ("input_ids", "labels", "position_ids", "document_ids")


def _data(tmp_path, **kw) -> DataSection:
    if not (tmp_path / "chat.jsonl").exists():
        chats = [
            {"messages": [{"role": "user", "content": "q" * (i % 9 + 1)}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(37)
        ]
        write_jsonl(tmp_path / "chat.jsonl", chats)
        write_jsonl(tmp_path / "text.jsonl", [{"text": "t" * (i % 13) + str(i)} for i in range(29)])
    base = dict(path=str(tmp_path / "*.jsonl"), shuffle_buffer=11, pack_buffer=6, prefetch=2)
    base.update(kw)
    return DataSection(**base)


def _build(data: DataSection, rank: int = 0, world: int = 1):
    return build_sft_dataloader(
        data, FakeTokenizer(), seq_len=20, micro_batch_size=2, dp_rank=rank, dp_world_size=world, seed=5
    )


def _assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for key in TENSORS:
            assert torch.equal(x[key], y[key]), key
        assert x["stats"] == y["stats"]


def _take(loader, n: int) -> list[dict]:
    return [next(loader) for _ in range(n)]


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("mixed", [False, True], ids=["one-dataset", "mixture"])
def test_resume_yields_exactly_the_following_batches(tmp_path, num_workers, mixed):
    kw = {"num_workers": num_workers}
    if mixed:
        _data(tmp_path)  # write the files
        kw.update(path="", paths=[str(tmp_path / "chat.jsonl"), str(tmp_path / "text.jsonl")], weights=[2.0, 1.0])
    data = _data(tmp_path, **kw)
    loader = _build(data)
    _take(loader, 7)
    state = loader.state_dict()
    buf = io.BytesIO()
    torch.save(state, buf)  # the state survives a checkpoint file
    expected = _take(loader, 25)  # crosses several epochs of this small data

    resumed = _build(data)
    buf.seek(0)
    resumed.load_state_dict(torch.load(buf, weights_only=False))
    _assert_same(_take(resumed, 25), expected)
    assert expected[-1]["stats"]["rows_read"] > 66  # past one epoch over all rows


def test_uninterrupted_runs_are_deterministic_and_seed_dependent(tmp_path):
    data = _data(tmp_path, num_workers=0)
    _assert_same(_take(_build(data), 6), _take(_build(data), 6))
    other = build_sft_dataloader(
        data, FakeTokenizer(), seq_len=20, micro_batch_size=2, dp_rank=0, dp_world_size=1, seed=6
    )
    assert not torch.equal(_take(other, 6)[0]["input_ids"], _take(_build(data), 6)[0]["input_ids"])


def test_stats_sum_over_workers_and_survive_resume(tmp_path):
    data = _data(tmp_path, num_workers=2)
    loader = _build(data)
    batches = _take(loader, 8)
    stats = batches[-1]["stats"]
    rows_emitted = sum(int((b["document_ids"] >= 0).any(dim=1).sum()) for b in batches)
    assert stats["rows"] == rows_emitted == 16
    assert stats["tokens"] == sum(int((b["document_ids"] >= 0).sum()) for b in batches)
    resumed = _build(data)
    resumed.load_state_dict(loader.state_dict())
    assert next(resumed)["stats"]["rows"] == 18


def test_iterating_again_continues_the_stream(tmp_path):
    loader = _build(_data(tmp_path, num_workers=0))
    first = next(iter(loader))
    second = next(iter(loader))
    assert not torch.equal(first["input_ids"], second["input_ids"])


def test_resume_with_another_layout_is_refused(tmp_path):
    state = _build(_data(tmp_path, num_workers=0)).state_dict()
    other = _build(_data(tmp_path, num_workers=2))
    with pytest.raises(DataError, match="same data-parallel size and data.num_workers"):
        other.load_state_dict(state)
