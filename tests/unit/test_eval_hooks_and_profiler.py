"""Evaluation during training (posttrain/evaluation/validation.py, generation.py) and step profiling
(posttrain/profiling.py), in one process on a tiny model."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from posttrain.config.sections import DataSection, ProfilingSection
from posttrain.datasets.dataloader import build_eval_dataloader
from posttrain.datasets.tokenizer import HFTokenizer
from posttrain.evaluation.generation import (
    greedy_completions,
    read_generation_prompts,
)
from posttrain.evaluation.validation import evaluation_due, local_validation_loss
from posttrain.models import build_model
from posttrain.models.greedy import greedy_generate
from posttrain.profiling import StepProfiler, profiled_steps

ASSETS = Path(__file__).resolve().parents[1] / "assets"


def _tiny_model(vocab_size: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("qwen3", "debug", device="cpu", vocab_size=vocab_size, init_std=0.1)


def test_validation_loss_is_the_token_weighted_cross_entropy_of_the_held_out_rows(tokenizer_dir: Path) -> None:
    tok = HFTokenizer(tokenizer_dir)
    model = _tiny_model(tok.vocab_size)
    loader = build_eval_dataloader(DataSection(eval_path=str(ASSETS / "chat_eval.jsonl"), num_workers=0), tok,
                                   seq_len=128, micro_batch_size=3, dp_rank=0, dp_world_size=1)
    batches = list(loader)
    assert len(batches) > 2
    model.train()
    loss_sum, n = local_validation_loss(model, batches, to_device=lambda b: b, chunk_size=37)
    assert model.training  # its mode is restored

    direct_sum, direct_n = 0.0, 0
    with torch.no_grad():
        for b in batches:
            logits = model(b["input_ids"], position_ids=b["position_ids"], document_ids=b["document_ids"])
            direct_sum += float(F.cross_entropy(logits.flatten(0, 1).double(), b["labels"].flatten(), reduction="sum"))
            direct_n += int((b["labels"] != -100).sum())
    assert n == direct_n
    assert loss_sum == pytest.approx(direct_sum, rel=1e-5)

    capped_sum, capped_n = local_validation_loss(model, batches, to_device=lambda b: b, max_batches=2)
    assert capped_n == sum(int((b["labels"] != -100).sum()) for b in batches[:2])


def test_evaluation_runs_every_freq_steps_and_at_the_end() -> None:
    assert [s for s in range(1, 11) if evaluation_due(s, 10, 4)] == [4, 8, 10]
    assert [s for s in range(1, 11) if evaluation_due(s, 10, 0)] == [10]


def test_generation_prompts_from_messages_prompt_or_question_rows(tmp_path: Path) -> None:
    path = tmp_path / "prompts.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}], "answer": 4},
        {"prompt": "What is 3 + 3?", "answer": "6"},
        {"question": "What is 4 + 4?", "answer": "8", "task": "chain_sum"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = read_generation_prompts(path)
    assert [g["messages"] for g in got] == [
        [{"role": "user", "content": "What is 2 + 2?"}],  # the reference answer turn is dropped
        [{"role": "user", "content": "What is 3 + 3?"}],
        [{"role": "user", "content": "What is 4 + 4?"}],
    ]
    assert [g["answer"] for g in got] == ["4", "6", "8"] and got[2]["task"] == "chain_sum"
    assert len(read_generation_prompts(path, limit=2)) == 2
    path.write_text(json.dumps({"prompt": "no answer"}) + "\n")
    with pytest.raises(SystemExit, match="answer"):
        read_generation_prompts(path)


def test_greedy_completions_match_the_reference_decoder() -> None:
    """Whichever decoder runs (the native KV-cache engine for native models), greedy tokens are the reference's."""
    model = _tiny_model(300).eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (4, 11, 7)]
    expected = [greedy_generate(model, p, 6) for p in prompts]
    stop = expected[1][2]  # the second prompt stops at its third token at the latest
    expected = [e if stop not in e else e[: e.index(stop) + 1] for e in expected]
    model.train()
    assert greedy_completions(model, prompts, max_new_tokens=6, stop=[stop]) == expected
    assert model.training


def test_profiler_traces_only_the_chosen_steps(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = ProfilingSection(enable=True, steps=[2], memory_snapshot=True)
    with caplog.at_level(logging.WARNING, logger="posttrain"):
        profiler = StepProfiler(cfg, tmp_path, rank=0, device=torch.device("cpu"))
    assert "unavailable" in caplog.text  # the CUDA memory snapshot, on CPU: a warning, not an error
    a = torch.randn(64, 64)
    for step in (1, 2, 3):
        profiler.at_step_boundary(step)
        (a @ a).sum()
    profiler.close()
    traces = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.json"))
    assert traces == ["profile/step-2/rank-0.trace.json"]
    events = json.loads((tmp_path / traces[0]).read_text())["traceEvents"]
    assert "aten::mm" in {e.get("name") for e in events}


def test_profiled_steps_from_a_list_or_a_start_and_count() -> None:
    assert profiled_steps(ProfilingSection(enable=False, steps=[3])) == frozenset()
    assert profiled_steps(ProfilingSection(enable=True, steps=[5, 9])) == {5, 9}
    assert profiled_steps(ProfilingSection(enable=True, start_step=4, count=3)) == {4, 5, 6}
    with pytest.raises(SystemExit, match="profiling.steps"):
        profiled_steps(ProfilingSection(enable=True, steps=[0]))
