"""2 DP ranks x 2 dataloader workers cover every sample exactly once per epoch, with no gaps."""

from __future__ import annotations

from collections import Counter

import pytest
from sft_data_fakes import FakeTokenizer, texts_of, write_jsonl

from posttrain.config.sections import DataSection
from posttrain.datasets.dataloader import build_eval_dataloader, build_sft_dataloader
from posttrain.datasets.sources import DataFile, ShardedRowStream


def _files(tmp_path, n_files: int, n_rows: int) -> list[str]:
    paths = []
    for k in range(n_files):
        rows = [{"text": f"s{i}"} for i in range(k, n_rows, n_files)]
        paths.append(str(write_jsonl(tmp_path / f"part-{k:02d}.jsonl", rows)))
    return paths


def _epoch_texts(tmp_path, *, num_epochs: int, num_workers: int = 2, world: int = 2, seed: int = 3) -> list[list[str]]:
    data = DataSection(
        path=str(tmp_path / "*.jsonl"), num_workers=num_workers, shuffle_buffer=7, pack_buffer=5, prefetch=2
    )
    per_rank = []
    for rank in range(world):
        loader = build_sft_dataloader(
            data, FakeTokenizer(), seq_len=24, micro_batch_size=2, dp_rank=rank, dp_world_size=world, seed=seed,
            num_epochs=num_epochs,
        )
        per_rank.append(texts_of(list(loader)))
    return per_rank


@pytest.mark.parametrize("n_files", [3, 16], ids=["row-round-robin", "file-round-robin"])
def test_two_ranks_two_workers_cover_every_sample_once(tmp_path, n_files):
    n_rows = 101
    _files(tmp_path, n_files, n_rows)
    per_rank = _epoch_texts(tmp_path, num_epochs=1)
    union = Counter(t for texts in per_rank for t in texts)
    assert union == Counter(f"s{i}" for i in range(n_rows))
    assert all(len(texts) > 0 for texts in per_rank)
    assert not set(per_rank[0]) & set(per_rank[1])


def test_every_epoch_covers_every_sample_once_in_a_new_order(tmp_path):
    n_rows = 40
    _files(tmp_path, 2, n_rows)
    rank0, rank1 = _epoch_texts(tmp_path, num_epochs=2)
    assert Counter(rank0 + rank1) == Counter({f"s{i}": 2 for i in range(n_rows)})
    # per shard the two epochs visit the same rows in different orders
    half = len(rank0) // 2
    assert rank0[:half] != rank0[half:]


def test_row_streams_of_all_shards_partition_each_epoch(tmp_path):
    paths = _files(tmp_path, 3, 50)
    files = [DataFile(p, "jsonl") for p in paths]
    for epoch in (0, 1):
        seen = []
        for shard in range(4):
            stream = ShardedRowStream(files, shard=shard, num_shards=4, seed=0, name="d", shuffle_files=True)
            stream.start_epoch(epoch)
            while (row := stream.next_row()) is not None:
                seen.append(row.value["text"])
        assert Counter(seen) == Counter(f"s{i}" for i in range(50))


def test_eval_loader_gives_every_rank_the_same_batch_count_and_covers_each_sample_once(tmp_path):
    path = write_jsonl(tmp_path / "eval.jsonl", [{"text": f"e{i}" + "x" * (i % 11)} for i in range(37)])
    data = DataSection(eval_path=str(path), num_workers=1)
    per_rank = []
    for rank in range(3):
        loader = build_eval_dataloader(
            data, FakeTokenizer(), seq_len=24, micro_batch_size=2, dp_rank=rank, dp_world_size=3
        )
        first, second = list(loader), list(loader)  # one pass per iteration, the same each time
        assert len(first) == len(loader)
        assert [b["input_ids"].tolist() for b in first] == [b["input_ids"].tolist() for b in second]
        per_rank.append(first)
    assert len({len(batches) for batches in per_rank}) == 1
    texts = [t for batches in per_rank for t in texts_of(batches)]
    assert sorted(texts) == sorted(f"e{i}" + "x" * (i % 11) for i in range(37))
