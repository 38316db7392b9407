"""A real one-node SLURM cluster for tests: munged, slurmctld and slurmd (Debian's `slurm-wlm` + `munge`)
started in the foreground from a munge key and a slurm.conf written under a temporary folder, on free ports,
without systemd or cgroups. Client commands find it through SLURM_CONF. `stop()` cancels every job, then ends
each daemon it started by pid, and kills by pid any process still carrying the cluster's tag (slurmstepd,
job processes).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from _process_tags import TAG_VAR, kill_tagged
from _reaped_runs import free_port

COMMANDS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo")
_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


def unavailable_reason() -> str | None:
    """Why a one-node cluster cannot run here, or None."""
    missing = [c for c in COMMANDS if shutil.which(c, path=_SEARCH_PATH) is None]
    if missing:
        return f"SLURM is not installed (missing {', '.join(missing)}; `apt-get install slurm-wlm munge`)"
    if os.geteuid() != 0:
        return "the one-node SLURM cluster needs root: slurmd starts every job as its user"
    return None


def _tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.is_file() else f"({path} is missing)"


class OneNodeSlurm:
    def __init__(self, root: Path, *, cpus: int) -> None:
        self.root = root
        self.cpus = cpus
        self.host = socket.gethostname().split(".")[0]
        self.tag = f"slurm-{uuid.uuid4().hex}"
        self.conf = root / "slurm.conf"
        self.munge_socket = root / "munge" / "munge.socket"
        self._daemons: list[tuple[str, subprocess.Popen]] = []

    def env(self, **extra: str) -> dict[str, str]:
        """The environment for client commands and jobs: SLURM_CONF, the cluster's process tag, `extra`."""
        return {**os.environ, "PATH": _SEARCH_PATH, "SLURM_CONF": str(self.conf), TAG_VAR: self.tag, **extra}

    def run(self, *cmd: str, env: dict[str, str] | None = None, cwd: Path | None = None,
            check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, env=env or self.env(), cwd=cwd, capture_output=True, text=True, timeout=60,
                              check=False)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()}{self.logs()}")
        return proc

    # ------------------------------------------------------------------ start / stop
    def start(self) -> None:
        (self.root / "munge").mkdir(parents=True, mode=0o700)
        for name in ("state", "spool", "log"):
            (self.root / name).mkdir()
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        munge_dir = self.root / "munge"
        self._spawn("munged", "--foreground", "--force", f"--socket={self.munge_socket}", f"--key-file={key}",
                    f"--pid-file={munge_dir / 'munged.pid'}", f"--seed-file={munge_dir / 'munged.seed'}",
                    f"--log-file={self.root / 'log' / 'munged.log'}")
        self._wait("munged to open its socket", self.munge_socket.exists)
        self.conf.write_text(self._slurm_conf())
        self._spawn("slurmctld", "-D", "-i", "-f", str(self.conf))
        self._wait("slurmctld to answer", lambda: "is UP" in self.run("scontrol", "ping", check=False).stdout)
        self._spawn("slurmd", "-D", "-N", self.host, "-f", str(self.conf))
        self._wait("the node to be idle",
                   lambda: self.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.strip() == "idle")

    def _slurm_conf(self) -> str:
        r = self.root
        return f"""\
ClusterName=posttrain-test
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: also how long a requeued job waits before it may start again (default 120 s, minimum 5)
AuthInfo=socket={self.munge_socket},cred_expire=5
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r / 'slurmd.pid'}
SlurmctldLogFile={r / 'log' / 'slurmctld.log'}
SlurmdLogFile={r / 'log' / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
# A requeued job becomes eligible again only after cred_expire; the main scheduling loop then starts it on its
# next pass, every 60 s by default (the requeue test spent about 80 s of its 137 s waiting for those passes).
SchedulerParameters=sched_interval=1
ReturnToService=2
JobRequeue=1
# The configured CPU count, whatever the machine has: two 2-rank jobs run side by side even on 2 cores.
SlurmdParameters=config_overrides
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP
"""

    def _spawn(self, name: str, *args: str) -> None:
        log = open(self.root / "log" / f"{name}.out", "w")  # noqa: SIM115 -- the daemon writes it until stop()
        proc = subprocess.Popen([shutil.which(name, path=_SEARCH_PATH), *args], env=self.env(), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self._daemons.append((name, proc))

    def _wait(self, what: str, ready: Callable[[], bool], timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while not ready():
            for name, proc in self._daemons:
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited {proc.returncode} while waiting for {what}{self.logs()}")
            if time.time() > deadline:
                raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}{self.logs()}")
            time.sleep(0.1)

    def stop(self) -> None:
        if any(proc.poll() is None for name, proc in self._daemons if name == "slurmctld"):
            jobs = self.run("squeue", "-h", "-o", "%i", check=False).stdout.split()
            if jobs:
                self.run("scancel", *jobs, check=False)
                deadline = time.time() + 30
                while self.run("squeue", "-h", "-o", "%i", check=False).stdout.strip() and time.time() < deadline:
                    time.sleep(0.2)
        for _, proc in reversed(self._daemons):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self._daemons.clear()
        kill_tagged(self.tag)

    # ------------------------------------------------------------------ jobs
    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(item.split("=", 1) for item in out.split() if "=" in item)

    def wait_for_job(self, job_id: str, what: str, ready: Callable[[dict[str, str]], bool],
                     timeout: float = 240, log: Path | None = None) -> dict[str, str]:
        deadline = time.time() + timeout
        while not ready(info := self.job(job_id)):
            if time.time() > deadline:
                job_log = f"\njob log:\n{_tail(log)}" if log else ""
                raise AssertionError(f"job {job_id}: timed out after {timeout:.0f} s waiting for {what}; "
                                     f"state {info.get('JobState')}, restarts {info.get('Restarts')}{job_log}")
            time.sleep(0.2)
        return info

    def logs(self) -> str:
        return "".join(f"\n--- {p.name}:\n{_tail(p, 1500)}" for p in sorted((self.root / "log").glob("*")))
