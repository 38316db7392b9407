"""Bounded rows: an overlong JSON line is refused before it is held or parsed (file:line, or skipped and
counted); the first overlong drop and the first message a chat template drops are logged with file:line; a
missing DPO eval file names data.eval_path (issue 18's probe table; a dead data worker: test_run_safety.py)."""

from __future__ import annotations

import io
import json
import logging
import tracemalloc

import pytest
from sft_data_fakes import FakeTokenizer, write_jsonl

import posttrain.datasets.sft_format as sft_format
from posttrain.config.sections import DataSection
from posttrain.datasets.dataloader import build_sft_dataloader
from posttrain.datasets.errors import BadRowError, DataError
from posttrain.datasets.preference import load_preference_pairs
from posttrain.datasets.sources import OverlongLine, _iter_lines
from posttrain.datasets.tokenizer import HFTokenizer

CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def _loader(path, *, seq_len: int = 32, num_workers: int = 0, epochs: int | None = 1, tokenizer=None, **kw):
    data = DataSection(path=str(path), num_workers=num_workers, shuffle_buffer=0, **kw)
    return build_sft_dataloader(
        data, tokenizer or FakeTokenizer(), seq_len=seq_len, micro_batch_size=1, dp_rank=0, dp_world_size=1,
        seed=0, num_epochs=epochs,
    )


class _EndlessLine(io.RawIOBase):
    """`size` bytes of one line with no newline, generated as read: nothing but the reader holds them."""

    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.left)
        buffer[:n] = b"x" * n
        self.left -= n
        return n


def test_an_overlong_line_is_read_through_without_being_held() -> None:
    tracemalloc.start()
    lines = list(_iter_lines(io.BufferedReader(_EndlessLine(64 << 20)), max_bytes=1 << 20))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert lines == [64 << 20] and isinstance(lines[0], OverlongLine)
    assert peak < 8 << 20  # a 64 MiB line never sits in memory


def test_an_overlong_row_names_file_and_line_or_is_skipped_and_counted(tmp_path) -> None:
    path = tmp_path / "d.jsonl"
    big = {"messages": [{"role": "user", "content": "x" * 5000}, {"role": "assistant", "content": "y"}]}
    path.write_text("\n".join(json.dumps(r) for r in (CHAT, big, CHAT)) + "\n")
    with pytest.raises(BadRowError, match=rf"{path}:2: the line is \d+ bytes, over data.max_row_bytes = 1000"):
        list(_loader(path, max_row_bytes=1000))
    batches = list(_loader(path, max_row_bytes=1000, skip_bad_rows=True))
    stats = batches[-1]["stats"]
    assert (stats["rows_read"], stats["skipped_bad_rows"], stats["samples"]) == (3, 1, 2)
    assert list(_loader(path))[-1]["stats"]["skipped_bad_rows"] == 0  # the default limit (8 MiB) keeps the row


def test_the_first_overlong_drop_is_logged_once_with_file_and_line(tmp_path, caplog) -> None:
    long = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a" * 200}]}
    path = write_jsonl(tmp_path / "d.jsonl", [CHAT, long, CHAT, long])
    with caplog.at_level(logging.WARNING):
        stats = list(_loader(path, seq_len=64, overlong="drop"))[-1]["stats"]
    assert stats["dropped_overlong"] == 2
    drops = [r.getMessage() for r in caplog.records if "dropped overlong" in r.getMessage()]
    assert len(drops) == 1 and drops[0].startswith(f"{path}:2:")


def test_a_message_the_chat_template_drops_is_logged_with_file_and_line(tmp_path, tokenizer_dir, caplog, monkeypatch):
    monkeypatch.setattr(sft_format, "_reported_template_drop", False)
    row = {"messages": [{"role": "developer", "content": "always answer in French"},
                        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "bonjour"}]}
    path = write_jsonl(tmp_path / "d.jsonl", [CHAT, row, row])
    with caplog.at_level(logging.WARNING):
        list(_loader(path, seq_len=128, tokenizer=HFTokenizer(tokenizer_dir)))
    dropped = [r.getMessage() for r in caplog.records if "chat template" in r.getMessage()]
    assert len(dropped) == 1 and dropped[0].startswith(f"{path}:2: messages[0] (role 'developer')")


def test_a_missing_dpo_eval_file_names_data_eval_path(tmp_path, tokenizer_dir) -> None:
    with pytest.raises(DataError, match=r"^data.eval_path = .*missing.jsonl"):
        load_preference_pairs(str(tmp_path / "missing.jsonl"), HFTokenizer(tokenizer_dir), seq_len=64,
                              field="data.eval_path")
