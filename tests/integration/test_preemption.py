"""Operations through `train.py` with real signals and processes: preemption (SIGTERM / SIGUSR1 -> checkpoint
at the next step boundary, exit 0, resume), divergence guards, and the SLURM launch line run locally."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration

SMALL = [
    "--config", "train_configs/debug_sft.toml",
    "--training.seq_len", "128",
    "--training.batch_size", "4",
    "--metrics.log_freq", "1",
    "--metrics.tensorboard", "false",
    "--lr_scheduler.warmup_steps", "2",
    "--checkpoint.export_hf", "false",
]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cmd(out: Path, *extra: str, nproc: int = 1) -> list[str]:
    launcher = [sys.executable, "train.py"]
    if nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                    "--master_port", str(_free_port()), "train.py"]
    return [*launcher, *SMALL, "--job.output_dir", str(out), *extra]


def _run(cmd: list[str], timeout: float = 180, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    assert proc.returncode == 0, f"{' '.join(cmd)}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return proc


def _rows(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _start_and_signal(cmd: list[str], out: Path, send, env: dict | None = None) -> subprocess.CompletedProcess:
    """Start `cmd`, call `send(proc)` once the first step is logged, and wait for it to end."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env=env)
    deadline = time.time() + 120
    while not _rows(out):
        assert proc.poll() is None, f"the run ended before its first step:\n{proc.stdout.read()[-3000:]}"
        assert time.time() < deadline, "no step logged within 120 s"
        time.sleep(0.05)
    send(proc)
    try:
        stdout, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, "")


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def _rank_of(pid: int) -> int | None:
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    for item in env:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


def test_sigterm_checkpoints_exits_zero_and_resume_matches_uninterrupted(tmp_path: Path) -> None:
    steps = ["--training.steps", "40", "--checkpoint.interval", "0", "--checkpoint.keep_last", "0"]
    reference = tmp_path / "reference"
    _run(_cmd(reference, *steps))

    out = tmp_path / "preempted"
    done = _start_and_signal(_cmd(out, *steps), out, lambda p: p.send_signal(signal.SIGTERM))
    assert done.returncode == 0, done.stdout[-3000:]
    stopped_at = [int(d.name.split("-")[1]) for d in (out / "checkpoints").iterdir()]
    assert len(stopped_at) == 1 and stopped_at[0] < 40, f"checkpoints: {stopped_at} (the signal came too late)"
    assert "preempted at step" in done.stdout

    _run(_cmd(out, *steps))
    resumed = {r["step"]: r["loss"] for r in _rows(out)}
    expected = {r["step"]: r["loss"] for r in _rows(reference)}
    assert sorted(resumed) == list(range(1, 41))
    for step, loss in expected.items():
        assert resumed[step] == pytest.approx(loss, rel=1e-6), f"step {step}"


def test_signal_to_one_rank_stops_both_ranks_at_the_same_step(tmp_path: Path) -> None:
    """SIGUSR1 reaches only rank 1; both ranks agree, save one checkpoint (async, on a side gloo group, with
    periodic async saves before it) and exit 0; the next start resumes from it."""
    out = tmp_path / "two_ranks"
    steps = ["--training.steps", "200", "--checkpoint.interval", "3", "--checkpoint.keep_last", "1",
             "--checkpoint.async_save", "true"]

    def signal_rank_1(proc: subprocess.Popen) -> None:
        while not (out / "checkpoints" / "step-3").is_dir():  # periodic async saves overlap training first
            assert proc.poll() is None
            time.sleep(0.02)
        workers = {_rank_of(pid): pid for pid in _children(proc.pid)}
        os.kill(workers[1], signal.SIGUSR1)

    done = _start_and_signal(_cmd(out, *steps, nproc=2), out, signal_rank_1)
    assert done.returncode == 0, done.stdout[-3000:]
    checkpoints = sorted((out / "checkpoints").iterdir())
    assert len(checkpoints) == 1, checkpoints
    step = int(checkpoints[0].name.split("-")[1])
    assert step < 200
    assert [r["step"] for r in _rows(out)][-1] == step
    metadata = json.loads((checkpoints[0] / "checkpoint.json").read_text())
    assert metadata["world_size"] == 2 and {"rank_0.pt", "rank_1.pt"} <= set(metadata["files"])

    _run(_cmd(out, *steps, "--training.steps", str(step + 2), nproc=2))
    assert [r["step"] for r in _rows(out)][-3:] == [step, step + 1, step + 2]


def test_nonfinite_gradients_skip_steps_then_stop_naming_the_last_good_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "diverged"
    cmd = _cmd(out, "--training.steps", "10", "--checkpoint.interval", "1", "--optimizer.lr", "1e30",
               "--lr_scheduler.warmup_steps", "0", "--training.max_consecutive_bad_steps", "3")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode != 0
    rows = _rows(out)
    bad = [r["step"] for r in rows if r["grad_norm"] is None]
    assert len(bad) == 3 and bad == list(range(bad[0], bad[0] + 3)), rows
    assert rows[-1]["skipped_steps"] == 3
    last_good = bad[0] - 1
    assert f"3 consecutive steps up to step {bad[-1]}" in proc.stderr
    assert f"Last good checkpoint: {out / 'checkpoints' / f'step-{last_good}'}" in proc.stderr
    # No checkpoint was written during the bad steps, so the good one was not pruned away.
    assert max((d.name for d in (out / "checkpoints").iterdir()), key=lambda n: int(n.split("-")[1])) == f"step-{last_good}"


def test_slurm_launch_line_runs_two_processes_and_forwards_preemption(tmp_path: Path) -> None:
    """deploy/slurm/launch.sh is what `srun` runs on each node; here it runs directly, as one node of a
    one-node allocation with the variables SLURM sets, and passes SIGUSR1 (time limit) to the trainers, which
    checkpoint and exit 0. (Resuming from that checkpoint through the same launch line was a second torchrun
    launch here, dropped for CI time: a two-rank resume after a signal is test_signal_to_one_rank_..., and the
    requeued launch line resuming is tests/integration/test_slurm.py on a real cluster.)"""
    out = tmp_path / "slurm"
    port = _free_port()
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "CONFIG_FILE": "train_configs/debug_sft.toml",
        "SLURM_JOB_ID": "4242",
        "SLURM_NNODES": "1",
        "SLURM_NODEID": "0",
        "SLURM_JOB_NODELIST": "localhost",
        "NPROC_PER_NODE": "2",
        "RDZV_PORT": str(port),
    }
    launch = [str(REPO / "deploy" / "slurm" / "launch.sh"), *SMALL[2:], "--job.output_dir", str(out)]
    steps = ["--training.steps", "200", "--checkpoint.interval", "0"]
    done = _start_and_signal([*launch, *steps], out, lambda p: p.send_signal(signal.SIGUSR1), env=env)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "--rdzv_backend=c10d" in done.stdout and f"--rdzv_endpoint=localhost:{port}" in done.stdout
    checkpoints = sorted((out / "checkpoints").iterdir())
    assert len(checkpoints) == 1
    step = int(checkpoints[0].name.split("-")[1])
    assert step < 200
    assert [r["step"] for r in _rows(out)][-1] == step
    assert "preempted at step" in done.stdout
