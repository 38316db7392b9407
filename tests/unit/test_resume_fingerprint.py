"""The resume fingerprint: what may not change is refused in one line naming key and values; lr and schedule
changes take effect from the resumed step, and an unchanged config resumes the exact saved lr."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from posttrain.checkpoint.fingerprint import immutable_changes, mutable_changes, refusal_message, run_fingerprint
from posttrain.checkpoint.resume_check import ResumeFingerprintCheck
from posttrain.config import load_config
from posttrain.models.registry import get_model_spec, resolve_scratch_args
from posttrain.optim import apply_optimizer_config, build_lr_scheduler, build_optimizer


def _fingerprint(*overrides: str) -> dict:
    cfg = load_config(["--config", "train_configs/debug_sft.toml", *overrides])
    spec = get_model_spec(cfg.model.name)
    args = resolve_scratch_args(spec, cfg.model.flavor, vocab_size=cfg.model.vocab_size, overrides=cfg.model.overrides)
    return run_fingerprint(cfg, model_args=args, dp_degree=1)


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["--model.overrides", "{n_layers = 1}"], "model.overrides.n_layers"),
        (["--model.overrides", "{dim = 256, ffn_dim = 1024}"], "model.overrides.dim"),
        (["--lora.rank", "8"], "lora.rank"),
        (["--model.name", "llama3"], "model.name"),
        (["--model.head", "value"], "model.head"),
        (["--job.recipe", "dpo"], "job.recipe"),
    ],
)
def test_an_immutable_change_is_refused_in_one_line_naming_the_key(overrides: list[str], key: str) -> None:
    saved, now = _fingerprint(), _fingerprint(*overrides)
    changes = immutable_changes(saved, now)
    assert changes and changes[0][0] == key
    check = ResumeFingerprintCheck(Path("out/checkpoints"), now)
    with pytest.raises(SystemExit) as refused:
        check({"step": 50, "fingerprint": saved})
    message = str(refused.value.code)
    assert "\n" not in message and "out/checkpoints/step-50" in message
    if key == "job.recipe":
        assert "written by the 'sft' recipe; this run is 'dpo'" in message
    else:
        assert f"{key} = " in message


def test_mutable_changes_are_listed_and_a_data_change_restarts_the_data() -> None:
    saved = _fingerprint()
    now = _fingerprint("--optimizer.lr", "1e-5", "--lr_scheduler.decay", "constant", "--training.steps", "300")
    assert not immutable_changes(saved, now)
    assert {k for k, _, _ in mutable_changes(saved, now)} == {"optimizer.lr", "lr_scheduler.decay", "training.steps"}
    assert ResumeFingerprintCheck(Path("c"), now)({"step": 1, "fingerprint": saved}) == []
    moved = _fingerprint("--data.path", "tests/assets/sharegpt.jsonl")
    assert ResumeFingerprintCheck(Path("c"), moved)({"step": 1, "fingerprint": saved}) == ["dataloader"]


def _trained(cfg_overrides: list[str], steps: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    cfg = load_config(["--config", "train_configs/debug_sft.toml", *cfg_overrides])
    torch.manual_seed(0)
    model = nn.Linear(4, 4)
    optimizer = build_optimizer(model, cfg.optimizer, torch.device("cpu"))
    scheduler = build_lr_scheduler(optimizer, cfg.lr_scheduler, cfg.training.steps)
    for _ in range(steps):
        model(torch.randn(2, 4)).sum().backward()
        optimizer.step()
        scheduler.step()
    return optimizer, scheduler


def _resumed(saved_opt, saved_sched, cfg_overrides: list[str]):
    cfg = load_config(["--config", "train_configs/debug_sft.toml", *cfg_overrides])
    fresh, _ = _trained(cfg_overrides, 0)
    scheduler = build_lr_scheduler(fresh, cfg.lr_scheduler, cfg.training.steps)
    fresh.load_state_dict(saved_opt.state_dict())
    scheduler.load_state_dict(saved_sched.state_dict())
    apply_optimizer_config(fresh, scheduler, cfg.optimizer)
    return fresh, scheduler


def test_an_unchanged_config_resumes_the_exact_saved_lr() -> None:
    optimizer, scheduler = _trained([], 7)
    resumed, resumed_sched = _resumed(optimizer, scheduler, [])
    assert [g["lr"] for g in resumed.param_groups] == [g["lr"] for g in optimizer.param_groups]
    assert resumed_sched.get_last_lr() == scheduler.get_last_lr()


def test_a_new_lr_and_schedule_apply_from_the_resumed_step() -> None:
    optimizer, scheduler = _trained([], 7)
    new = ["--optimizer.lr", "1e-5", "--lr_scheduler.decay", "linear", "--training.steps", "20",
           "--optimizer.weight_decay", "0.5"]
    resumed, resumed_sched = _resumed(optimizer, scheduler, new)
    reference, reference_sched = _trained(new, 7)  # a run configured like that from the start
    assert [g["lr"] for g in resumed.param_groups] == pytest.approx([g["lr"] for g in reference.param_groups])
    assert resumed.param_groups[0]["weight_decay"] == 0.5 and resumed.param_groups[1]["weight_decay"] == 0.0
    resumed_sched.step()
    reference_sched.step()
    assert resumed_sched.get_last_lr() == pytest.approx(reference_sched.get_last_lr())
