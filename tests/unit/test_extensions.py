"""User code named by import path (`module:attr`), model vocab / size overrides for from-scratch models."""

from __future__ import annotations

import sys
import textwrap

import pytest

from posttrain.config import load_config
from posttrain.datasets.sft_format import tokenize_row
from posttrain.extensions import is_import_path, load_callable, load_object
from posttrain.models import registry
from posttrain.models.registry import get_model_spec, resolve_scratch_args


@pytest.fixture
def user_package(tmp_path, monkeypatch):
    pkg = tmp_path / "my_ext"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent("""
        import dataclasses
        from posttrain.models.qwen3 import MODEL_SPEC as _QWEN3

        SPEC = dataclasses.replace(_QWEN3, name="my_qwen", hf_model_types=())
        NOT_A_SPEC = 3

        def reversed_ids(row, where, tokenizer):
            ids = list(reversed(row["ids"]))
            return ids, [True] * len(ids)
    """))
    (pkg / "broken.py").write_text("import does_not_exist_anywhere\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_ext"
    for name in [m for m in sys.modules if m.startswith("my_ext")]:
        del sys.modules[name]
    for key in [k for k, spec in registry._SPECS.items() if spec.name == "my_qwen"]:
        del registry._SPECS[key]  # leave the registry as other tests expect it


def test_load_object_finds_the_attribute_and_names_the_key_on_errors(user_package):
    assert load_object("my_ext:NOT_A_SPEC") == 3
    assert is_import_path("a.b:c") and not is_import_path("sft") and not is_import_path(":x")
    with pytest.raises(ValueError, match=r"job.recipe = 'nope_pkg:run': no module named 'nope_pkg'; put .* PYTHONPATH"):
        load_object("nope_pkg:run", key="job.recipe")
    with pytest.raises(ValueError, match=r"training.loss = 'my_ext:missing': module 'my_ext' has no attribute"):
        load_object("my_ext:missing", key="training.loss")
    with pytest.raises(ValueError, match=r"importing 'my_ext.broken' failed \(ModuleNotFoundError"):
        load_object("my_ext.broken:x", key="data.format")
    with pytest.raises(ValueError, match="not a function"):
        load_callable("my_ext:NOT_A_SPEC", key="training.loss")


def test_a_model_spec_by_import_path_is_registered_on_first_use(user_package):
    spec = get_model_spec("my_ext:SPEC")
    assert spec.name == "my_qwen" and get_model_spec("my_qwen") is spec
    with pytest.raises(KeyError, match="is a int, not a posttrain.models.registry.ModelSpec"):
        get_model_spec("my_ext:NOT_A_SPEC")


def test_a_data_format_by_import_path_turns_rows_into_samples(user_package):
    sample = tokenize_row({"ids": [1, 2, 3]}, "my_ext:reversed_ids", "f:1", None)
    assert sample.input_ids.tolist() == [3, 2, 1] and sample.loss_mask.all()


def test_config_takes_builtin_names_or_import_paths_only():
    cfg = load_config(["--job.recipe", "pkg.mod:run", "--data.format", "tokens", "--training.loss", "pkg:loss"])
    assert (cfg.job.recipe, cfg.data.format, cfg.training.loss) == ("pkg.mod:run", "tokens", "pkg:loss")
    for key, value in (("job.recipe", "sftt"), ("data.format", "token"), ("training.loss", "mse")):
        with pytest.raises(SystemExit):
            load_config([f"--{key}", value])
    with pytest.raises(SystemExit):
        load_config(["--model.hf_path", "some/dir", "--model.vocab_size", "512"])


def test_config_errors_name_the_key(capsys):
    with pytest.raises(SystemExit):
        load_config(["--job.recipe", "sftt"])
    err = capsys.readouterr().err
    assert "job.recipe" in err and "module:attr" in err and "did you mean 'sft'" in err


def test_scratch_args_take_the_vocab_and_size_overrides():
    spec = get_model_spec("qwen3")
    args = resolve_scratch_args(spec, "0.6B", vocab_size=512, overrides={"n_layers": 2, "dim": 64, "ffn_dim": 128})
    assert (args.vocab_size, args.padded_vocab_size, args.n_layers, args.dim) == (512, 512, 2, 64)
    assert args.eos_token_id is None and args.bos_token_id is None  # the flavor's HF ids are out of range
    assert spec.flavors["0.6B"].vocab_size == 151936  # the flavor itself is untouched
    with pytest.raises(TypeError, match=r"no field\(s\) \['dimm'\]"):
        resolve_scratch_args(spec, "debug", overrides={"dimm": 3})


@pytest.fixture
def recipe_with_section(tmp_path, monkeypatch):
    pkg = tmp_path / "my_recipe_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent("""
        from dataclasses import dataclass

        @dataclass
        class RoundsSection:
            rounds: int = 3
            temperature: float = 1.0

            def __post_init__(self):
                if self.rounds < 1:
                    raise ValueError(f"rounds must be at least 1, got {self.rounds}")

        CONFIG_SECTIONS = {"rounds": RoundsSection}

        def run(cfg):
            return cfg.extensions["rounds"]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith("my_recipe_pkg")]:
        del sys.modules[name]


def test_a_recipe_by_import_path_declares_its_own_config_section(recipe_with_section):
    from posttrain.config import ConfigError, config_from_dict, config_to_dict, parse_config

    toml = recipe_with_section / "run.toml"
    toml.write_text('[job]\nrecipe = "my_recipe_pkg:run"\n[rounds]\nrounds = 5\n')
    cfg = parse_config(["--config", str(toml), "--rounds.temperature", "0.5"])
    section = cfg.extensions["rounds"]
    assert (type(section).__name__, section.rounds, section.temperature) == ("RoundsSection", 5, 0.5)
    # defaults when the file has no [rounds] table; a round trip through config.json keeps it
    plain = parse_config(["--job.recipe", "my_recipe_pkg:run"])
    assert plain.extensions["rounds"].rounds == 3
    assert config_from_dict(config_to_dict(cfg)).extensions["rounds"].rounds == 5

    toml.write_text('[job]\nrecipe = "my_recipe_pkg:run"\n[rounds]\nround = 5\n')
    with pytest.raises(ConfigError, match=r"run.toml: unknown key 'rounds.round' \(did you mean 'rounds.rounds'"):
        parse_config(["--config", str(toml)])
    toml.write_text('[job]\nrecipe = "my_recipe_pkg:run"\n[rounds]\nrounds = "many"\n')
    with pytest.raises(ConfigError, match=r"run.toml: .*rounds.rounds"):
        parse_config(["--config", str(toml)])
    with pytest.raises(ConfigError, match=r"\[rounds\]: rounds must be at least 1"):
        parse_config(["--job.recipe", "my_recipe_pkg:run", "--rounds.rounds", "0"])
    # the same table without the recipe that declares it: refused, naming the file
    toml.write_text('[rounds]\nrounds = 5\n')
    with pytest.raises(ConfigError, match=r"run.toml: unknown section 'rounds' \(a recipe or model named by import"):
        parse_config(["--config", str(toml)])
