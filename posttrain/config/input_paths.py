"""The files a run reads must exist before it writes anything or asks the Hub.

A missing local path is one line naming the key, its value and, for the inputs the shipped configs expect
another command to make, that command. A value that is not a local path but could be a Hugging Face Hub id
(`Qwen/Qwen3-1.7B`) is left to the loader, which downloads it; one that cannot be a Hub id
(`outputs/debug_sft/hf`, `./tokenizer`) is a missing local path, reported at once instead of after the Hub
client's retries.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from posttrain.config.errors import ConfigError

if TYPE_CHECKING:
    from posttrain.config.loader import JobConfig

# huggingface_hub's repo-id rule: "name" or "namespace/name", letters, digits, - _ . ; no "--" or ".."; <= 96 chars
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[\w.-]+$")

# What the shipped configs read that another command writes (longest prefix first).
MADE_BY = (
    ("outputs/debug_grpo_warmstart/", "python scripts/make_grpo_warmstart.py"),
    ("outputs/debug_sft/", "python train.py --config train_configs/debug_sft.toml"),
    ("outputs/smollm2-135m-instruct", "python scripts/convert_gguf_to_hf.py --out outputs/smollm2-135m-instruct"),
    ("data/math/", "python scripts/make_math_data.py"),
)


def could_be_hub_id(value: str) -> bool:
    """Whether `value` is a syntactically valid Hub repo id (it may still not exist)."""
    return (
        bool(_HUB_ID.match(value)) and len(value) <= 96 and "--" not in value and ".." not in value
        and not value.startswith((".", "/", "~"))
    )


def _maker_hint(value: str) -> str:
    normalized = value.removeprefix("./")
    for prefix, command in MADE_BY:
        if normalized.startswith(prefix) or normalized == prefix.rstrip("/"):
            return f"; it is made by `{command}`: run that first"
    return ""


def _missing(key: str, value: str, what: str) -> ConfigError:
    return ConfigError(f"{key} = {value!r}: {what} (relative paths start from {Path.cwd()})"
                       f"{_maker_hint(value)}", key=key)


def _check_model_folder(key: str, value: str) -> None:
    """A checkpoint or tokenizer: a local folder, or a Hub id."""
    if not value or Path(value).expanduser().exists() or could_be_hub_id(value):
        return
    raise _missing(key, value, "no such local folder, and it cannot be a Hub id")


def _check_data(key: str, value: str) -> None:
    """A data file, folder or glob; URLs (`s3://`, `hf://`, ...) are checked by the data reader."""
    if not value or "://" in value or any(ch in value for ch in "*?["):
        return
    if not Path(value).expanduser().exists():
        raise _missing(key, value, "no such file or folder")


def check_tokenizer_given(cfg: "JobConfig") -> None:
    """The built-in recipes read text through a tokenizer unless the data are token ids (or the user's format)."""
    if cfg.tokenizer.path or cfg.model.hf_path or cfg.job.recipe not in ("sft", "dpo", "reward_model", "distill"):
        return
    if cfg.job.recipe == "sft" and (cfg.data.format == "tokens" or ":" in cfg.data.format):
        return
    raise ConfigError(
        "tokenizer.path is empty and there is no model.hf_path (whose folder holds one): set one of them, or use "
        "data.format = 'tokens' for pre-tokenized rows", key="tokenizer.path",
    )


def check_input_paths(cfg: "JobConfig") -> None:
    """Raise ConfigError for the first input path of `cfg` that does not exist (see the module docstring)."""
    _check_model_folder("model.hf_path", cfg.model.hf_path)
    _check_model_folder("tokenizer.path", cfg.tokenizer.path)
    _check_model_folder("distill.teacher_hf_path", cfg.distill.teacher_hf_path)
    _check_data("tokenizer.add_tokens_file", cfg.tokenizer.add_tokens_file)
    _check_data("data.path", cfg.data.path)
    for i, path in enumerate(cfg.data.paths):
        _check_data(f"data.paths[{i}]", path)
    _check_data("data.eval_path", cfg.data.eval_path)
    _check_data("evaluation.generation_path", cfg.evaluation.generation_path)
    for key, value in (("grpo.prompts", cfg.grpo.prompts), ("grpo.eval_prompts", cfg.grpo.eval_prompts)):
        if not value.startswith("reasoning_gym:"):
            _check_data(key, value)
