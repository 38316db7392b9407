"""Entry points: the SFT training loader (endless, sharded, shuffled, exactly resumable) and the eval loader.

Each yields dicts:
- `input_ids`, `labels`, `position_ids`, `document_ids`: LongTensors [micro_batch_size, seq_len] (see
  packing.py: labels are already shifted, -100 where not trained; document_ids are -1 on padding);
- `stats`: dict[str, int] of cumulative counters of THIS rank, summed over its dataloader workers as of the
  batch just returned: rows_read, skipped_bad_rows, dropped_overlong, dropped_no_target, truncated, samples,
  rows, tokens, trained_tokens, padding_tokens (see stats.py), plus `epoch` (0-based, one dataset) or
  `epoch/<i>` per mixed dataset (the furthest worker's). Sum the counters over DP ranks for global numbers.

Reading, tokenizing and packing run in `data.num_workers` background processes of torchdata's
StatefulDataLoader (0 = in the training process). The loader is one continuous stream: `iter()` again does
not restart it. `state_dict()` after k batches, loaded into a freshly built loader, gives exactly the batches
the uninterrupted loader would have given next; resume with the same data files, data-parallel size and
`data.num_workers`. The state is a picklable nested dict (reader positions, buffered rows and documents,
counters): save it per rank (e.g. torch.save), not as a sharded tensor.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import re
import signal
import sys
import time
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from posttrain.config.sections import DataSection
from posttrain.datasets.errors import DataError, data_worker_death, worker_death_message
from posttrain.datasets.sft_dataset import PackedEvalDataset, PackedSFTDataset, PipelineConfig
from posttrain.datasets.sft_format import FORMATS, SFTTokenizer, load_user_format
from posttrain.datasets.sources import resolve_data_files
from posttrain.datasets.stats import DataStats

_SUMMED = tuple(DataStats.keys())


def _ignore_preemption_signals(worker_id: int) -> None:
    """Data workers ignore SIGTERM / SIGUSR1: schedulers signal every process of a job, and the training
    process answers by checkpointing and shutting its workers down itself (posttrain/preemption.py).

    They die with their training process, however it ends: a rank killed by SIGKILL (or os._exit) would
    otherwise leave them running for good (blocked flushing a queue nobody reads), holding the dead rank's
    inherited sockets -- its peers' collectives then wait on a connection that never closes."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    _die_with_parent()


def _kill_data_workers() -> None:
    """At interpreter exit multiprocessing terminates (SIGTERM) and then joins its daemonic children; data workers
    ignore SIGTERM (above), so a loader still alive at exit -- e.g. when a worker's DataError ends the program --
    would keep the process from ever exiting. Registered after multiprocessing's own exit hook, this runs first."""
    children = [c for c in multiprocessing.active_children() if c.daemon]
    if children:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would report the kills as worker failures
    for child in children:
        child.kill()


atexit.register(_kill_data_workers)


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when the process that forked it exits (prctl PR_SET_PDEATHSIG)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the prctl
        os._exit(1)


# A SIGKILLed worker's sockets and pipes read EOF while the kernel is still tearing the process down; until then
# waitpid says it is alive (a CI run under load once ended in the bare EOFError this wait now names).
WORKER_EXIT_WAIT_S = 2.0


def exited_worker_codes(workers: list[Any], wait_s: float) -> list[int]:
    """Exit codes of the `workers` (multiprocessing processes) that have exited, polling up to `wait_s` seconds
    for one to do so; [] when every one is still alive then."""
    deadline = time.monotonic() + wait_s
    while True:
        dead = [w.exitcode for w in workers if not w.is_alive()]
        if dead or not workers or time.monotonic() >= deadline:
            return dead
        time.sleep(0.01)


class SFTDataLoader:
    """Batches of packed rows for one DP rank, with rank-level `stats` and exact-resume state."""

    def __init__(
        self,
        dataset: PackedSFTDataset | PackedEvalDataset,
        *,
        num_workers: int,
        prefetch: int,
        pin_memory: bool,
        layout: dict[str, int],
        restart_each_iter: bool,
    ) -> None:
        self.dataset = dataset
        self.layout = layout
        self.restart_each_iter = restart_each_iter
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*set_vital.*")  # torchdata 0.11 on torch >= 2.12
            self._loader = StatefulDataLoader(
                dataset,
                batch_size=None,
                num_workers=num_workers,
                prefetch_factor=max(prefetch, 1) if num_workers > 0 else None,
                persistent_workers=num_workers > 0 and restart_each_iter,
                pin_memory=pin_memory,
                snapshot_every_n_steps=1,
                worker_init_fn=_ignore_preemption_signals if num_workers > 0 else None,
            )
        self._iterator: Iterator[dict[str, Any]] | None = None
        self._shard_stats: dict[str, dict[str, int]] = {}

    def __iter__(self) -> SFTDataLoader:
        if self._iterator is None or self.restart_each_iter:
            self._iterator = iter(self._loader)
            if self.restart_each_iter:
                self._shard_stats = {}
        return self

    def __next__(self) -> dict[str, Any]:
        if self._iterator is None:
            self._iterator = iter(self._loader)
        try:
            batch = next(self._iterator)
        except DataError as e:
            self._stop_workers()  # the stream ends here; its workers must not outlive it
            raise _without_worker_traceback(e) from e
        except RuntimeError as e:
            died = data_worker_death(e, ", ".join(self.dataset.cfg.names))
            if died is None:
                raise
            self._stop_workers()
            raise DataError(died) from e
        except (OSError, EOFError) as e:
            # a worker killed while it hands a batch over (its tensors' shared memory travels as file
            # descriptors over a socket to the worker): the receive fails before torch notices the death
            dead = exited_worker_codes(getattr(self._iterator, "_workers", []), WORKER_EXIT_WAIT_S)
            if not dead:
                raise
            self._stop_workers()
            how = f"exit code {dead[0]} while handing over a batch: {type(e).__name__}"
            raise DataError(worker_death_message(how, ", ".join(self.dataset.cfg.names))) from e
        shard_stats = dict(batch["stats"])
        self._shard_stats[str(shard_stats.pop("shard"))] = shard_stats
        batch["stats"] = self.stats
        return batch

    def _stop_workers(self) -> None:
        iterator, self._iterator = self._iterator, None
        shutdown = getattr(iterator, "_shutdown_workers", None)  # torch's (private) multi-worker iterator
        if shutdown is not None:
            shutdown()

    def __len__(self) -> int:
        """Batches per pass of an eval loader (packs the eval set on first use); a training loader has none."""
        if isinstance(self.dataset, PackedEvalDataset):
            return self.dataset.num_batches()
        raise TypeError("the training loader is an endless stream and has no length")

    @property
    def stats(self) -> dict[str, int]:
        """Counters of this rank as of the last batch returned (summed over workers)."""
        total: dict[str, int] = {k: 0 for k in _SUMMED}
        for shard_stats in self._shard_stats.values():
            for key, value in shard_stats.items():
                if key.startswith("epoch"):
                    total[key] = max(total.get(key, 0), int(value))
                else:
                    total[key] = total.get(key, 0) + int(value)
        return total

    def state_dict(self) -> dict[str, Any]:
        return {
            "layout": dict(self.layout),
            "loader": self._loader.state_dict(),
            "shard_stats": {k: dict(v) for k, v in self._shard_stats.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["layout"] != self.layout:
            saved, now = state["layout"], self.layout
            raise DataError(
                f"the data loader state was saved with {saved} but this run has {now}; resume with the same "
                f"data-parallel size and data.num_workers (or start the data from scratch)"
            )
        self._loader.load_state_dict(state["loader"])
        self._shard_stats = {k: dict(v) for k, v in state["shard_stats"].items()}
        self._iterator = None


def _without_worker_traceback(error: DataError) -> DataError:
    """A DataError re-raised from a worker carries the worker's traceback in its text: keep the sentence."""
    text = str(error)
    if "Original Traceback" not in text:
        return error
    found = re.findall(r"^(?:\S*\.)?(?:BadRowError|DataError): (.*)$", text, flags=re.MULTILINE)
    return type(error)(found[-1]) if found else error


def _pipeline_config(
    data: DataSection,
    tokenizer: SFTTokenizer | None,
    specs: list[str],
    fields: list[str],
    weights: list[float],
    *,
    seq_len: int,
    micro_batch_size: int,
    seed: int,
    shuffle_buffer: int,
    num_epochs: int | None,
    vocab_size: int | None = None,
) -> PipelineConfig:
    if seq_len < 2:
        raise DataError(f"training.seq_len = {seq_len} is too small; a packed row needs at least 2 tokens")
    if micro_batch_size < 1:
        raise DataError(f"the micro-batch size is {micro_batch_size}; check training.batch_size / micro_batch_size")
    if ":" in data.format:
        load_user_format(data.format)  # import it now: a wrong path fails before any worker starts
    elif data.format != "auto" and data.format not in FORMATS:
        raise DataError(
            f"data.format = {data.format!r} is not one of auto, {', '.join(FORMATS)} or 'module:attr' of your own"
        )
    if data.packing not in ("best_fit", "padding"):
        raise DataError(f"data.packing = {data.packing!r} is not one of best_fit, padding")
    if data.overlong not in ("truncate", "drop"):
        raise DataError(f"data.overlong = {data.overlong!r} is not one of truncate, drop")
    if data.pack_buffer < 1:
        raise DataError(f"data.pack_buffer = {data.pack_buffer} must be at least 1")
    if tokenizer is None:
        pad_id = 0  # token-id data: padding is never attended nor trained, any valid id does
    else:
        pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    sources = tuple(tuple(resolve_data_files(spec, field=field)) for spec, field in zip(specs, fields))
    return PipelineConfig(
        sources=sources,
        names=tuple(specs),
        weights=tuple(weights),
        fmt=data.format,
        seq_len=seq_len,
        micro_batch_size=micro_batch_size,
        packing=data.packing,
        pack_buffer=data.pack_buffer,
        overlong=data.overlong,
        shuffle_buffer=shuffle_buffer,
        skip_bad_rows=data.skip_bad_rows,
        seed=seed,
        pad_id=int(pad_id),
        num_epochs=num_epochs,
        vocab_size=vocab_size,
        columns=tuple(data.columns.items()),
        max_row_bytes=data.max_row_bytes,
    )


def build_sft_dataloader(
    data: DataSection,
    tokenizer: SFTTokenizer | None,
    *,
    seq_len: int,
    micro_batch_size: int,
    dp_rank: int,
    dp_world_size: int,
    seed: int,
    num_epochs: int | None = None,
    pin_memory: bool | None = None,
    vocab_size: int | None = None,
) -> SFTDataLoader:
    """The training loader of one DP rank: endless (or `num_epochs` passes), sharded, shuffled, packed.

    `data.path` (one dataset) or `data.paths` + `data.weights` (a mixture). Files are resolved here, so a
    missing file or an unreadable URL fails before any worker starts. `pin_memory` defaults to CUDA being
    available. With `num_epochs`, the stream ends after that many passes (the last batch filled up with
    all-padding rows). `tokenizer` may be None for token-id rows (data.format = tokens), whose ids must then
    be below `vocab_size` when it is given.
    """
    if data.path and data.paths:
        raise DataError("both data.path and data.paths are set; use data.path for one dataset or data.paths to mix")
    if data.paths:
        specs, fields = list(data.paths), [f"data.paths[{i}]" for i in range(len(data.paths))]
        weights = list(data.weights) if data.weights else [1.0] * len(specs)
    elif data.path:
        specs, fields, weights = [data.path], ["data.path"], [1.0]
        if data.weights and len(data.weights) != 1:
            raise DataError("data.weights is set for a single data.path; weights go with data.paths")
    else:
        raise DataError("no training data: set data.path (a file, glob, URL or save_to_disk folder) or data.paths")
    if len(weights) != len(specs):
        raise DataError(f"data.weights has {len(weights)} entries for {len(specs)} data.paths; give one per path")
    if not 0 <= dp_rank < dp_world_size:
        raise ValueError(f"dp_rank {dp_rank} is outside a data-parallel world of {dp_world_size}")
    cfg = _pipeline_config(
        data, tokenizer, specs, fields, weights,
        seq_len=seq_len, micro_batch_size=micro_batch_size, seed=seed,
        shuffle_buffer=data.shuffle_buffer, num_epochs=num_epochs, vocab_size=vocab_size,
    )
    num_workers = max(int(data.num_workers), 0)
    dataset = PackedSFTDataset(cfg, tokenizer, dp_rank=dp_rank, dp_world_size=dp_world_size)
    return SFTDataLoader(
        dataset,
        num_workers=num_workers,
        prefetch=data.prefetch,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        layout={"dp_rank": dp_rank, "dp_world_size": dp_world_size, "num_workers": num_workers},
        restart_each_iter=False,
    )


def build_eval_dataloader(
    data: DataSection,
    tokenizer: SFTTokenizer | None,
    *,
    seq_len: int,
    micro_batch_size: int,
    dp_rank: int,
    dp_world_size: int,
    path: str | None = None,
    pin_memory: bool | None = None,
    vocab_size: int | None = None,
) -> SFTDataLoader:
    """A finite held-out loader: each `for batch in loader` is one unshuffled pass over `data.eval_path`
    (or `path`), the same number of batches on every rank (filler rows have all labels -100).

    Packing, format and overlong handling follow `data`; at most one background worker, kept alive between
    passes so the eval set is tokenized and packed once.
    """
    spec = path if path is not None else data.eval_path
    if not spec:
        raise DataError("no eval data: set data.eval_path (or leave evaluation off)")
    cfg = _pipeline_config(
        data, tokenizer, [spec], ["data.eval_path" if path is None else "eval path"], [1.0],
        seq_len=seq_len, micro_batch_size=micro_batch_size, seed=0, shuffle_buffer=0, num_epochs=1,
        vocab_size=vocab_size,
    )
    num_workers = min(max(int(data.num_workers), 0), 1)
    dataset = PackedEvalDataset(cfg, tokenizer, dp_rank=dp_rank, dp_world_size=dp_world_size)
    return SFTDataLoader(
        dataset,
        num_workers=num_workers,
        prefetch=data.prefetch,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        layout={"dp_rank": dp_rank, "dp_world_size": dp_world_size, "num_workers": num_workers},
        restart_each_iter=True,
    )
