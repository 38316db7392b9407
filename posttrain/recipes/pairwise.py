"""What the pairwise recipes (DPO, reward model) share: their data loaders and the held-out evaluation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from posttrain.datasets.preference import PreferenceDataLoader, load_preference_pairs
from posttrain.trainer import LossOutput, Trainer


def build_preference_loader(
    trainer: Trainer, path: str, *, shuffle: bool = True, field: str = "data.path"
) -> PreferenceDataLoader:
    """This rank's loader of packed [chosen, rejected] pairs read from `path`, the value of config key `field`
    (data.* settings apply)."""
    cfg = trainer.cfg
    if not path:
        raise SystemExit("no preference data: set data.path to a jsonl of prompt / chosen / rejected rows")
    if cfg.data.paths:
        raise SystemExit("the pairwise recipes read one data.path; data.paths (mixing) is for SFT")
    pairs, stats = load_preference_pairs(
        path, trainer.tokenizer, seq_len=cfg.training.seq_len, overlong=cfg.data.overlong,
        skip_bad_rows=cfg.data.skip_bad_rows, field=field, max_row_bytes=cfg.data.max_row_bytes,
        columns=cfg.data.columns,
    )
    return PreferenceDataLoader(
        pairs, seq_len=cfg.training.seq_len, micro_batch_size=trainer.micro_batch_size, pad_id=trainer.tokenizer.pad_id,
        seed=cfg.job.seed, dp_rank=trainer.dp_rank, dp_world_size=trainer.dp_degree, shuffle=shuffle,
        load_stats=stats,
    )


def every_pair_once(trainer: Trainer, loader: PreferenceDataLoader) -> list[tuple[dict[str, Any], bool]]:
    """This rank's micro-batches covering each of its pairs once, as (batch, counts). Ranks may own different
    numbers of batches, but FSDP's gathers are collective: every rank runs as many forwards as the busiest
    one, repeating its last batch with counts = False."""
    batches = list(loader.batches_once())
    n_batches = len(batches)
    dp_mesh = trainer.parallel_dims.dp_mesh
    if dp_mesh is not None:
        count = torch.tensor([n_batches], device=trainer.device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX, group=dp_mesh.get_group())
        n_batches = int(count)
    return [(batches[min(i, len(batches) - 1)], i < len(batches)) for i in range(n_batches)]


@torch.no_grad()
def evaluate_pairs(
    trainer: Trainer, loader: PreferenceDataLoader, loss_fn: Callable[..., LossOutput], *, prefix: str = "eval_"
) -> dict[str, float]:
    """Mean loss and metrics over every held-out pair once (all data-parallel ranks), model in eval mode."""
    model = trainer.model
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    pairs = 0
    for cpu_batch, counts in every_pair_once(trainer, loader):
        with trainer.forward_precision():
            out = loss_fn(model, trainer.to_device(cpu_batch), None)
        if not counts:
            continue
        pairs += int(cpu_batch["n_targets"])
        for k, v in {"loss": out.loss_sum, **out.metrics}.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    model.train(was_training)
    keys = sorted(sums)
    totals = trainer.global_sum([float(pairs), *[sums[k] for k in keys]])
    return {f"{prefix}{k}": v / totals[0] for k, v in zip(keys, totals[1:])} | {f"{prefix}pairs": totals[0]}
