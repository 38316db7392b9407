"""Under torchrun the process group's store is scoped per restart attempt (posttrain/parallelisms/distributed.py):
torchrun's agent keeps one store across restarts, and restarted ranks must not read the dead attempt's keys."""

from __future__ import annotations

import socket
from datetime import timedelta

import pytest
import torch.distributed as dist

from posttrain.parallelisms.distributed import restart_scoped_store


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_each_restart_attempt_sees_only_its_own_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    port = _free_port()
    agent_store = dist.TCPStore("127.0.0.1", port, 1, is_master=True, timeout=timedelta(seconds=10))
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    first = restart_scoped_store(2, timedelta(seconds=10))
    first.set("rank_1_address", "dead:1234")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    second = restart_scoped_store(2, timedelta(seconds=10))
    assert not second.check(["rank_1_address"])  # the dead attempt's key is invisible to the restarted one
    assert agent_store.get("posttrain/attempt_0/rank_1_address") == b"dead:1234"


def test_no_scoping_outside_torchrun_agent_stores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    assert restart_scoped_store(2, timedelta(seconds=1)) is None
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")  # e.g. TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
    assert restart_scoped_store(2, timedelta(seconds=1)) is None
