"""Save, find and load training checkpoints: `<output_dir>/checkpoints/step-N/`.

One checkpoint folder holds three kinds of state, chosen by each entry's type in the state dict:

- distributed (`ModelOptimizerState`, or a bare `nn.Module`): written with `torch.distributed.checkpoint`
  (`.metadata` + `__R_0.distcp`), global tensors plus shard layout, so it loads under another
  parallel layout or world size;
- shared (an `LRScheduler`, or any value wrapped in `Shared(...)`): the same on every rank, written once by
  rank 0 to `shared.pt` and read by every rank;
- per-rank (everything else: dataloader position, `RNGState`, plain values): each rank's own
  `rank_R.pt`. It is restored only when the world size is unchanged (a data position saved under 4 ranks
  means nothing under 2); otherwise it is skipped with a warning.

A checkpoint is written as `step-N.tmp/` and renamed to `step-N/` only after every rank has finished and
rank 0 has written the completion marker `checkpoint.json`, so a crash mid-save leaves the previous
checkpoint the latest loadable one. The marker's manifest holds every file's size and SHA-256 (hashed while
written); at resume a checkpoint that fails any check (manifest, DCP, torch.load) is reported by folder and
file and the previous one is tried. When checkpoints exist and none loads, the run refuses to start (nothing
is pruned or overwritten).

Per-rank and shared state are read with `torch.load(weights_only=True)` (`safe_load.py`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import pickle
import re
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from posttrain.checkpoint.hashed_write import HashingFileSystemWriter, write_hashed
from posttrain.checkpoint.manifest import HashVerifier, build_manifest, size_problems
from posttrain.checkpoint.model_state import ModelOptimizerState
from posttrain.checkpoint.safe_load import load_state_file
from posttrain.config.sections import CheckpointSection

logger = logging.getLogger(__name__)

MARKER_FILE = "checkpoint.json"
SHARED_FILE = "shared.pt"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_STALE_TMP_DIR = re.compile(r"^step-\d+\.(tmp|replaced)$")
_ENOSPC_TEXT = "No space left on device"
# dcp.save/load warn on every single-process call that no process group is initialized; that is intended.
_NO_DIST_WARNING = "torch.distributed is disabled, unavailable or uninitialized"


def rank_file(rank: int) -> str:
    return f"rank_{rank}.pt"


class Shared:
    """Marks a checkpoint entry that is identical on every rank: rank 0 writes it, every rank reads it,
    and it survives a change of world size. A wrapped value without `load_state_dict` is replaced in
    `.obj` on load."""

    def __init__(self, obj: Any) -> None:
        self.obj = obj


def _kind(obj: Any) -> str:
    if isinstance(obj, (ModelOptimizerState, torch.nn.Module)):
        return "distributed"
    if isinstance(obj, (Shared, torch.optim.lr_scheduler.LRScheduler)):
        return "shared"
    return "per_rank"


def _capture(obj: Any) -> Any:
    if isinstance(obj, Shared):
        obj = obj.obj
    state_dict = getattr(obj, "state_dict", None)
    return state_dict() if callable(state_dict) else obj


def _restore(state: dict[str, Any], name: str, saved: Any) -> None:
    """Load `saved` into `state[name]` in place, or replace a plain value by the saved one."""
    obj = state[name]
    target = obj.obj if isinstance(obj, Shared) else obj
    load_state_dict = getattr(target, "load_state_dict", None)
    if callable(load_state_dict):
        load_state_dict(saved)
    elif isinstance(obj, Shared):
        obj.obj = saved
    else:
        state[name] = saved


class CheckpointManager:
    """Checkpoints of one run under `<output_dir>/checkpoints/`.

    Call `save` and `load` on every rank (they are collective under torch.distributed); `latest_step`
    only reads the folder. Whether to resume at all (`cfg.resume`) and when to save (`should_save`) are the
    caller's decisions.
    """

    def __init__(
        self,
        cfg: CheckpointSection,
        output_dir: str | Path,
        *,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        self.cfg = cfg
        self.folder = Path(output_dir) / "checkpoints"
        self.process_group = process_group
        self._pending: tuple[int, Any, Callable[[], None]] | None = None  # async save in flight
        self._async_pg: dist.ProcessGroup | None = None

    # -- where things are ---------------------------------------------------------------------------

    @property
    def _distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    @property
    def rank(self) -> int:
        return dist.get_rank(self.process_group) if self._distributed else 0

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.process_group) if self._distributed else 1

    def step_dir(self, step: int) -> Path:
        return self.folder / f"step-{step}"

    def complete_steps(self) -> list[int]:
        """Steps with a complete checkpoint (a `step-N` folder holding the completion marker), ascending.
        `step-N.tmp` folders of unfinished saves and folders without the marker are not checkpoints."""
        if not self.folder.is_dir():
            return []
        steps = []
        for entry in self.folder.iterdir():
            match = _STEP_DIR.match(entry.name)
            if match and entry.is_dir() and (entry / MARKER_FILE).is_file():
                steps.append(int(match.group(1)))
        return sorted(steps)

    def latest_step(self) -> int | None:
        """The step of the latest complete checkpoint, or None when there is none."""
        steps = self.complete_steps()
        return steps[-1] if steps else None

    def should_save(self, step: int, last_step: int) -> bool:
        """Whether `step` is a checkpoint step: every `cfg.interval` steps, and the last one if `cfg.save_final`."""
        if self.cfg.interval > 0 and step % self.cfg.interval == 0:
            return True
        return self.cfg.save_final and step == last_step

    # -- save -----------------------------------------------------------------------------------------

    def save(
        self,
        step: int,
        state: dict[str, Any],
        *,
        layout: dict[str, Any] | None = None,
        fingerprint: dict[str, Any] | None = None,
    ) -> Path:
        """Write `state` as checkpoint `step` and return its folder; then delete all but the last
        `cfg.keep_last` complete checkpoints (0 keeps all). Saving a step that exists replaces it.

        `layout` (JSON-able, e.g. which data-parallel rank each rank is) is kept in the metadata so a
        resume under another layout can pick the per-rank file it needs (see `load(source_rank=...)`).
        `fingerprint` (JSON-able: what the run was configured with) is kept in the metadata for the resume
        check (`load(before_load=...)`). A full disk raises `SystemExit` naming the file."""
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"checkpoint step must be a non-negative int, got {step!r}")
        self.wait()  # at most one save in flight
        begin = time.perf_counter()
        kinds = {name: _kind(obj) for name, obj in state.items()}
        tmp_dir = self.folder / f"step-{step}.tmp"
        digests: dict[str, str] = {}  # SHA-256 of every file this rank writes, computed while writing

        with _disk_errors_named(tmp_dir):
            if self.rank == 0:
                if tmp_dir.exists():  # left by a save of this step that crashed
                    shutil.rmtree(tmp_dir)
                tmp_dir.mkdir(parents=True)
            self._barrier()

            per_rank = {name: _capture(obj) for name, obj in state.items() if kinds[name] == "per_rank"}
            write_hashed(per_rank, tmp_dir / rank_file(self.rank), digests)
            if self.rank == 0:  # written now: with an async save, training changes these before the save ends
                shared = {name: _capture(obj) for name, obj in state.items() if kinds[name] == "shared"}
                write_hashed(shared, tmp_dir / SHARED_FILE, digests)

            distributed = {
                name: ModelOptimizerState(obj) if isinstance(obj, torch.nn.Module) else obj
                for name, obj in state.items()
                if kinds[name] == "distributed"
            }
            final_dir = self.step_dir(step)
            finish = functools.partial(self._finish_save, step, tmp_dir, kinds, layout, fingerprint, digests, begin)
            writer = HashingFileSystemWriter(tmp_dir, digests)
            if distributed and self.cfg.async_save:
                # Staged to CPU copies now; written by a background thread while training goes on. The
                # completion marker (and so the checkpoint) appears only in `wait()`, after every rank is done.
                if not self._distributed:  # the background thread warns too, outside any catch_warnings block
                    warnings.filterwarnings("ignore", message=_NO_DIST_WARNING)
                with _ignoring_no_dist_warning():
                    future = dcp.async_save(distributed, storage_writer=writer, process_group=self._async_group())
                self._pending = (step, future, finish)
                return final_dir
            if distributed:
                with _ignoring_no_dist_warning():
                    dcp.save(distributed, storage_writer=writer, process_group=self.process_group)
            finish()
        return final_dir

    def _async_group(self) -> dist.ProcessGroup | None:
        """A gloo group of this manager's ranks used only by the background writer: its collectives run while
        training uses the main group, and two threads on one group would interleave their collectives."""
        if not self._distributed:
            return None
        if self._async_pg is None:
            ranks = dist.get_process_group_ranks(self.process_group or dist.group.WORLD)
            self._async_pg = dist.new_group(ranks, backend="gloo", use_local_synchronization=True)
        return self._async_pg

    @property
    def pending_step(self) -> int | None:
        """The step of the asynchronous save still in flight, if any."""
        return None if self._pending is None else self._pending[0]

    def wait(self) -> None:
        """Complete the asynchronous save in flight, if any (collective): its checkpoint is then published."""
        if self._pending is None:
            return
        step, future, finish = self._pending
        self._pending = None
        result = getattr(future, "upload_completion", future)  # torch returns an AsyncSaveResponse with a stager
        with _disk_errors_named(self.folder / f"step-{step}.tmp"):
            result.result()
            finish()

    def _finish_save(
        self,
        step: int,
        tmp_dir: Path,
        kinds: dict[str, str],
        layout: dict[str, Any] | None,
        fingerprint: dict[str, Any] | None,
        digests: dict[str, str],
        begin: float,
    ) -> None:
        self._barrier()  # every rank's files are on disk
        if self._distributed:
            every_rank: list[dict[str, str] | None] = [None] * self.world_size
            dist.all_gather_object(every_rank, digests, group=self.process_group)
            digests = {name: digest for d in every_rank if d for name, digest in d.items()}
        final_dir = self.step_dir(step)
        if self.rank == 0:
            metadata = {
                "step": step,
                "world_size": self.world_size,
                "entries": kinds,
                "torch_version": torch.__version__,
                "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "layout": layout,
                "fingerprint": fingerprint,
                "files": build_manifest(tmp_dir, digests, exclude=(MARKER_FILE,)),
            }
            _write_durably(tmp_dir / MARKER_FILE, json.dumps(metadata, indent=2) + "\n")
            self._publish(tmp_dir, final_dir)
            self._prune(keep=step)
        self._barrier()
        if self.rank == 0:
            logger.info("saved checkpoint %s in %.1f s", final_dir, time.perf_counter() - begin)

    def _publish(self, tmp_dir: Path, final_dir: Path) -> None:
        """Make the finished `tmp_dir` visible as `final_dir`, replacing an older save of the same step."""
        if final_dir.exists():
            replaced = final_dir.with_name(final_dir.name + ".replaced")
            if replaced.exists():
                shutil.rmtree(replaced)
            os.replace(final_dir, replaced)
            os.replace(tmp_dir, final_dir)
            shutil.rmtree(replaced)
        else:
            os.replace(tmp_dir, final_dir)

    def _prune(self, keep: int) -> None:
        """Delete complete checkpoints beyond the last `keep_last`, and leftovers of crashed saves."""
        for entry in self.folder.iterdir():
            if _STALE_TMP_DIR.match(entry.name) and entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
        if self.cfg.keep_last <= 0:
            return
        steps = self.complete_steps()
        for old in steps[: -self.cfg.keep_last]:
            if old != keep:
                shutil.rmtree(self.step_dir(old), ignore_errors=True)

    # -- load -----------------------------------------------------------------------------------------

    def metadata(self, step: int) -> dict[str, Any]:
        """The metadata (`checkpoint.json`) of complete checkpoint `step`."""
        return json.loads((self.step_dir(step) / MARKER_FILE).read_text())

    def step_folders(self) -> list[int]:
        """Steps of every `step-N` folder, complete or not, ascending (unfinished `.tmp` saves excluded)."""
        if not self.folder.is_dir():
            return []
        return sorted(int(m.group(1)) for e in self.folder.iterdir() if (m := _STEP_DIR.match(e.name)) and e.is_dir())

    def load(
        self,
        state: dict[str, Any],
        step: int | None = None,
        *,
        source_rank: Callable[[dict[str, Any]], int] | None = None,
        before_load: Callable[[dict[str, Any]], Any] | None = None,
    ) -> int | None:
        """Load checkpoint `step` (default: the newest one that loads) into `state`'s objects in place and
        return its step, or return None when there is no checkpoint at all.

        Without `step`, a checkpoint that fails to load (manifest, DCP or torch.load) is reported by folder and
        file and the previous one is tried; when checkpoints exist and none loads, `SystemExit` (nothing is
        deleted). `source_rank(metadata)` names the saved rank whose per-rank file this rank reads (default: its
        own rank when the world size is unchanged); it may raise to refuse a layout it cannot follow.
        `before_load(metadata)` is called before anything is read, with the checkpoint's metadata: it may raise
        to refuse the checkpoint (e.g. a changed model), or return names of `state` entries not to restore.
        Objects with `load_state_dict` are loaded in place; a plain value (say `state["rng"] = None`) is
        replaced in `state` by the saved one. Every name in `state` must be in the checkpoint; the
        checkpoint may hold more (load only `{"model": ModelOptimizerState(model)}` to get the weights).
        """
        if step is not None:
            if step not in self.complete_steps():
                available = ", ".join(str(s) for s in self.complete_steps()) or "none"
                raise FileNotFoundError(
                    f"no complete checkpoint for step {step} in {self.folder} (complete steps: {available})"
                )
            problem = self._try_load(step, state, source_rank, before_load)
            if problem is not None:
                raise SystemExit(f"checkpoint {self.step_dir(step)} cannot be loaded: {problem}")
            return step
        if self.rank == 0:
            self._report_unfinished_saves()
        candidates = self._agreed(self.step_folders())
        for candidate in reversed(candidates):
            problem = self._try_load(candidate, state, source_rank, before_load)
            if problem is None:
                return candidate
            if self.rank == 0:
                logger.error("checkpoint %s is damaged and is skipped: %s", self.step_dir(candidate), problem)
        if candidates:
            raise SystemExit(
                f"none of the {len(candidates)} checkpoints in {self.folder} can be loaded (each reported above); "
                "refusing to start from scratch, and nothing was deleted. Restore a checkpoint into that folder, "
                "or move it away (or pass --checkpoint.resume false --checkpoint.overwrite true) to start a new run."
            )
        return None

    def _try_load(
        self,
        step: int,
        state: dict[str, Any],
        source_rank: Callable[[dict[str, Any]], int] | None,
        before_load: Callable[[dict[str, Any]], Any] | None,
    ) -> str | None:
        """Load checkpoint `step` into `state` on every rank; None when it loaded everywhere, else what is wrong
        (one line naming the file; the same on every rank). `state` may be partly overwritten on failure."""
        directory = self.step_dir(step)
        problem: str | None = None
        metadata: dict[str, Any] = {}
        try:
            metadata = json.loads((directory / MARKER_FILE).read_text())
        except FileNotFoundError:
            problem = f"it has no {MARKER_FILE} (an unfinished or damaged save)"
        except (OSError, ValueError) as err:
            problem = f"{MARKER_FILE} is unreadable ({err})"
        manifest = metadata.get("files", {})
        if problem is None:
            problem = "; ".join(size_problems(directory, manifest)) or None
        problem = self._first_problem(problem)
        if problem is not None:
            return problem

        skip = set(before_load(metadata) or ()) if before_load is not None else set()
        names = sorted(manifest)
        verifier = HashVerifier(directory, manifest, names[self.rank :: self.world_size])  # while DCP reads
        try:
            self._read(directory, metadata, {k: v for k, v in state.items() if k not in skip}, state, source_rank)
        except (CheckpointException, OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as err:
            problem = _one_line(err, directory)
        hash_problems = verifier.problems()
        if hash_problems:  # names the damaged file, where a read error often does not
            problem = "; ".join(hash_problems)
        return self._first_problem(problem)

    def _read(
        self,
        directory: Path,
        metadata: dict[str, Any],
        wanted: dict[str, Any],
        state: dict[str, Any],
        source_rank: Callable[[dict[str, Any]], int] | None,
    ) -> None:
        saved_kinds: dict[str, str] = metadata["entries"]
        kinds = {name: _kind(obj) for name, obj in wanted.items()}
        for name, kind in kinds.items():
            if saved_kinds.get(name) != kind:
                where = f"saved as {saved_kinds[name]}" if name in saved_kinds else "absent"
                raise KeyError(
                    f"checkpoint {directory} cannot restore {kind} entry {name!r}: it is {where} there "
                    f"(entries: {saved_kinds}). Pass the same kinds of objects under the same names as at save."
                )

        distributed = {
            name: ModelOptimizerState(obj) if isinstance(obj, torch.nn.Module) else obj
            for name, obj in wanted.items()
            if kinds[name] == "distributed"
        }
        if distributed:
            with _ignoring_no_dist_warning():
                dcp.load(distributed, checkpoint_id=str(directory), process_group=self.process_group)

        shared_names = [name for name, kind in kinds.items() if kind == "shared"]
        if shared_names:
            shared = load_state_file(directory / SHARED_FILE)
            for name in shared_names:
                _restore(state, name, shared[name])

        per_rank_names = [name for name, kind in kinds.items() if kind == "per_rank"]
        if per_rank_names:
            if source_rank is not None or metadata["world_size"] == self.world_size:
                rank = source_rank(metadata) if source_rank is not None else self.rank
                per_rank = load_state_file(directory / rank_file(rank))
                for name in per_rank_names:
                    _restore(state, name, per_rank[name])
            elif self.rank == 0:
                warnings.warn(
                    f"checkpoint {directory} was saved with world size {metadata['world_size']}, this run has "
                    f"{self.world_size}: per-rank state {per_rank_names} is not restored (model, optimizer "
                    "and shared state are).",
                    stacklevel=3,
                )

    def _report_unfinished_saves(self) -> None:
        if self.folder.is_dir():
            for entry in sorted(self.folder.iterdir()):
                if entry.is_dir() and entry.name.endswith(".tmp"):
                    logger.warning("ignoring %s: an unfinished save (no completion marker)", entry)

    def _first_problem(self, problem: str | None) -> str | None:
        """The first rank's problem (in rank order), on every rank: all ranks then accept or skip together."""
        if not self._distributed:
            return problem
        every_rank: list[str | None] = [None] * self.world_size
        dist.all_gather_object(every_rank, problem, group=self.process_group)
        return next((p for p in every_rank if p is not None), None)

    # -- collectives ----------------------------------------------------------------------------------

    def _barrier(self) -> None:
        if self._distributed:
            dist.barrier(group=self.process_group)

    def _agreed(self, value: Any) -> Any:
        """Rank 0's `value` on every rank, so all ranks load the same step even if their views of a
        shared file system differ for a moment."""
        if not self._distributed:
            return value
        box = [value]
        src = dist.get_global_rank(self.process_group, 0) if self.process_group is not None else 0
        dist.broadcast_object_list(box, src=src, group=self.process_group)
        return box[0]


@contextlib.contextmanager
def _ignoring_no_dist_warning() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NO_DIST_WARNING)
        yield


def _one_line(err: BaseException, directory: Path) -> str:
    """A load error as one line: DCP wraps each rank's failure (with its traceback) in one exception."""
    failures = getattr(err, "failures", None)  # torch.distributed.checkpoint's CheckpointException
    if failures:
        rank, wrapped = next(iter(failures.items()))
        inner = wrapped[0] if isinstance(wrapped, tuple) else getattr(wrapped, "exc", wrapped)  # (exc, traceback)
        return f"DCP could not read its tensor files (rank {rank}: {type(inner).__name__}: {_first_line(inner)})"
    filename = getattr(err, "filename", None)
    where = f"{Path(filename).name}: " if filename else ""
    return f"{where}{type(err).__name__}: {_first_line(err)}"


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else repr(err)


@contextlib.contextmanager
def _disk_errors_named(tmp_dir: Path) -> Iterator[None]:
    """A write that fails (a full disk above all) ends the run with one line naming the file, not a zip
    writer's `unexpected pos` or DCP's per-rank tracebacks. The unfinished `step-N.tmp` is never loaded."""
    try:
        yield
    except OSError as err:
        where = err.filename or tmp_dir
        raise SystemExit(f"checkpoint save failed writing {where}: {err.strerror or err}. Free space on that "
                         "file system (or point job.output_dir elsewhere) and restart: the run resumes from the "
                         "last complete checkpoint.") from err
    except CheckpointException as err:  # DCP gathers every rank's failure (a BaseException, not an Exception)
        text = str(err)
        if _ENOSPC_TEXT not in text:
            raise
        path = re.search(r"No space left on device: '([^']+)'", text)
        where = path.group(1) if path else tmp_dir
        raise SystemExit(f"checkpoint save failed writing {where}: {_ENOSPC_TEXT}. Free space on that file "
                         "system (or point job.output_dir elsewhere) and restart: the run resumes from the last "
                         "complete checkpoint.") from err


def _write_durably(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
