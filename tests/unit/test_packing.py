"""Packing: best fit fills rows; position ids restart; labels shift inside documents only; overlong counted."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sft_data_fakes import EOS, PAD, FakeTokenizer, documents_of, write_jsonl

from posttrain.config.sections import DataSection
from posttrain.datasets.dataloader import build_sft_dataloader
from posttrain.datasets.packing import (
    IGNORE_INDEX,
    PAD_DOCUMENT_ID,
    BestFitBuffer,
    build_row,
    document_labels,
    fit_to_length,
    pack_best_fit,
)
from posttrain.datasets.sft_format import TokenizedSample, tokenize_row


def sample(n: int, *, first: int = 100, trained_from: int = 0) -> TokenizedSample:
    ids = np.arange(first, first + n, dtype=np.int64)
    mask = np.arange(n) >= trained_from
    return TokenizedSample(ids, mask, f"doc{first}")


def test_labels_are_the_next_trained_token_and_never_cross_documents():
    a = sample(4, first=10, trained_from=2)  # tokens 10 11 | 12 13 trained
    b = sample(3, first=20)
    np.testing.assert_array_equal(document_labels(a.input_ids, a.loss_mask), [-100, 12, 13, -100])
    row = build_row([a, b], seq_len=10, pad_id=PAD)
    np.testing.assert_array_equal(row.input_ids, [10, 11, 12, 13, 20, 21, 22, PAD, PAD, PAD])
    np.testing.assert_array_equal(row.labels, [-100, 12, 13, -100, 21, 22, -100, -100, -100, -100])
    np.testing.assert_array_equal(row.position_ids, [0, 1, 2, 3, 0, 1, 2, 0, 1, 2])
    np.testing.assert_array_equal(row.document_ids, [0, 0, 0, 0, 1, 1, 1] + [PAD_DOCUMENT_ID] * 3)
    assert (row.num_documents, row.num_tokens, row.num_targets) == (2, 7, 4)


def test_best_fit_takes_the_longest_document_that_fits():
    lengths = [6, 5, 4, 3, 2]
    pending = [sample(n, first=100 * (i + 1)) for i, n in enumerate(lengths)]
    buffer = BestFitBuffer(capacity=8)

    def refill():
        while pending and not buffer.is_full():
            buffer.add(pending.pop(0))

    rows = []
    while docs := pack_best_fit(buffer, refill, seq_len=10):
        rows.append([len(d) for d in docs])
    assert rows == [[6, 4], [5, 3, 2]]  # both rows exactly full


def test_best_fit_emits_when_nothing_held_fits_and_refills_after_each_take():
    pending = [sample(n, first=100 * (i + 1)) for i, n in enumerate([7, 7, 3, 7])]
    buffer = BestFitBuffer(capacity=2)

    def refill():
        while pending and not buffer.is_full():
            buffer.add(pending.pop(0))

    rows = []
    while docs := pack_best_fit(buffer, refill, seq_len=10):
        rows.append([len(d) for d in docs])
    # row 1: 7 (oldest), refill brings 3, which fits the remaining 3; row 2: 7, nothing fits; row 3: 7
    assert rows == [[7, 3], [7], [7]]


def test_best_fit_buffer_state_round_trip():
    buffer = BestFitBuffer(capacity=4)
    for n in (5, 3, 5):
        buffer.add(sample(n, first=10 * n, trained_from=1))
    restored = BestFitBuffer(capacity=4)
    restored.load_state_dict(buffer.state_dict())
    for space in (5, 5, 4):
        a, b = buffer.take_longest_fitting(space), restored.take_longest_fitting(space)
        np.testing.assert_array_equal(a.input_ids, b.input_ids)
        np.testing.assert_array_equal(a.loss_mask, b.loss_mask)


def test_fit_to_length_truncates_or_drops():
    long = sample(12, trained_from=3)
    cut, outcome = fit_to_length(long, 8, "truncate")
    assert outcome == "truncated" and len(cut) == 8
    assert fit_to_length(long, 8, "drop") == (None, "dropped_overlong")
    assert fit_to_length(sample(12, trained_from=10), 8, "truncate") == (None, "dropped_overlong")
    assert fit_to_length(sample(5, trained_from=5), 8, "truncate") == (None, "dropped_no_target")


def _loader(tmp_path, rows, **data_kw):
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    kw = dict(path=str(path), num_workers=0, shuffle_buffer=0, pack_buffer=8)
    kw.update(data_kw)
    return build_sft_dataloader(
        DataSection(**kw), FakeTokenizer(), seq_len=16, micro_batch_size=2, dp_rank=0, dp_world_size=1, seed=0,
        num_epochs=1,
    )


def test_chat_labels_only_on_assistant_tokens(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}] * 3
    batches = list(_loader(tmp_path, rows))
    tok = FakeTokenizer()
    ids, _ = tok.tokenize_messages(rows[0]["messages"])  # [user, h, i, EOS, asst, y, o, EOS]
    for b in batches:
        for r in range(b["input_ids"].shape[0]):
            inp, lab, doc = b["input_ids"][r].numpy(), b["labels"][r].numpy(), b["document_ids"][r].numpy()
            for d in range(int(doc.max()) + 1):
                sel = doc == d
                np.testing.assert_array_equal(inp[sel], ids)
                expected = [-100, -100, -100, -100, tok.encode("y")[0], tok.encode("o")[0], EOS, -100]
                np.testing.assert_array_equal(lab[sel], expected)
            assert (lab[doc == PAD_DOCUMENT_ID] == IGNORE_INDEX).all()
        # the trained positions travel with the batch (the loss then never counts them on the device)
        flat = b["labels"].reshape(-1)
        assert b["target_index"].tolist() == [i for i in range(flat.numel()) if flat[i] != IGNORE_INDEX]


def test_rows_are_filled_and_stats_add_up(tmp_path):
    rows = [{"text": "a" * n} for n in (3, 9, 5, 11, 2, 6, 4, 7, 1, 8)]  # + EOS each: 4..12 tokens
    loader = _loader(tmp_path, rows)
    batches = list(loader)
    stats = batches[-1]["stats"]
    n_tokens = sum(len(r["text"]) + 1 for r in rows)
    assert stats["samples"] == len(rows) and stats["tokens"] == n_tokens
    assert stats["rows"] * 16 == stats["tokens"] + stats["padding_tokens"]
    assert stats["rows"] <= -(-n_tokens // 16) + 1  # best fit is within one row of perfect here
    docs = [d for b in batches for d in documents_of(b)]
    assert sorted(len(d) for d in docs) == sorted(len(r["text"]) + 1 for r in rows)
    for b in batches:  # position ids restart at 0 at every document
        pos, doc = b["position_ids"].numpy(), b["document_ids"].numpy()
        for r in range(pos.shape[0]):
            for d in np.unique(doc[r]):
                np.testing.assert_array_equal(pos[r][doc[r] == d], np.arange((doc[r] == d).sum()))


@pytest.mark.parametrize("overlong", ["truncate", "drop"])
def test_overlong_samples_are_truncated_or_dropped_and_counted(tmp_path, overlong):
    rows = [{"text": "a" * 30}, {"text": "b" * 4}, {"text": "c" * 20}]
    batches = list(_loader(tmp_path, rows, overlong=overlong))
    stats = batches[-1]["stats"]
    lengths = sorted(len(d) for b in batches for d in documents_of(b))
    if overlong == "truncate":
        assert (stats["truncated"], stats["dropped_overlong"], stats["samples"]) == (2, 0, 3)
        assert lengths == [5, 16, 16]
    else:
        assert (stats["truncated"], stats["dropped_overlong"], stats["samples"]) == (0, 2, 1)
        assert lengths == [5]
    assert stats["rows_read"] == 3


def test_padding_mode_puts_one_sample_per_row(tmp_path):
    rows = [{"text": "a" * n} for n in (3, 2, 5, 1, 4)]
    batches = list(_loader(tmp_path, rows, packing="padding"))
    docs_per_row = [int(b["document_ids"][r].max()) + 1 for b in batches for r in range(2)]
    assert docs_per_row == [1, 1, 1, 1, 1, 0]  # the last batch is filled up with an all-padding row
    stats = batches[-1]["stats"]
    assert stats["rows"] == 5 and stats["padding_tokens"] == 5 * 16 - stats["tokens"]
    last = batches[-1]
    assert (last["labels"][1] == IGNORE_INDEX).all() and (last["document_ids"][1] == PAD_DOCUMENT_ID).all()


ASSETS = Path(__file__).resolve().parents[1] / "assets"


@pytest.fixture(scope="module")
def real_tokenizer():
    if not (ASSETS / "tokenizer" / "tokenizer.json").exists():
        pytest.skip("tests/assets/tokenizer is not there (scripts/make_test_assets.py writes it)")
    from posttrain.datasets.tokenizer import HFTokenizer

    return HFTokenizer(ASSETS / "tokenizer")


@pytest.mark.parametrize("name", ["chat", "sharegpt", "prompt_completion", "text"])
def test_asset_files_pack_with_the_real_tokenizer(real_tokenizer, name):
    path = ASSETS / f"{name}.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    expected = {}
    for row in rows:
        s = tokenize_row(row, "auto", "", real_tokenizer)
        expected[tuple(s.input_ids.tolist())] = document_labels(s.input_ids, s.loss_mask)
    data = DataSection(path=str(path), num_workers=0, shuffle_buffer=16, overlong="drop")
    loader = build_sft_dataloader(
        data, real_tokenizer, seq_len=512, micro_batch_size=4, dp_rank=0, dp_world_size=1, seed=0, num_epochs=1
    )
    batches = list(loader)
    n_docs = 0
    for b in batches:
        for r in range(b["input_ids"].shape[0]):
            inp, lab, doc = b["input_ids"][r].numpy(), b["labels"][r].numpy(), b["document_ids"][r].numpy()
            for d in range(int(doc.max()) + 1):
                np.testing.assert_array_equal(lab[doc == d], expected[tuple(inp[doc == d].tolist())])
                n_docs += 1
    stats = batches[-1]["stats"]
    assert n_docs == stats["samples"] == len(rows) - stats["dropped_overlong"] > 0
    assert 0 < stats["trained_tokens"] <= stats["tokens"]
    if name != "text":
        assert stats["trained_tokens"] < stats["tokens"] - stats["samples"]  # prompts are not trained
