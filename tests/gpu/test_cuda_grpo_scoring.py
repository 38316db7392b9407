"""GRPO's scoring pass on the device computes the numbers the update's forward computes: with fp32 master weights
the update runs under bf16 autocast, so the old log-probs must too (they did not: fp32 old log-probs against bf16
new ones made the first minibatch's ratio differ from 1 by the precision gap). Packed rows of 512 positions with
FlexAttention where the device has its backward."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from posttrain.config import parse_config
from posttrain.datasets.tokenizer import HFTokenizer
from posttrain.models import save_hf
from posttrain.models.registry import get_model_spec, resolve_scratch_args
from posttrain.rl.workers import PolicyWorker, response_log_probs

ASSETS = Path(__file__).resolve().parents[1] / "assets"


def _rows(n: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"prompt_ids": torch.randint(10, 1000, (12 + i % 5,), generator=g).tolist(),
             "token_ids": torch.randint(10, 1000, (6 + i % 7,), generator=g).tolist(),
             "advantage": 1.0 if i % 2 else -1.0} for i in range(n)]


def _random_qwen3(folder: Path, *, n_layers: int) -> Path:
    """A small random Qwen3 saved as an HF folder with the test tokenizer."""
    spec = get_model_spec("qwen3")
    args = resolve_scratch_args(spec, "debug", overrides={"dim": 128, "n_layers": n_layers, "ffn_dim": 256})
    torch.manual_seed(0)
    model = spec.model_cls(args)
    model.init_weights()
    save_hf(model, folder, tokenizer=HFTokenizer(ASSETS / "tokenizer"))
    return folder


def _grpo_config(hf: Path, run: Path, *overrides: str):
    """A GRPO config on `hf` in fp32 master weights with flex attention, one minibatch a step, plus `overrides`."""
    return parse_config([
        "--job.recipe", "grpo", "--job.output_dir", str(run), "--model.hf_path", str(hf), "--model.dtype", "float32",
        "--model.attn_backend", "flex", "--grpo.prompts", "unused.jsonl", "--grpo.minibatches", "1",
        "--metrics.tensorboard", "false", *overrides,
    ])


def test_old_log_probs_match_the_update_forward(device: torch.device, tmp_path: Path, record_property) -> None:
    if device.type != "cuda":
        pytest.skip("bf16 autocast over fp32 master weights is the CUDA path (the CPU trains in fp32)")
    hf = _random_qwen3(tmp_path / "hf", n_layers=2)
    cfg = _grpo_config(hf, tmp_path / "run", "--grpo.micro_batch_tokens", "512", "--training.steps", "2")
    worker = PolicyWorker()
    worker.setup(cfg, rank=0, world_size=1, master_addr="127.0.0.1", master_port=0)
    try:
        rows = _rows(24)
        old = worker.log_probs(rows, old=True, ref=False, entropy=False)["old_logp"]
        trainer = worker.trainer
        temperature = cfg.grpo.temperature
        forwards = {}
        for name, precision in (("update", trainer.forward_precision),
                                ("fp32", lambda: torch.autocast("cuda", enabled=False))):
            values = [None] * len(rows)
            for indices, cpu_batch, values_of in worker._micro_batches(rows):
                with precision():
                    logp, _ = response_log_probs(trainer.model, trainer.to_device(cpu_batch), temperature=temperature,
                                                 chunk_size=0)
                for i, v in zip(indices, values_of(logp.detach().float().cpu())):
                    values[i] = v
            forwards[name] = torch.tensor([x for row in values for x in row])
        flat_old = torch.tensor([x for row in old for x in row])
        gap_update = (flat_old - forwards["update"]).abs().max().item()
        gap_fp32 = (forwards["fp32"] - forwards["update"]).abs().max().item()
        record_property("rel_err", f"old vs update forward {gap_update:.2e}, fp32 vs bf16 forward {gap_fp32:.2e}")
        assert gap_fp32 > 1e-3  # the precisions differ visibly: the comparison below can fail
        assert gap_update < 1e-3 < gap_fp32

        for row, v in zip(rows, old):
            row["old_logp"] = v
        stats = worker.train_minibatch(rows)
        assert stats["ratio"] / stats["tokens"] == pytest.approx(1.0, abs=1e-4)
        assert stats["clip_low"] == 0 and stats["clip_high"] == 0
    finally:
        worker.close()


def test_cudagraph_passes_equal_compiled_passes(device: torch.device, tmp_path: Path, record_property) -> None:
    """compile.cudagraphs on GRPO's passes: the scoring pass and two updates of several micro-batches each (the
    gradients accumulate across graph steps) give the numbers of the compiled blocks without CUDA graphs."""
    if device.type != "cuda":
        pytest.skip("CUDA graphs")
    hf = _random_qwen3(tmp_path / "hf", n_layers=3)
    results = {}
    for graphs in ("false", "true"):
        torch._dynamo.reset()
        cfg = _grpo_config(hf, tmp_path / f"run_{graphs}", "--grpo.micro_batch_tokens", "256", "--training.steps", "3",
                           "--compile.enabled", "true", "--compile.cudagraphs", graphs)
        worker = PolicyWorker()
        worker.setup(cfg, rank=0, world_size=1, master_addr="127.0.0.1", master_port=0)
        try:
            rows = _rows(48)
            assert len(list(worker._micro_batches(rows))) >= 3
            losses, olds = [], []
            for _ in range(2):
                old = worker.log_probs(rows, old=True, ref=False, entropy=False)["old_logp"]
                for row, v in zip(rows, old):
                    row["old_logp"] = v
                losses.append(worker.train_minibatch(rows)["loss"])
                olds.append(torch.tensor([x for row in old for x in row]))
            assert (olds[1] - olds[0]).abs().max() > 1e-4  # the update moved the policy: the comparison can fail
            results[graphs] = (olds[1], losses)
        finally:
            worker.close()
    (old_ref, losses_ref), (old, losses) = results["false"], results["true"]
    gap = (old - old_ref).abs().max().item()
    record_property("rel_err", f"old log-probs after one update {gap:.2e}, losses {losses} vs {losses_ref}")
    assert gap < 1e-4
    assert losses == pytest.approx(losses_ref, rel=1e-4, abs=1e-6)


def test_shared_prompts_equal_one_prompt_per_completion(device: torch.device, tmp_path: Path, record_property) -> None:
    """grpo.share_prompts on FlexAttention (forward and backward, the block mask read from the shared-prompt ids):
    the scoring pass, one update and the scoring after it give the numbers of one prompt copy per completion."""
    if device.type != "cuda":
        pytest.skip("FlexAttention's backward")
    hf = _random_qwen3(tmp_path / "hf", n_layers=2)
    rows = _rows(48)
    for i, r in enumerate(rows):  # groups of 8 completions of one prompt, interleaved as in a shuffled minibatch
        r["prompt_ids"] = list(rows[i % 6]["prompt_ids"])
    results = {}
    for share in ("false", "true"):
        cfg = _grpo_config(hf, tmp_path / f"run_{share}", "--grpo.micro_batch_tokens", "512", "--training.steps", "2",
                           "--training.mixed_precision", "fp32", "--grpo.share_prompts", share)
        worker = PolicyWorker()
        worker.setup(cfg, rank=0, world_size=1, master_addr="127.0.0.1", master_port=0)
        try:
            forwards = len(list(worker._micro_batches(rows)))
            own = [dict(r) for r in rows]
            old = worker.log_probs(own, old=True, ref=False, entropy=False)["old_logp"]
            for row, v in zip(own, old):
                row["old_logp"] = v
            stats = worker.train_minibatch(own)
            after = worker.log_probs(own, old=True, ref=False, entropy=False)["old_logp"]
            results[share] = (forwards, torch.tensor([x for r in old for x in r]), stats,
                              torch.tensor([x for r in after for x in r]))
        finally:
            worker.close()
    (n_own, old_own, stats_own, after_own), (n_shared, old_shared, stats_shared, after_shared) = (
        results["false"], results["true"])
    gaps = [(a - b).abs().max().item() for a, b in ((old_shared, old_own), (after_shared, after_own))]
    record_property("rel_err", f"forwards {n_shared} vs {n_own}; old log-probs {gaps[0]:.2e}, after the update "
                               f"{gaps[1]:.2e}; loss {stats_shared['loss']} vs {stats_own['loss']}")
    assert n_shared < n_own
    assert (after_own - old_own).abs().max() > 1e-3  # the update moved the policy: the comparison can fail
    assert max(gaps) < 1e-4
    for key in ("loss", "grad_norm", "tokens"):
        assert stats_shared[key] == pytest.approx(stats_own[key], rel=1e-4, abs=1e-6), key
