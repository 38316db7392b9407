"""Bad input stops with one sentence naming what to fix (file:line, field, setting), or is skipped and counted."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import time

import pytest
import torch
from sft_data_fakes import FakeTokenizer, write_jsonl

from posttrain.config.sections import DataSection
from posttrain.datasets.dataloader import build_sft_dataloader
from posttrain.datasets.errors import BadRowError, DataError

CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def _run(path, *, seq_len: int = 32, num_workers: int = 0, batches: int | None = None, **kw):
    data = DataSection(path=str(path), num_workers=num_workers, shuffle_buffer=0, **kw)
    loader = build_sft_dataloader(
        data, FakeTokenizer(), seq_len=seq_len, micro_batch_size=1, dp_rank=0, dp_world_size=1, seed=0,
        num_epochs=1 if batches is None else None,
    )
    return list(loader) if batches is None else [next(loader) for _ in range(batches)]


def _with_bad_line(tmp_path):
    path = tmp_path / "d.jsonl"
    good = json.dumps(CHAT) + "\n"
    path.write_text(good + good + '{"messages": [oops\n' + good)
    return path


@pytest.mark.parametrize("num_workers", [0, 1])
def test_malformed_json_line_names_file_and_line(tmp_path, num_workers):
    path = _with_bad_line(tmp_path)
    with pytest.raises(DataError) as err:
        _run(path, num_workers=num_workers)
    message = str(err.value)
    assert message.startswith(f"{path}:3: malformed JSON") and "data.skip_bad_rows = true" in message
    assert "Traceback" not in message  # a worker's error arrives as the one sentence


def test_skip_bad_rows_skips_counts_and_logs(tmp_path, caplog):
    path = _with_bad_line(tmp_path)
    with caplog.at_level(logging.WARNING, logger="posttrain.datasets.sft_dataset"):
        batches = _run(path, skip_bad_rows=True)
    stats = batches[-1]["stats"]
    assert (stats["rows_read"], stats["skipped_bad_rows"], stats["samples"]) == (4, 1, 3)
    assert f"{path}:3" in caplog.text


@pytest.mark.parametrize(
    ("row", "fmt", "expected"),
    [
        ({"msgs": []}, "chat", "has no 'messages' field, which data.format = chat needs"),
        ({"foo": 1}, "auto",
         r"has none of the fields messages, conversations, prompt\+completion, instruction\+output or text"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "auto", r"messages\[0\].role is 'bot', expected one of"),
        ({"messages": [{"role": "user"}]}, "auto", r"messages\[0\] \(user\) has no 'content' field"),
        ({"conversations": [{"from": "alien", "value": "x"}]}, "auto", r"conversations\[0\].from is 'alien'"),
        ({"prompt": "p"}, "prompt_completion", "has no 'completion' field"),
        ({"chosen": "a", "rejected": "b"}, "auto", "preference row"),
        ({"text": 3}, "auto", "text must be a string"),
    ],
)
def test_invalid_rows_name_file_line_and_field(tmp_path, row, fmt, expected):
    path = write_jsonl(tmp_path / "d.jsonl", [row])
    with pytest.raises(BadRowError, match=rf"^{tmp_path}/d.jsonl:1: .*{expected}"):
        _run(path, format=fmt)


def test_sharegpt_roles_are_mapped(tmp_path):
    row = {"system": "be nice", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    path = write_jsonl(tmp_path / "d.jsonl", [row])
    batch = _run(path)[0]
    tok = FakeTokenizer()
    ids, _ = tok.tokenize_messages([
        {"role": "system", "content": "be nice"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
    ])
    assert batch["input_ids"][0, : len(ids)].tolist() == ids


def test_empty_dataset(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(DataError, match=r"empty.jsonl\) has no rows; check the data files"):
        _run(path)


def test_seq_len_too_small_for_every_prompt(tmp_path):
    rows = [{"prompt": "p" * 40, "completion": "c"}] * 5
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError, match=r"no usable sample in the first 5 rows .* seq_len = 16: 5 longer than seq_len"
                       r".*first trained token at position 40.*raise training.seq_len"):
        _run(path, seq_len=16, batches=1)


def test_missing_file_glob_and_extension(tmp_path):
    with pytest.raises(DataError, match=r"data.path = '.*nope.jsonl': data file not found"):
        _run(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match=r"matches no .jsonl, .json, .parquet or .arrow files"):
        _run(tmp_path / "*.jsonl")
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type; use .jsonl"):
        _run(tmp_path / "d.csv")


def test_unreadable_url(tmp_path):
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/d.jsonl"
    with pytest.raises(DataError, match=rf"data.path = '{url}' could not be read .*check the URL"):
        _run(url)


def test_fewer_rows_than_shards(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [CHAT])
    data = DataSection(path=str(path), num_workers=0, shuffle_buffer=0)
    loader = build_sft_dataloader(
        data, FakeTokenizer(), seq_len=32, micro_batch_size=1, dp_rank=1, dp_world_size=2, seed=0
    )
    with pytest.raises(DataError, match="has only 1 rows for 2 shards"):
        next(loader)


def test_no_assistant_turn_is_counted_not_silently_dropped(tmp_path):
    rows = [CHAT, {"messages": [{"role": "user", "content": "only a question"}]}, CHAT]
    stats = _run(write_jsonl(tmp_path / "d.jsonl", rows))[-1]["stats"]
    assert (stats["rows_read"], stats["dropped_no_target"], stats["samples"]) == (3, 1, 2)


def test_a_data_error_from_a_worker_lets_the_program_exit(tmp_path):
    """Data workers ignore SIGTERM (preemption is the trainer's business), so multiprocessing's exit hook
    (terminate, then join) once waited forever on the worker of a loader still alive when the error ended the
    program; a CI run hung there after every test had passed."""
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    path = _with_bad_line(tmp_path)
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_bad_input import _run
        try:
            _run({str(path)!r}, num_workers=1)
        except Exception as e:
            kept = e  # the traceback keeps the loader (and its worker) alive until exit
            print("raised", type(e).__name__)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "raised BadRowError" in proc.stdout, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]


def _one_worker_loader(tmp_path):
    """A loader with one data worker, its first batch taken (the worker is running)."""
    path = write_jsonl(tmp_path / "d.jsonl", [CHAT] * 50)
    data = DataSection(path=str(path), num_workers=1, shuffle_buffer=0)
    loader = build_sft_dataloader(data, FakeTokenizer(), seq_len=32, micro_batch_size=1, dp_rank=0, dp_world_size=1,
                                  seed=0, num_epochs=None)
    next(loader)
    return loader


class _ReceiveFails:
    """Stands in for torch's iterator at the failing receive (the fd transfer's peer is gone), with its workers."""

    def __init__(self, torch_iterator) -> None:
        self.torch_iterator = torch_iterator
        self._workers = torch_iterator._workers

    def __next__(self):
        raise ConnectionResetError(104, "Connection reset by peer")

    def _shutdown_workers(self) -> None:
        self.torch_iterator._shutdown_workers()


def test_a_worker_killed_while_handing_over_a_batch_is_named_in_one_line(tmp_path):
    """A data worker killed mid-transfer makes the receive fail (the batch's shared memory travels as file
    descriptors over a socket) before torch sees the death: the same one line as torch's own report, not a
    ConnectionResetError traceback (CI caught it once under load). The failing receive is injected; the killed
    worker is real."""
    loader = _one_worker_loader(tmp_path)
    torch_iterator = loader._iterator
    (worker,) = torch_iterator._workers
    # the race being reproduced: the receive fails before torch's SIGCHLD handler reports the death (which it
    # would otherwise raise at any later point of this test, asynchronously)
    torch._C._remove_worker_pids(id(torch_iterator))
    torch_iterator._worker_pids_set = False
    os.kill(worker.pid, signal.SIGKILL)
    worker.join(timeout=30)
    loader._iterator = _ReceiveFails(torch_iterator)
    with pytest.raises(DataError, match=r"a data worker reading .* died \(exit code -9 while handing over a batch"):
        next(loader)
    assert loader._iterator is None  # the workers were stopped


def test_a_receive_error_with_every_worker_alive_is_not_called_a_death(tmp_path):
    loader = _one_worker_loader(tmp_path)
    torch_iterator = loader._iterator
    loader._iterator = _ReceiveFails(torch_iterator)
    try:
        with pytest.raises(ConnectionResetError):
            next(loader)
    finally:
        torch_iterator._shutdown_workers()


class _SlowToReap:
    """A killed worker whose death waitpid reports only after a few polls (the kernel still tearing it down)."""

    def __init__(self, polls_alive: int) -> None:
        self.polls_alive = polls_alive
        self.exitcode = None

    def is_alive(self) -> bool:
        self.polls_alive -= 1
        if self.polls_alive < 0:
            self.exitcode = -9
            return False
        return True


def test_a_worker_death_seen_late_is_still_named_and_a_live_worker_is_not_waited_for_long():
    from posttrain.datasets.dataloader import exited_worker_codes

    assert exited_worker_codes([_SlowToReap(polls_alive=5)], wait_s=10.0) == [-9]
    start = time.monotonic()
    assert exited_worker_codes([_SlowToReap(polls_alive=10**9)], wait_s=0.2) == []
    assert time.monotonic() - start < 5.0
    assert exited_worker_codes([], wait_s=10.0) == []


class _WorkerKilledDuringReceive(_ReceiveFails):
    """The receive fails at the instant the worker is killed, before anyone has waited for it to exit."""

    def __next__(self):
        os.kill(self._workers[0].pid, signal.SIGKILL)
        raise EOFError


def test_a_worker_killed_during_the_receive_is_named_though_not_yet_reaped(tmp_path):
    loader = _one_worker_loader(tmp_path)
    torch_iterator = loader._iterator
    torch._C._remove_worker_pids(id(torch_iterator))  # as above: only the failing receive reports it
    torch_iterator._worker_pids_set = False
    loader._iterator = _WorkerKilledDuringReceive(torch_iterator)
    with pytest.raises(DataError, match=r"died \(exit code -9 while handing over a batch: EOFError"):
        next(loader)
