"""Preemption: SIGTERM / SIGUSR1 ask the run to checkpoint at the next step boundary and exit 0.

A signal handler only sets a flag (nothing else is safe inside a handler). At each step boundary the ranks
agree on it with one all-reduce (MAX), so a signal that reached any rank stops every rank after the same
step: they save one checkpoint together and leave, and the next start resumes from it.

The agreement runs on a CPU (gloo) group so it never waits for the GPU: the step boundary stays free of
host syncs. Schedulers send SIGTERM before killing (SLURM preemption, Kubernetes pod deletion); SIGUSR1 is
what `#SBATCH --signal=USR1@N` sends before the time limit.

A rank stuck in a collective with a dead peer never reaches the next step boundary (torchrun SIGTERMs the
survivors when one rank dies, then waits 30 s before SIGKILL). So once signalled, a rank that has not reached
the boundary within max(`min_grace_s`, 3 x its slowest step so far) exits on its own (code 143, like an
unhandled SIGTERM) with a message, and the launcher can restart the job promptly.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from types import FrameType

import torch
import torch.distributed as dist

logger = logging.getLogger("posttrain")

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionFlag:
    """Installs handlers for `signals` (main thread only) and answers `stop_requested()` collectively."""

    def __init__(self, signals: tuple[signal.Signals, ...] = PREEMPTION_SIGNALS, *, min_grace_s: float = 5.0) -> None:
        self.received: int | None = None
        self.min_grace_s = min_grace_s
        self._last_boundary: float | None = None
        self._slowest_step_s = 0.0
        self._watchdog: threading.Timer | None = None
        self._busy = 0  # inside legitimately long work (a checkpoint save): the watchdog waits
        self._lock = threading.Lock()
        self._previous: dict[int, object] = {}
        self._group: dist.ProcessGroup | None = None
        self._owner_pid = os.getpid()
        if threading.current_thread() is not threading.main_thread():
            logger.warning("preemption signals are not handled: the trainer is not in the main thread")
            return
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        # The Python-level handler runs only between bytecodes of the main thread: never while it is blocked
        # in a collective. The C-level handler also writes the signal number to this pipe, which a watcher
        # thread reads, so the watchdog starts even then.
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        self._previous_wakeup_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        self._pipe = (read_fd, write_fd)
        threading.Thread(target=self._watch_pipe, args=(read_fd, frozenset(int(s) for s in signals)), daemon=True).start()
        if dist.is_available() and dist.is_initialized():
            # A CPU group keeps the all-reduce off the GPU stream (the default group may be NCCL only).
            self._group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None

    def _watch_pipe(self, read_fd: int, signals: frozenset[int]) -> None:
        while True:
            try:
                data = os.read(read_fd, 64)
            except OSError:
                return
            if not data:
                return
            for signum in data:
                if signum in signals:
                    self._arm_watchdog(signum)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._owner_pid:
            # A forked child (a data-loader worker) inherits this handler; there the signal must act as
            # usual, or the parent's shutdown (SIGTERM, then join) waits on the worker forever.
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = signum
        self._arm_watchdog(signum)

    def _arm_watchdog(self, signum: int) -> None:
        with self._lock:  # called from the handler and from the pipe watcher
            if self._watchdog is None and self._last_boundary is not None:
                grace = max(self.min_grace_s, 3 * self._slowest_step_s)
                self._watchdog = threading.Timer(grace, self._give_up, args=(signum, grace))
                self._watchdog.daemon = True
                self._watchdog.start()

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        """Long but healthy work (a checkpoint save) during which the watchdog never gives up."""
        self._busy += 1
        try:
            yield
        finally:
            self._busy -= 1

    def _give_up(self, signum: int, grace: float) -> None:
        if self._busy:
            self._watchdog = threading.Timer(grace, self._give_up, args=(signum, grace))
            self._watchdog.daemon = True
            self._watchdog.start()
            return
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        print(
            f"rank {rank}: signal {signal.Signals(signum).name} received but the step did not finish within "
            f"{grace:.0f}s (a peer rank is probably gone); exiting so the launcher can restart from the last "
            "checkpoint",
            file=sys.stderr,
            flush=True,
        )
        os._exit(128 + signal.SIGTERM)

    def stop_requested(self) -> bool:
        """True on every rank when any rank has received a preemption signal (collective when distributed)."""
        now = time.monotonic()
        if self._last_boundary is not None:
            self._slowest_step_s = max(self._slowest_step_s, now - self._last_boundary)
        self._last_boundary = now
        if self._watchdog is not None:  # the boundary was reached: saving from here on is legitimate work
            self._watchdog.cancel()
        local = self.received is not None
        if not (dist.is_available() and dist.is_initialized()):
            return local
        flag = torch.tensor([1 if local else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return bool(flag.item())

    def restore(self) -> None:
        """Put back the handlers that were there before."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self._previous:
            signal.set_wakeup_fd(self._previous_wakeup_fd)
            os.close(self._pipe[1])  # ends the watcher thread
        self._previous = {}
