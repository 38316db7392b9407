"""The SFT data pipeline of one data shard, and the iterable datasets the dataloader runs in its workers.

Per shard: sources (sharded rows) -> shuffle buffer per dataset (epochs) -> weighted mixer -> row format +
tokenizer -> overlong handling -> packer -> micro-batches. `ShardPipeline` holds all of that state and
`state_dict()` captures it between batches (reader positions, buffered rows, buffered documents, random
stream counters, counters), which is what makes a resumed loader yield exactly the batches the uninterrupted
one would have.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from posttrain.datasets.columns import rename_columns
from posttrain.datasets.counter_rng import CounterRNG
from posttrain.datasets.errors import BadRowError, DataError
from posttrain.datasets.mixer import WeightedMixer
from posttrain.datasets.packing import BestFitBuffer, PackedRow, build_row, fit_to_length, pack_best_fit, pack_one
from posttrain.datasets.sft_format import SFTTokenizer, TokenizedSample, tokenize_row
from posttrain.datasets.shuffle import ShuffledEpochs
from posttrain.datasets.sources import DataFile, ShardedRowStream, bad_row_error
from posttrain.datasets.stats import DataStats
from posttrain.losses.targets import find_target_index

logger = logging.getLogger(__name__)

# Rows read without a single usable sample before the pipeline gives up with an explanation.
NO_SAMPLE_ROW_LIMIT = 1000
_LOGGED_BAD_ROWS = 10


@dataclass(frozen=True)
class PipelineConfig:
    """Everything a shard pipeline needs, picklable into dataloader workers."""

    sources: tuple[tuple[DataFile, ...], ...]  # per dataset, its files
    names: tuple[str, ...]  # per dataset, how messages name it (its data.path)
    weights: tuple[float, ...]
    fmt: str
    seq_len: int
    micro_batch_size: int
    packing: str  # best_fit | padding
    pack_buffer: int
    overlong: str  # truncate | drop
    shuffle_buffer: int
    skip_bad_rows: bool
    seed: int
    pad_id: int
    num_epochs: int | None = None  # None: repeat forever
    vocab_size: int | None = None  # token rows: ids must be below it (None: unchecked)
    columns: tuple[tuple[str, str], ...] = ()  # [data.columns]: (field, the rows' column) renamed before tokenizing
    max_row_bytes: int = 0  # a JSON line longer than this is a bad row, never parsed (0: no limit)


class ShardPipeline:
    """One data shard's rows -> packed micro-batches, with its complete resumable state."""

    def __init__(self, cfg: PipelineConfig, tokenizer: SFTTokenizer | None, *, shard: int, num_shards: int) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.shard = shard
        self.num_shards = num_shards
        shuffle = cfg.shuffle_buffer > 0
        self.streams = [
            ShuffledEpochs(
                ShardedRowStream(
                    list(files), shard=shard, num_shards=num_shards, seed=cfg.seed, name=name, shuffle_files=shuffle,
                    max_row_bytes=cfg.max_row_bytes,
                ),
                buffer_size=cfg.shuffle_buffer,
                seed=cfg.seed,
                source_index=i,
                num_epochs=cfg.num_epochs,
            )
            for i, (files, name) in enumerate(zip(cfg.sources, cfg.names))
        ]
        self.mixer = WeightedMixer(self.streams, list(cfg.weights), CounterRNG(cfg.seed, "mix", shard))
        self.buffer = BestFitBuffer(cfg.pack_buffer if cfg.packing == "best_fit" else 1)
        self.stats = DataStats()
        self.kept = 0  # usable samples produced so far (packed or held)
        self.exhausted = False
        self.first_unusable: str | None = None

    # -- samples
    def _unusable(self, sample: TokenizedSample | None, why: str) -> None:
        """Remember the first unusable sample; give up when the first rows of the data gave nothing usable."""
        if self.first_unusable is None and sample is not None:
            targets = np.flatnonzero(sample.loss_mask[1:])
            prompt = f", the first trained token at position {int(targets[0]) + 1}" if targets.size else ""
            self.first_unusable = f"{sample.where}: {len(sample)} tokens{prompt} ({why})"
        if not self.kept and self.stats.rows_read >= NO_SAMPLE_ROW_LIMIT:
            self._raise_no_usable_sample()

    def _raise_no_usable_sample(self) -> None:
        s = self.stats
        raise DataError(
            f"no usable sample in the first {s.rows_read} rows of {', '.join(self.cfg.names)} for "
            f"seq_len = {self.cfg.seq_len}: {s.dropped_overlong} longer than seq_len "
            f"(data.overlong = {self.cfg.overlong}, nothing trainable left within seq_len), "
            f"{s.dropped_no_target} with no trained token, {s.skipped_bad_rows} bad rows skipped"
            f"{'; e.g. ' + self.first_unusable if self.first_unusable else ''}; raise training.seq_len, shorten "
            f"the prompts, or check data.format and the rows"
        )

    def next_sample(self) -> TokenizedSample | None:
        """The next usable (fitted) document, counting every row that is not; None when the data ends."""
        cfg = self.cfg
        while True:
            picked = self.mixer.next_row()
            if not self.kept and self.stats.rows_read and (
                picked is None or any(s.epoch > 0 or s.finished for s in self.streams)
            ):
                self._raise_no_usable_sample()  # a whole pass over the data gave nothing to train on
            if picked is None:
                return None
            _, row = picked
            self.stats.rows_read += 1
            try:
                if row.error is not None:
                    raise bad_row_error(row)
                fields = rename_columns(row.value or {}, cfg.columns, row.where)
                sample = tokenize_row(fields, cfg.fmt, row.where, self.tokenizer, vocab_size=cfg.vocab_size)
            except BadRowError as e:
                if not cfg.skip_bad_rows:
                    raise
                self.stats.skipped_bad_rows += 1
                if self.stats.skipped_bad_rows <= _LOGGED_BAD_ROWS:
                    logger.warning("skipped bad row (%d so far): %s", self.stats.skipped_bad_rows, e)
                    if self.stats.skipped_bad_rows == _LOGGED_BAD_ROWS:
                        logger.warning("further bad rows in this data shard are counted, not logged")
                self._unusable(None, "bad row")
                continue
            fitted, outcome = fit_to_length(sample, cfg.seq_len, cfg.overlong)
            if fitted is None:
                count = getattr(self.stats, outcome) + 1
                setattr(self.stats, outcome, count)
                if count == 1:  # the first of each kind, with where it came from; later ones are only counted
                    logger.warning("%s: %d tokens, %s (seq_len = %d, data.overlong = %s); further ones are counted "
                                   "in data/%s", row.where, len(sample), outcome.replace("_", " "), cfg.seq_len,
                                   cfg.overlong, outcome)
                self._unusable(sample, outcome.replace("_", " "))
                continue
            if outcome == "truncated":
                self.stats.truncated += 1
            self.kept += 1
            return fitted

    def _refill(self) -> None:
        while not self.exhausted and not self.buffer.is_full():
            sample = self.next_sample()
            if sample is None:
                self.exhausted = True
            else:
                self.buffer.add(sample)

    # -- rows and batches
    def next_row(self) -> PackedRow | None:
        cfg = self.cfg
        if cfg.packing == "best_fit":
            documents = pack_best_fit(self.buffer, self._refill, cfg.seq_len)
        else:
            documents = pack_one(self.buffer, self._refill)
        if not documents:
            return None
        row = build_row(documents, cfg.seq_len, cfg.pad_id)
        s = self.stats
        s.samples += row.num_documents
        s.rows += 1
        s.tokens += row.num_tokens
        s.trained_tokens += row.num_targets
        s.padding_tokens += cfg.seq_len - row.num_tokens
        return row

    def epochs(self) -> dict[str, int]:
        if len(self.streams) == 1:
            return {"epoch": self.streams[0].epoch}
        return {f"epoch/{i}": s.epoch for i, s in enumerate(self.streams)}

    def stats_entry(self) -> dict[str, int]:
        return {"shard": self.shard, **self.stats.as_dict(), **self.epochs()}

    def next_batch(self) -> dict[str, Any] | None:
        """micro_batch_size rows, the last batch of a finite run filled up with all-padding rows."""
        rows: list[PackedRow] = []
        while len(rows) < self.cfg.micro_batch_size:
            row = self.next_row()
            if row is None:
                break
            rows.append(row)
        if not rows:
            return None
        while len(rows) < self.cfg.micro_batch_size:
            rows.append(build_row([], self.cfg.seq_len, self.cfg.pad_id))
        return collate_rows(rows, self.stats_entry())

    def batches(self) -> Iterator[dict[str, Any]]:
        while True:
            batch = self.next_batch()
            if batch is None:
                return
            yield batch

    # -- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "layout": {"shard": self.shard, "num_shards": self.num_shards},
            "mixer": self.mixer.state_dict(),
            "packer": self.buffer.state_dict(),
            "stats": self.stats.as_dict(),
            "kept": self.kept,
            "exhausted": self.exhausted,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        layout = state["layout"]
        if (layout["shard"], layout["num_shards"]) != (self.shard, self.num_shards):
            raise DataError(
                f"the data state is of shard {layout['shard']} of {layout['num_shards']} but this is shard "
                f"{self.shard} of {self.num_shards}; resume with the same data-parallel size and data.num_workers"
            )
        self.mixer.load_state_dict(state["mixer"])
        self.buffer.load_state_dict(state["packer"])
        self.stats.load(state["stats"])
        self.kept = state["kept"]
        self.exhausted = state["exhausted"]


def collate_rows(rows: list[PackedRow], stats: dict[str, int]) -> dict[str, Any]:
    """Stack rows into LongTensors [len(rows), seq_len], with the trained positions (`losses.find_target_index`: the
    loss then never waits for the device to count them), and attach the shard's counters."""
    labels = torch.from_numpy(np.stack([r.labels for r in rows]))
    return {
        "input_ids": torch.from_numpy(np.stack([r.input_ids for r in rows])),
        "labels": labels,
        "position_ids": torch.from_numpy(np.stack([r.position_ids for r in rows])),
        "document_ids": torch.from_numpy(np.stack([r.document_ids for r in rows])),
        "target_index": find_target_index(labels),
        "stats": stats,
    }


def worker_shard(dp_rank: int, dp_world_size: int) -> tuple[int, int]:
    """(shard, num_shards): shard = rank * num_workers + worker_id over rank x workers shards."""
    info = get_worker_info()
    num_workers, worker_id = (info.num_workers, info.id) if info is not None else (1, 0)
    return dp_rank * num_workers + worker_id, dp_world_size * num_workers


class PackedSFTDataset(IterableDataset):
    """Training batches of one DP rank; each dataloader worker runs its own shard pipeline.

    Stateful for torchdata's StatefulDataLoader: `state_dict()` is the running pipeline's state;
    `load_state_dict()` keeps it until the next `iter()`, which rebuilds the pipeline from it.
    """

    def __init__(self, cfg: PipelineConfig, tokenizer: SFTTokenizer | None, *, dp_rank: int, dp_world_size: int) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.dp_rank = dp_rank
        self.dp_world_size = dp_world_size
        self._pipeline: ShardPipeline | None = None
        self._pending_state: dict[str, Any] | None = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        shard, num_shards = worker_shard(self.dp_rank, self.dp_world_size)
        self._pipeline = ShardPipeline(self.cfg, self.tokenizer, shard=shard, num_shards=num_shards)
        if self._pending_state is not None:
            self._pipeline.load_state_dict(self._pending_state)
            self._pending_state = None
        return self._pipeline.batches()

    def state_dict(self) -> dict[str, Any]:
        if self._pipeline is not None:
            return self._pipeline.state_dict()
        return self._pending_state if self._pending_state is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pipeline = None
        self._pending_state = state or None


class PackedEvalDataset(IterableDataset):
    """One finite, unshuffled pass over held-out data, the same number of batches on every rank.

    Every rank packs the whole eval set the same way (it is small) and takes packed rows
    rank, rank + world, ... in micro-batches; the last batches are filled up with all-padding rows (labels
    all -100), so all ranks run the same number of eval steps. The packed rows are kept after the first pass.
    With dataloader workers, worker w yields batches w, w + num_workers, ... (the loader interleaves them
    back in order). Its `stats` describe the whole eval set (identical on every rank).
    """

    def __init__(self, cfg: PipelineConfig, tokenizer: SFTTokenizer | None, *, dp_rank: int, dp_world_size: int) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.dp_rank = dp_rank
        self.dp_world_size = dp_world_size
        self._rows: list[PackedRow] | None = None
        self._stats: dict[str, int] = {}

    def _pack_all(self) -> None:
        pipeline = ShardPipeline(self.cfg, self.tokenizer, shard=0, num_shards=1)
        rows = []
        while (row := pipeline.next_row()) is not None:
            rows.append(row)
        self._rows = rows
        self._stats = pipeline.stats_entry()

    def num_batches(self) -> int:
        if self._rows is None:
            self._pack_all()
        assert self._rows is not None
        per_step = self.dp_world_size * self.cfg.micro_batch_size
        return -(-len(self._rows) // per_step)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        num_workers, worker_id = (info.num_workers, info.id) if info is not None else (1, 0)
        n_batches = self.num_batches()
        rows = self._rows
        assert rows is not None
        mbs, cfg = self.cfg.micro_batch_size, self.cfg
        for b in range(worker_id, n_batches, num_workers):
            first = (b * self.dp_world_size + self.dp_rank) * mbs
            picked = [
                rows[i] if i < len(rows) else build_row([], cfg.seq_len, cfg.pad_id) for i in range(first, first + mbs)
            ]
            yield collate_rows(picked, dict(self._stats))
