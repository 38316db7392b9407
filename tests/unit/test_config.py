"""The config system: defaults, TOML + include, command-line overrides, type checks, validation, --help."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from posttrain.config import (
    SECTIONS,
    ConfigError,
    JobConfig,
    config_from_dict,
    config_to_dict,
    parse_config,
    validate,
    validate_world_size,
)
from posttrain.config.schema import format_value, section_keys


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def run_load_config(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    code = f"from posttrain.config import load_config; load_config({argv!r})"
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=60)


# --- defaults and structure --------------------------------------------------------------------


def test_job_config_has_one_attribute_per_section_in_order():
    assert [f.name for f in dataclasses.fields(JobConfig)] == [*SECTIONS, "extensions"]  # then user code's sections
    cfg = JobConfig()
    assert cfg.extensions == {}
    for name, cls in SECTIONS.items():
        assert isinstance(getattr(cfg, name), cls)


def test_no_arguments_gives_the_defaults():
    assert parse_config([]) == JobConfig()
    cfg = parse_config([])
    assert cfg.training.steps == 100 and cfg.data.paths == [] and cfg.metrics.peak_tflops is None


def test_every_field_has_help_and_a_supported_type():
    supported = {str, int, float, bool, dict, list[str], list[int], list[float], float | None, int | None, str | None}
    for section in SECTIONS:
        for info in section_keys(section).values():
            assert info.help, f"{info.dotted} has no help metadata"
            assert info.hint in supported or typing.get_origin(info.base) is typing.Literal, info.dotted


def test_config_to_dict_round_trips_through_json():
    cfg = parse_config(["--data.paths", "a,b", "--data.weights", "1,3", "--metrics.peak_tflops", "989"])
    d = json.loads(json.dumps(config_to_dict(cfg)))
    assert list(d) == list(SECTIONS)
    assert d["data"]["weights"] == [1.0, 3.0]
    assert config_from_dict(d) == cfg
    assert config_from_dict({}) == JobConfig()


# --- TOML ---------------------------------------------------------------------------------------


def test_toml_file_sets_values_and_leaves_the_rest_default(tmp_path):
    f = write(
        tmp_path / "run.toml",
        """
[job]
output_dir = "outputs/x"
[training]
steps = 7
max_grad_norm = 2          # an int is accepted for a float
[data]
paths = ["a.jsonl", "b.jsonl"]
weights = [1, 0.5]
[metrics]
peak_tflops = 989.5
[compile]
enabled = true
""",
    )
    cfg = parse_config(["--config", str(f)])
    assert cfg.job.output_dir == "outputs/x"
    assert cfg.training.steps == 7 and cfg.training.seq_len == 512
    assert cfg.training.max_grad_norm == 2.0 and isinstance(cfg.training.max_grad_norm, float)
    assert cfg.data.paths == ["a.jsonl", "b.jsonl"] and cfg.data.weights == [1.0, 0.5]
    assert cfg.metrics.peak_tflops == 989.5
    assert cfg.compile.enabled is True


def test_toml_none_string_for_an_optional_field(tmp_path):
    f = write(tmp_path / "a.toml", '[metrics]\npeak_tflops = "none"\n')
    assert parse_config([f"--config={f}"]).metrics.peak_tflops is None


def test_toml_bool_accepted_for_a_string_field_with_true_false_choices(tmp_path):
    f = write(tmp_path / "a.toml", "[optimizer]\nfused = false\n")
    assert parse_config(["--config", str(f)]).optimizer.fused == "false"


# --- include ------------------------------------------------------------------------------------


def test_include_loads_the_included_file_first_and_the_including_file_wins(tmp_path):
    write(tmp_path / "base.toml", "[training]\nsteps = 10\nseq_len = 128\n[job]\nseed = 3\n")
    f = write(tmp_path / "run.toml", 'include = "base.toml"\n[training]\nsteps = 20\n')
    cfg = parse_config(["--config", str(f)])
    assert cfg.training.steps == 20 and cfg.training.seq_len == 128 and cfg.job.seed == 3


def test_nested_include_is_relative_to_each_including_file(tmp_path):
    write(tmp_path / "shared" / "deep" / "model.toml", '[model]\nflavor = "0.6B"\n[job]\nseed = 1\n')
    write(tmp_path / "shared" / "base.toml", 'include = "deep/model.toml"\n[job]\nseed = 2\n')
    write(tmp_path / "shared" / "data.toml", '[data]\npath = "x.jsonl"\n[job]\nseed = 4\n')
    f = write(tmp_path / "configs" / "run.toml", 'include = ["../shared/base.toml", "../shared/data.toml"]\n')
    cfg = parse_config(["--config", str(f)])
    assert cfg.model.flavor == "0.6B"
    assert cfg.data.path == "x.jsonl"
    assert cfg.job.seed == 4  # the later include wins over the earlier one


def test_diamond_include_is_not_a_cycle(tmp_path):
    write(tmp_path / "d.toml", "[job]\nseed = 9\n")
    write(tmp_path / "b.toml", 'include = "d.toml"\n')
    write(tmp_path / "c.toml", 'include = "d.toml"\n')
    f = write(tmp_path / "a.toml", 'include = ["b.toml", "c.toml"]\n')
    assert parse_config(["--config", str(f)]).job.seed == 9


def test_include_cycle_is_an_error_naming_the_chain(tmp_path):
    write(tmp_path / "a.toml", 'include = "b.toml"\n')
    write(tmp_path / "b.toml", 'include = "a.toml"\n')
    with pytest.raises(ConfigError, match=r"include cycle: .*a\.toml -> .*b\.toml -> .*a\.toml"):
        parse_config(["--config", str(tmp_path / "a.toml")])


def test_missing_include_exits_2_naming_the_including_file_and_the_path(tmp_path):
    write(tmp_path / "a.toml", 'include = "b.toml"\n')
    result = run_load_config(["--config", "a.toml"], cwd=tmp_path)
    assert result.returncode == 2
    assert "a.toml: include 'b.toml' not found" in result.stderr
    assert str((tmp_path / "b.toml").resolve()) in result.stderr


def test_error_in_an_included_file_names_that_file(tmp_path):
    write(tmp_path / "sub" / "base.toml", "[training]\nsteps = \"ten\"\n")
    f = write(tmp_path / "run.toml", 'include = "sub/base.toml"\n')
    with pytest.raises(ConfigError, match=r"base\.toml: training\.steps expects an int") as e:
        parse_config(["--config", str(f)])
    assert e.value.source.endswith("base.toml") and e.value.key == "training.steps"


def test_bad_include_value_is_an_error(tmp_path):
    f = write(tmp_path / "a.toml", "include = 3\n")
    with pytest.raises(ConfigError, match="include expects a file name"):
        parse_config(["--config", str(f)])


# --- command-line overrides ---------------------------------------------------------------------


def test_override_both_forms():
    cfg = parse_config(["--training.steps", "5", "--training.seq_len=64", "--model.name=llama3"])
    assert cfg.training.steps == 5 and cfg.training.seq_len == 64 and cfg.model.name == "llama3"


def test_override_negative_number_and_value_with_equals_sign():
    cfg = parse_config(["--parallelism.dp_shard", "-1", "--job.description=a=b"])
    assert cfg.parallelism.dp_shard == -1 and cfg.job.description == "a=b"


def test_override_dashes_in_key_names_mean_underscores():
    assert parse_config(["--training.seq-len", "64"]).training.seq_len == 64


@pytest.mark.parametrize(
    "text, expected",
    [("a.jsonl,b.jsonl", ["a.jsonl", "b.jsonl"]), ("[a.jsonl, b.jsonl]", ["a.jsonl", "b.jsonl"]),
     ('["a,1.jsonl", "b.jsonl"]', ["a,1.jsonl", "b.jsonl"]), ("one.jsonl", ["one.jsonl"]), ("", []), ("[]", [])],
)
def test_override_list_of_strings(text, expected):
    assert parse_config(["--data.paths", text]).data.paths == expected


def test_override_list_of_floats():
    assert parse_config(["--data.paths=a,b,c", "--data.weights", "1,2.5,3e-1"]).data.weights == [1.0, 2.5, 0.3]
    assert parse_config(["--data.paths=a,b", "--data.weights=[1, 2]"]).data.weights == [1.0, 2.0]
    with pytest.raises(ConfigError, match=r"command line: data\.weights expects a list of floats, got 'a,b'"):
        parse_config(["--data.weights", "a,b"])


@pytest.mark.parametrize("text, expected", [("true", True), ("1", True), ("yes", True), ("True", True),
                                            ("false", False), ("0", False), ("no", False)])
def test_override_booleans(text, expected):
    assert parse_config(["--checkpoint.export_hf", text]).checkpoint.export_hf is expected


def test_bare_boolean_flag_means_true():
    cfg = parse_config(["--compile.enabled", "--training.steps", "3", "--checkpoint.export_hf"])
    assert cfg.compile.enabled is True and cfg.checkpoint.export_hf is True and cfg.training.steps == 3


def test_bare_non_boolean_flag_is_an_error():
    with pytest.raises(ConfigError, match=r"--training\.steps expects a value"):
        parse_config(["--training.steps"])


def test_override_none_for_an_optional_field():
    assert parse_config(["--metrics.peak_tflops", "500"]).metrics.peak_tflops == 500.0
    assert parse_config(["--metrics.peak_tflops", "none"]).metrics.peak_tflops is None
    assert parse_config(["--metrics.peak_tflops=null"]).metrics.peak_tflops is None


def test_none_is_refused_for_a_required_field():
    with pytest.raises(ConfigError, match=r"training\.steps expects an int, got 'none'"):
        parse_config(["--training.steps", "none"])


def test_precedence_override_beats_toml_beats_default(tmp_path):
    write(tmp_path / "base.toml", "[training]\nsteps = 1\nseq_len = 32\nbatch_size = 4\n")
    f = write(tmp_path / "run.toml", 'include = "base.toml"\n[training]\nsteps = 2\nseq_len = 64\n')
    cfg = parse_config(["--config", str(f), "--training.steps", "3"])
    assert cfg.training.steps == 3  # command line over the including file over the include
    assert cfg.training.seq_len == 64  # including file over the include
    assert cfg.training.batch_size == 4  # include over the default
    assert cfg.training.micro_batch_size == 0  # the default
    # overrides win wherever they appear relative to --config
    assert parse_config(["--training.steps=4", "--config", str(f)]).training.steps == 4


def test_last_override_of_a_key_wins():
    assert parse_config(["--training.steps", "3", "--training.steps=4"]).training.steps == 4


# --- errors -------------------------------------------------------------------------------------


def test_unknown_key_in_toml_names_file_and_suggests(tmp_path):
    f = write(tmp_path / "x.toml", '[data]\npathz = "a.jsonl"\n')
    with pytest.raises(ConfigError) as e:
        parse_config(["--config", str(f)])
    assert str(e.value) == f"{f}: unknown key 'data.pathz' (did you mean 'data.path'?)"


def test_unknown_key_suggests_the_section_that_has_it():
    with pytest.raises(ConfigError, match=r"unknown key 'training\.lr' \(did you mean 'optimizer\.lr'\?\)"):
        parse_config(["--training.lr", "1e-4"])


def test_unknown_section_in_toml_and_on_the_command_line(tmp_path):
    f = write(tmp_path / "x.toml", "[trainig]\nsteps = 3\n")
    with pytest.raises(ConfigError, match=r"x\.toml: unknown section 'trainig' \(did you mean 'training'\?\)"):
        parse_config(["--config", str(f)])
    with pytest.raises(ConfigError, match=r"command line: unknown section 'optimiser'"):
        parse_config(["--optimiser.lr", "1"])


def test_top_level_key_that_is_not_a_section(tmp_path):
    f = write(tmp_path / "x.toml", "steps = 3\n")
    with pytest.raises(ConfigError, match=r"x\.toml: top-level key 'steps' is not a section.*'training\.steps'"):
        parse_config(["--config", str(f)])
    with pytest.raises(ConfigError, match=r"command line: unknown option '--steps'.*'--training\.steps'"):
        parse_config(["--steps", "3"])


def test_section_that_is_not_a_table(tmp_path):
    f = write(tmp_path / "x.toml", "training = 3\n")
    with pytest.raises(ConfigError, match=r"'training' must be a table"):
        parse_config(["--config", str(f)])


@pytest.mark.parametrize(
    "toml, message",
    [
        ('[training]\nsteps = "ten"', 'training.steps expects an int, got "ten"'),
        ("[training]\nsteps = 1.5", "training.steps expects an int, got 1.5"),
        ("[training]\nsteps = true", "training.steps expects an int, got true"),
        ('[optimizer]\nlr = "fast"', 'optimizer.lr expects a float, got "fast"'),
        ('[compile]\nenabled = "yes"', 'compile.enabled expects a bool (true/false), got "yes"'),
        ('[data]\npaths = "a.jsonl"', 'data.paths expects a list of strings, got "a.jsonl"'),
        ("[data]\nweights = [1, \"x\"]", "data.weights expects a list of floats"),
        ("[model]\nflavor = 8", "model.flavor expects a string, got 8"),
        ('[metrics]\npeak_tflops = "lots"', 'metrics.peak_tflops expects a float (or none), got "lots"'),
    ],
)
def test_wrong_type_in_toml_names_key_and_file(tmp_path, toml, message):
    f = write(tmp_path / "x.toml", toml + "\n")
    with pytest.raises(ConfigError) as e:
        parse_config(["--config", str(f)])
    assert str(e.value).startswith(f"{f}: {message}")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--training.steps", "ten"], "command line: training.steps expects an int, got 'ten'"),
        (["--optimizer.lr=fast"], "command line: optimizer.lr expects a float, got 'fast'"),
        (["--compile.enabled", "maybe"], "command line: compile.enabled expects a bool (true/false), got 'maybe'"),
        (["--data.packing", "bestfit"], "command line: data.packing must be one of best_fit, padding; got 'bestfit'"),
    ],
)
def test_wrong_value_on_the_command_line_names_the_key(argv, message):
    with pytest.raises(ConfigError) as e:
        parse_config(argv)
    assert str(e.value).startswith(message)


def test_bad_choice_in_toml_suggests_the_closest(tmp_path):
    f = write(tmp_path / "x.toml", '[activation_checkpoint]\nmode = "ful"\n')
    with pytest.raises(ConfigError, match=r"x\.toml: activation_checkpoint\.mode must be one of .*\(did you mean 'full'\?\)"):
        parse_config(["--config", str(f)])


def test_invalid_toml_names_the_file(tmp_path):
    f = write(tmp_path / "x.toml", "[training\nsteps = 3\n")
    with pytest.raises(ConfigError, match=r"x\.toml: invalid TOML"):
        parse_config(["--config", str(f)])


def test_missing_config_file_and_stray_arguments():
    with pytest.raises(ConfigError, match=r"command line: config file 'nope\.toml' not found \(looked at /"):
        parse_config(["--config", "nope.toml"])
    with pytest.raises(ConfigError, match=r"command line: --config expects a file"):
        parse_config(["--config"])
    with pytest.raises(ConfigError, match=r"unexpected argument 'steps=3'"):
        parse_config(["steps=3"])


@pytest.mark.parametrize(
    "argv, key",
    [
        (["--training.steps", "ten"], "training.steps"),
        (["--data.pathz", "a"], "data.pathz"),
        (["--trainig.steps", "3"], "trainig"),
        (["--data.packing", "bestfit"], "data.packing"),
        (["--training.batch_size", "0"], "training.batch_size"),
    ],
)
def test_load_config_exits_2_naming_the_key_on_stderr(tmp_path, argv, key):
    result = run_load_config(argv, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert key in result.stderr and "command line" in result.stderr
    assert "Traceback" not in result.stderr


def test_load_config_exits_2_naming_the_file(tmp_path):
    write(tmp_path / "train_configs" / "x.toml", '[data]\npathz = "a"\n')
    result = run_load_config(["--config", "train_configs/x.toml"], cwd=tmp_path)
    assert result.returncode == 2
    assert "train_configs/x.toml: unknown key 'data.pathz' (did you mean 'data.path'?)" in result.stderr


# --- semantic validation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, key",
    [
        (["--training.steps", "0"], "training.steps"),
        (["--training.seq_len", "-1"], "training.seq_len"),
        (["--training.batch_size", "0"], "training.batch_size"),
        (["--training.micro_batch_size", "3"], "training.micro_batch_size"),
        (["--training.max_grad_norm", "-1"], "training.max_grad_norm"),
        (["--optimizer.lr", "-0.1"], "optimizer.lr"),
        (["--optimizer.beta2", "1"], "optimizer.beta2"),
        (["--optimizer.eps", "0"], "optimizer.eps"),
        (["--lr_scheduler.min_lr_ratio", "2"], "lr_scheduler.min_lr_ratio"),
        (["--lr_scheduler.warmup_steps", "-1"], "lr_scheduler.warmup_steps"),
        (["--parallelism.dp_shard", "0"], "parallelism.dp_shard"),
        (["--parallelism.tp", "0"], "parallelism.tp"),
        (["--metrics.log_freq", "0"], "metrics.log_freq"),
        (["--metrics.peak_tflops", "0"], "metrics.peak_tflops"),
        (["--data.paths=a,b", "--data.weights=1"], "data.weights"),
        (["--data.paths=a,b", "--data.weights=0,0"], "data.weights"),
        (["--data.path=a", "--data.paths=b,c"], "data.paths"),
        (["--job.output_dir="], "job.output_dir"),
        (["--checkpoint.keep_last", "-1"], "checkpoint.keep_last"),
    ],
)
def test_semantic_errors_name_the_key_and_where_it_was_set(argv, key):
    with pytest.raises(ConfigError) as e:
        parse_config(argv)
    assert e.value.key == key
    assert str(e.value).startswith(f"command line: {key}")


def test_semantic_error_names_the_file_that_set_the_key(tmp_path):
    f = write(tmp_path / "x.toml", '[data]\npaths = ["a", "b", "c"]\nweights = [1, 2]\n')
    with pytest.raises(ConfigError) as e:
        parse_config(["--config", str(f)])
    assert str(e.value) == f"{f}: data.weights has 2 entries but data.paths has 3; give one weight per path"


def test_micro_batch_that_divides_the_batch_is_fine():
    cfg = parse_config(["--training.batch_size", "8", "--training.micro_batch_size", "4"])
    validate(cfg)


def test_validate_world_size():
    cfg = parse_config(["--training.batch_size", "8", "--training.micro_batch_size", "2"])
    validate_world_size(cfg, 4)  # dp_shard -1 -> 4 ranks, 2 rows each, 1 micro-batch
    validate(cfg, world_size=2)
    with pytest.raises(ConfigError, match=r"training\.micro_batch_size \(2\) must divide the per-rank batch 1"):
        validate_world_size(cfg, 8)
    with pytest.raises(ConfigError, match=r"training\.batch_size \(8\) must be divisible .* 3"):
        validate_world_size(cfg, 3)
    tp = parse_config(["--parallelism.tp", "2", "--parallelism.dp_shard", "2"])
    validate_world_size(tp, 4)
    with pytest.raises(ConfigError, match=r"parallelism\.dp_shard .* world size is 8"):
        validate_world_size(tp, 8)
    with pytest.raises(ConfigError, match=r"parallelism\.tp"):
        validate_world_size(parse_config(["--parallelism.tp", "3"]), 4)


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "set compile.enabled = true as well"),
        (["--compile.enabled", "--model.backend", "hf"], "model.backend = 'native' only"),
        (["--compile.enabled", "--activation_checkpoint.mode", "full"], "activation_checkpointing|activation checkpointing"),
        (["--compile.enabled", "--job.recipe", "dpo"], "sft and grpo recipes only"),
    ],
)
def test_cudagraphs_refused_where_they_cannot_work(argv, message):
    with pytest.raises(ConfigError, match=message) as e:
        parse_config(["--compile.cudagraphs", *argv])
    assert e.value.key == "compile.cudagraphs"


def test_cudagraphs_on_one_device_only():
    cfg = parse_config(["--compile.enabled", "--compile.cudagraphs", "--training.batch_size", "8"])
    validate_world_size(cfg, 1)
    with pytest.raises(ConfigError, match=r"compile\.cudagraphs works on one device only.*world size is 2"):
        validate_world_size(cfg, 2)


# --- --help -------------------------------------------------------------------------------------


def test_help_lists_every_key_with_type_default_and_meaning(tmp_path):
    result = run_load_config(["--help"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for section in SECTIONS:
        assert f"[{section}]" in out
        for info in section_keys(section).values():
            line = next((ln for ln in out.splitlines() if ln.strip().startswith(f"--{info.dotted} ")), None)
            assert line is not None, f"--help does not list {info.dotted}"
            assert line.rstrip().endswith(f"= {format_value(info.default)}"), line
            assert info.help in out
    assert "--training.steps" in out and "int = 100" in out
    assert "{best_fit, padding}" in out


def test_help_exits_0_even_after_other_arguments(capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(["--training.steps", "3", "-h"])
    assert e.value.code == 0
    assert "[training]" in capsys.readouterr().out
