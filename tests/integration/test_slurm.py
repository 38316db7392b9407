"""deploy/slurm/train.sbatch on a real one-node SLURM cluster (slurm-wlm + munge, started by the test):
the debug SFT config on 2 CPU ranks runs to completion; SIGUSR1 to the batch shell (what
`--signal=B:USR1@300` sends before the time limit) and then `scontrol requeue` each make the trainers
checkpoint, the job requeue and the next run resume at that step, ending with the losses of an uninterrupted
run. Skipped, saying why, only where SLURM is not installed (`.ci/run` installs it with apt-get) or the tests
do not run as root (slurmd starts jobs as their user)."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sys
from pathlib import Path

import pytest
from _reaped_runs import free_port
from _slurm_cluster import OneNodeSlurm, unavailable_reason

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration

STEPS = 40
TRAIN_ARGS = [
    "--training.seq_len", "128", "--training.batch_size", "4", "--training.steps", str(STEPS),
    "--metrics.log_freq", "1", "--metrics.tensorboard", "false", "--lr_scheduler.warmup_steps", "2",
    "--checkpoint.export_hf", "false", "--checkpoint.interval", "10", "--checkpoint.keep_last", "0",
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    slurm = OneNodeSlurm(tmp_path_factory.mktemp("slurm"), cpus=4)
    try:
        slurm.start()
        yield slurm
    finally:
        slurm.stop()


def _submit(cluster: OneNodeSlurm, out: Path, *sbatch_args: str, nproc_per_node: int | None = None) -> str:
    """sbatch deploy/slurm/train.sbatch from the repository root, as the README says; returns the job id."""
    env = cluster.env(CONFIG_FILE="train_configs/debug_sft.toml", RDZV_PORT=str(free_port()),
                      PATH=f"{Path(sys.executable).parent}{os.pathsep}{cluster.env()['PATH']}")
    env.pop("NPROC_PER_NODE", None)
    try:
        socket.gethostbyname(cluster.host)  # the rendezvous host train.sbatch derives from the node list
    except OSError:
        env["HEAD_NODE"] = "127.0.0.1"
    if nproc_per_node is not None:
        env["NPROC_PER_NODE"] = str(nproc_per_node)
    cmd = ["sbatch", "--parsable", *sbatch_args, "deploy/slurm/train.sbatch", *TRAIN_ARGS, "--job.output_dir", str(out)]
    return cluster.run(*cmd, env=env, cwd=REPO).stdout.strip().split(";")[0]


def _rows(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [json.loads(line) for line in lines if line.strip()]


def _checkpoint_steps(out: Path) -> list[int]:
    return sorted(int(d.name.split("-")[1]) for d in (out / "checkpoints").glob("step-*") if d.name[5:].isdigit())


def _preempted_steps(log: Path) -> list[int]:
    return [int(step) for step in re.findall(r"preempted at step (\d+);", log.read_text())]


def _world_size(out: Path, step: int) -> int:
    return json.loads((out / "checkpoints" / f"step-{step}" / "checkpoint.json").read_text())["world_size"]


@pytest.fixture(scope="module")
def uninterrupted(cluster: OneNodeSlurm, tmp_path_factory: pytest.TempPathFactory):
    """One job run start to finish with the script's own log path (logs/%x-%j.out in the repository), and the
    rank count from the user's NPROC_PER_NODE (2) on a 1-CPU allocation."""
    out = tmp_path_factory.mktemp("uninterrupted")
    name = "posttrain-slurm-test"
    job_id = _submit(cluster, out, f"--job-name={name}", nproc_per_node=2)
    log = REPO / "logs" / f"{name}-{job_id}.out"
    try:
        yield job_id, out, log
    finally:
        if log.exists():
            shutil.move(log, out / log.name)


def _wait_done(cluster: OneNodeSlurm, job_id: str, log: Path) -> dict[str, str]:
    return cluster.wait_for_job(job_id, "the job to end", lambda j: j["JobState"] not in {
        "PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED"}, log=log)


def test_usr1_and_scontrol_requeue_checkpoint_requeue_and_resume_to_the_uninterrupted_losses(
    cluster: OneNodeSlurm, uninterrupted, tmp_path: Path
) -> None:
    out = tmp_path / "requeued"
    log = tmp_path / "requeued.out"
    # A CPU node, no NPROC_PER_NODE: one rank per task asked for on the submit line.
    job_id = _submit(cluster, out, "--ntasks-per-node=2", f"--output={log}")

    cluster.wait_for_job(job_id, "the first logged step", lambda j: bool(_rows(out)), log=log)
    cluster.run("scancel", "--signal=USR1", "--batch", job_id)
    cluster.wait_for_job(job_id, "the requeue after SIGUSR1", lambda j: int(j["Restarts"]) >= 1, log=log)
    (first_stop,) = _preempted_steps(log)  # the batch shell requeues only after the trainers have exited
    # The second run trains past the step it resumed at (so its signal handlers are in place), then is requeued
    # from outside: SLURM sends SIGTERM to every process of the job and requeues it itself.
    cluster.wait_for_job(job_id, "the resumed run's first step", lambda j: _rows(out)[-1]["step"] > first_stop, log=log)
    cluster.run("scontrol", "requeue", job_id)
    cluster.wait_for_job(job_id, "the requeue after scontrol requeue", lambda j: int(j["Restarts"]) >= 2, log=log)
    info = _wait_done(cluster, job_id, log)

    text = log.read_text()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "2"), text[-3000:]
    assert f"requeueing job {job_id}" in text, text[-3000:]  # after SIGUSR1 the step exited 0: torchrun survived
    stops = _preempted_steps(log)
    assert stops[:1] == [first_stop] and len(stops) in (1, 2), stops
    first = stops[0]
    # scontrol requeue signals every process of the job, torchrun's agent included. The trainers normally still
    # checkpoint at the next step boundary (a second "preempted at step"). KNOWN GAP (README, "SLURM"): on a
    # loaded machine that checkpoint is often missing (about half of the recent 2-core runs): the ranks stall
    # past the 5 s watchdog in the step after the agent dies and exit without it, and the next start resumes
    # from the previous checkpoint. Both outcomes must end at the uninterrupted losses; which one happened is
    # printed, and the watchdog's exit must be the reason when the checkpoint is missing.
    second = stops[1] if len(stops) == 2 else None
    if second is None:
        assert "did not finish within" in text, text[-3000:]
    else:
        assert first < second < STEPS, stops
    print(f"scontrol requeue: {f'checkpointed at step {second}' if second else 'no checkpoint (watchdog exit)'}")
    resumed = sorted({int(s) for s in re.findall(r"resumed from \S+ at step (\d+)", text)})  # every rank says so
    assert resumed == [s for s in (first, second) if s is not None], text[-3000:]
    assert [f"(restart {n})" in text for n in range(3)] == [True] * 3

    rows = _rows(out)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # in order, none twice
    assert {s for s in (first, second, STEPS) if s is not None} <= set(_checkpoint_steps(out))
    assert _world_size(out, first) == 2

    ref_id, ref_out, ref_log = uninterrupted
    assert _wait_done(cluster, ref_id, ref_log)["JobState"] == "COMPLETED"
    expected = {r["step"]: r["loss"] for r in _rows(ref_out)}
    for row in rows:
        assert row["loss"] == pytest.approx(expected[row["step"]], rel=1e-6), f"step {row['step']}"


def test_sbatch_completes_with_metrics_checkpoints_and_its_log(cluster: OneNodeSlurm, uninterrupted) -> None:
    job_id, out, log = uninterrupted
    info = _wait_done(cluster, job_id, log)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "0"), info
    assert log.is_file(), f"no job log at {log} (the logs/ folder must exist before sbatch)"
    assert "ranks=2 " in log.read_text()
    rows = _rows(out)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all({"loss", "lr", "grad_norm", "tokens_per_s"} <= set(r) for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert _checkpoint_steps(out) == [10, 20, 30, 40]
    assert _world_size(out, STEPS) == 2
