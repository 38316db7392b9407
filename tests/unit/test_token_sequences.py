"""data.format = "tokens": pre-tokenized rows from jsonl / parquet / .npy / .bin, packed with no tokenizer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from posttrain.config.sections import DataSection
from posttrain.datasets.dataloader import build_sft_dataloader
from posttrain.datasets.errors import BadRowError, DataError
from posttrain.datasets.sft_format import tokenize_row
from posttrain.datasets.sources import file_kind, resolve_data_files
from posttrain.datasets.token_files import write_token_file

DOCS = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [1, 2]]


def _loader(path, *, fmt="tokens", seq_len=16, vocab_size=None, **kw):
    data = DataSection(path=str(path), format=fmt, shuffle_buffer=0, num_workers=0, packing="padding", **kw)
    return build_sft_dataloader(
        data, None, seq_len=seq_len, micro_batch_size=1, dp_rank=0, dp_world_size=1, seed=0, vocab_size=vocab_size
    )


def _first_ids(loader, n: int) -> list[list[int]]:
    out = []
    it = iter(loader)
    for _ in range(n):
        batch = next(it)
        ids, doc = batch["input_ids"][0], batch["document_ids"][0]
        out.append(ids[doc >= 0].tolist())
    return out


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "npy_stream", "npy_2d", "bin"])
def test_every_storage_gives_the_same_documents_without_a_tokenizer(tmp_path, kind):
    if kind == "jsonl":
        path = tmp_path / "ev.jsonl"
        _write_jsonl(path, [{"input_ids": d} for d in DOCS])
        expected = DOCS
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / "ev.parquet"
        pq.write_table(pa.table({"input_ids": DOCS}), path)
        expected = DOCS
    elif kind == "npy_stream":
        path = tmp_path / "ev.npy"
        write_token_file(path, DOCS)
        expected = DOCS
    elif kind == "npy_2d":
        path = tmp_path / "ev.npy"
        np.save(path, np.array([[1, 2, 3], [4, 5, 6]], dtype=np.int32))
        expected = [[1, 2, 3], [4, 5, 6]]
    else:
        path = tmp_path / "ev.uint16.bin"
        write_token_file(path, DOCS)
        expected = DOCS
    assert _first_ids(_loader(path), len(expected)) == expected


def test_labels_are_next_ids_and_positions_restart_per_document_id(tmp_path):
    path = tmp_path / "packed.jsonl"
    _write_jsonl(path, [{"input_ids": [3, 4, 5, 6, 7], "document_ids": [0, 0, 0, 1, 1]}])
    batch = next(iter(_loader(path, seq_len=8)))
    assert batch["position_ids"][0, :5].tolist() == [0, 1, 2, 0, 1]
    assert batch["document_ids"][0, :5].tolist() == [0, 0, 0, 1, 1]
    # 5 -> 6 crosses a document boundary: not a target
    assert batch["labels"][0, :5].tolist() == [4, 5, -100, 7, -100]


def test_loss_mask_and_unshifted_labels_select_the_targets():
    row = {"input_ids": [3, 4, 5, 6], "loss_mask": [0, 0, 1, 1]}
    assert tokenize_row(row, "tokens", "x:1", None).loss_mask.tolist() == [False, False, True, True]
    row = {"input_ids": [3, 4, 5, 6], "labels": [-100, -100, 5, 6]}
    assert tokenize_row(row, "auto", "x:1", None).loss_mask.tolist() == [False, False, True, True]
    with pytest.raises(BadRowError, match=r"x:1: labels\[2\] is 9 but input_ids\[2\] is 5"):
        tokenize_row({"input_ids": [3, 4, 5], "labels": [-100, 4, 9]}, "tokens", "x:1", None)


def test_bad_token_rows_name_the_line_and_the_fix(tmp_path):
    path = tmp_path / "ev.jsonl"
    _write_jsonl(path, [{"input_ids": [1, 2, 3]}, {"input_ids": [1, 600]}])
    with pytest.raises(DataError, match=r"ev.jsonl:2: input_ids holds the id 600 .* 512 ids"):
        _first_ids(_loader(path, vocab_size=512), 2)
    with pytest.raises(BadRowError, match="negative id"):
        tokenize_row({"input_ids": [1, -3]}, "tokens", "x:1", None)
    with pytest.raises(BadRowError, match="list of integers"):
        tokenize_row({"input_ids": "1 2 3"}, "tokens", "x:1", None)
    with pytest.raises(DataError, match="needs a tokenizer and this run has none"):
        tokenize_row({"text": "hello"}, "auto", "x:1", None)


def test_token_files_explain_a_missing_index_or_dtype(tmp_path):
    np.save(tmp_path / "stream.npy", np.arange(10))
    with pytest.raises(DataError, match=r"stream.idx.npy"):
        _first_ids(_loader(tmp_path / "stream.npy"), 1)
    np.arange(10, dtype=np.uint16).tofile(tmp_path / "raw.bin")
    with pytest.raises(DataError, match=r"names its dtype .* events.uint16.bin"):
        _first_ids(_loader(tmp_path / "raw.bin"), 1)
    write_token_file(tmp_path / "a.npy", DOCS)
    assert file_kind("a.idx.npy") is None  # the sidecar index is not a data file
    assert [f.path for f in resolve_data_files(str(tmp_path / "a*.npy"))] == [str(tmp_path / "a.npy")]


def test_token_rows_resume_exactly(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 300, size=int(rng.integers(3, 12))).tolist() for _ in range(40)]
    _write_jsonl(tmp_path / "a.jsonl", [{"input_ids": d, "document_ids": [0] * 2 + [1] * (len(d) - 2)} for d in docs])
    write_token_file(tmp_path / "b.npy", docs)

    def build():
        data = DataSection(paths=[str(tmp_path / "a.jsonl"), str(tmp_path / "b.npy")], format="tokens",
                           shuffle_buffer=7, pack_buffer=5, num_workers=0)
        return build_sft_dataloader(data, None, seq_len=24, micro_batch_size=2, dp_rank=0, dp_world_size=1, seed=3)

    reference = build()
    it = iter(reference)
    for _ in range(3):
        next(it)
    state = reference.state_dict()
    expected = [next(it) for _ in range(4)]
    resumed = build()
    resumed.load_state_dict(state)
    got = [next(iter(resumed)) for _ in range(4)]
    for a, b in zip(expected, got):
        for key in ("input_ids", "labels", "position_ids", "document_ids"):
            assert torch.equal(a[key], b[key]), key
