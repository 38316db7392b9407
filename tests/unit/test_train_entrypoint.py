"""train.py as a new user meets it: no arguments run the embedded default and say so; a refused run writes nothing;
a missing input is one line naming the key (and the command that makes it); a user's mistake never prints a
traceback. Each subprocess ends before any training step (a few seconds each, mostly imports)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from posttrain.config import ConfigError, parse_config
from posttrain.config.input_paths import check_input_paths, could_be_hub_id

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
import train  # noqa: E402


def run_train(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_no_config_means_the_embedded_default(capsys, monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    argv = train.with_default_config(["--training.steps", "3"])
    assert "embedded default, train_configs/debug_sft.toml" in capsys.readouterr().err
    cfg = parse_config(argv)
    default = parse_config(["--config", "train_configs/debug_sft.toml"])
    assert cfg.tokenizer.path == default.tokenizer.path == "tests/assets/tokenizer"
    assert cfg.job.output_dir == "outputs/debug_sft" and cfg.training.steps == 3  # overrides still apply
    assert train.with_default_config(["--help"]) == ["--help"]
    assert train.with_default_config(["--config=x.toml"]) == ["--config=x.toml"]


def test_python_train_py_with_no_config_runs_debug_sft(tmp_path: Path) -> None:
    done = run_train("--job.dry_run", "true")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "running the embedded default, train_configs/debug_sft.toml" in done.stderr
    assert "outputs/debug_sft" in done.stdout and "tests/assets/tokenizer" in done.stdout


def test_a_refused_run_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = run_train("--config", "train_configs/debug_sft.toml", "--tokenizer.path", "", "--job.output_dir", str(out))
    assert done.returncode == 1 and "tokenizer.path is empty and there is no model.hf_path" in done.stderr
    assert "Traceback" not in done.stderr
    assert not out.exists()


def test_grpo_before_its_warm_start_names_the_key_and_the_command(tmp_path: Path) -> None:
    done = run_train("--config", str(REPO / "train_configs/debug_grpo.toml"), cwd=tmp_path)  # nothing made here
    assert done.returncode == 1 and "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("model.hf_path = 'outputs/debug_grpo_warmstart/sft/hf'")
    assert "python scripts/make_grpo_warmstart.py" in lines[0]
    assert not (tmp_path / "outputs").exists()


def test_a_bad_data_row_is_one_line_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "bot", "content": "hi"}]}) + "\n")
    done = run_train("--config", "train_configs/debug_sft.toml", "--data.path", str(bad), "--data.num_workers", "1",
                     "--job.output_dir", str(tmp_path / "out"), "--training.steps", "1")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == (
        f"{bad}:1: messages[0].role is 'bot', expected one of system, user, assistant, tool, developer; fix the row "
        "or set data.skip_bad_rows = true to skip and count such rows"
    )


@pytest.mark.parametrize("key, value, made_by", [
    ("model.hf_path", "outputs/debug_grpo_warmstart/sft/hf", "python scripts/make_grpo_warmstart.py"),
    ("distill.teacher_hf_path", "outputs/debug_sft/hf", "python train.py --config train_configs/debug_sft.toml"),
    ("tokenizer.path", "tests/assets/tokenizr", None),  # misspelled: no Hub round trip
    ("tokenizer.path", "./my_tokenizer", None),
    ("data.path", "data/math/train.jsonl", "python scripts/make_math_data.py"),
    ("grpo.prompts", "prompts.jsonl", None),
])
def test_missing_local_inputs_are_one_line_naming_the_key(tmp_path: Path, monkeypatch, key, value, made_by) -> None:
    monkeypatch.chdir(tmp_path)
    section, name = key.split(".")
    cfg = parse_config([f"--{key}", value])
    with pytest.raises(ConfigError) as err:
        check_input_paths(cfg)
    message = str(err.value)
    assert err.value.key == key and message.startswith(f"{key} = {value!r}") and "\n" not in message
    assert (made_by in message) if made_by else ("made by" not in message)


def test_hub_ids_and_existing_paths_pass(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tok").mkdir()
    check_input_paths(parse_config([  # globs and URLs: the data reader checks them
        "--model.hf_path", "Qwen/Qwen3-1.7B", "--tokenizer.path", "tok", "--data.path", "hf://datasets/org/name",
        "--grpo.prompts", "reasoning_gym:arithmetic", "--data.eval_path", "missing/*.jsonl",
    ]))
    assert could_be_hub_id("gpt2") and could_be_hub_id("meta-llama/Llama-3.1-8B-Instruct")
    assert not could_be_hub_id("outputs/debug_sft/hf") and not could_be_hub_id("./tok")
    assert not could_be_hub_id("a--b/c") and not could_be_hub_id("/abs/path")


def test_help_lists_every_builtin_recipe() -> None:
    from posttrain.config import format_help

    text = format_help()
    recipe_help = text[text.index("--job.recipe"):text.index("--job.description")]
    for recipe in train.RECIPES:
        assert recipe in recipe_help, (recipe, recipe_help)


def test_the_readme_reward_model_command_after_dpo_is_refused_in_one_line(tmp_path: Path, monkeypatch) -> None:
    """The README's old sequence, `--job.recipe reward_model` into the DPO run's folder, died with a raw DCP
    traceback (`Missing key ... model.score.weight`); the resume fingerprint refuses it in one line (and the README
    command now has its own folder: test_readme_is_true.py)."""
    monkeypatch.chdir(REPO)
    tiny = ["--config", "train_configs/debug_dpo.toml", "--job.output_dir", str(tmp_path / "dpo"), "--training.steps",
            "1", "--training.seq_len", "128", "--data.eval_path", "", "--metrics.tensorboard", "false"]
    train.main(tiny)
    with pytest.raises(SystemExit) as refused:
        train.main([*tiny, "--job.recipe", "reward_model"])
    message = str(refused.value.code)
    assert "\n" not in message and "reward_model" in message and "Missing key" not in message, message
