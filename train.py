"""The one entrypoint: config -> recipe -> run. Works under `torchrun` and as plain `python`.

    python train.py --config train_configs/debug_sft.toml [--section.key VALUE ...]
    torchrun --nproc_per_node=2 train.py --config train_configs/debug_sft.toml

With no `--config`, the embedded default `train_configs/debug_sft.toml` runs (overrides still apply). A user's
mistake (a missing input, a bad data row, a config value) ends the run with its one-line message (exit code 1; 2
for a config file or override that does not parse), never a traceback.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from pathlib import Path

from posttrain.config import ConfigError, load_config
from posttrain.config.input_paths import check_input_paths, check_tokenizer_given
from posttrain.datasets.errors import DataError, data_worker_death
from posttrain.extensions import load_callable

RECIPES = {
    "sft": "posttrain.recipes.sft",
    "dpo": "posttrain.recipes.dpo",
    "reward_model": "posttrain.recipes.reward_model",
    "distill": "posttrain.recipes.distill",
    "grpo": "posttrain.rl.controller",
}
DEFAULT_CONFIG = Path(__file__).resolve().parent / "train_configs" / "debug_sft.toml"
USER_ERRORS = (ConfigError, DataError)


def with_default_config(argv: list[str]) -> list[str]:
    """`argv` with `--config <the embedded default>` in front when it names no config (help aside)."""
    if any(a == "--config" or a.startswith("--config=") or a in ("-h", "--help") for a in argv):
        return argv
    shown = os.path.relpath(DEFAULT_CONFIG)
    if shown.startswith(".."):
        shown = str(DEFAULT_CONFIG)
    print(f"no --config given: running the embedded default, {shown}", file=sys.stderr, flush=True)
    return ["--config", shown, *argv]


def user_error(err: BaseException) -> BaseException | None:
    """The user's mistake behind `err` (itself, or the cause a Ray actor's error carries), or None for a bug."""
    cause = getattr(err, "cause", None)  # ray.exceptions.RayTaskError
    if isinstance(cause, USER_ERRORS):
        return cause
    return err if isinstance(err, USER_ERRORS) else None


def main(argv: list[str] | None = None) -> None:
    cfg = load_config(with_default_config(list(sys.argv[1:] if argv is None else argv)))
    try:
        if cfg.job.dry_run:
            from posttrain.dry_run import dry_run

            dry_run(cfg)
            return
        check_tokenizer_given(cfg)  # before anything is written or fetched
        check_input_paths(cfg)
        if cfg.job.recipe in RECIPES:
            try:
                run = importlib.import_module(RECIPES[cfg.job.recipe]).run
            except ModuleNotFoundError as err:
                raise SystemExit(f"job.recipe = {cfg.job.recipe!r} is not available in this version ({err})") from err
        else:  # the user's own recipe, `module:attr` (posttrain/extensions.py)
            try:
                run = load_callable(cfg.job.recipe, key="job.recipe")
            except ValueError as err:
                raise SystemExit(str(err)) from err
        run(cfg)
    except Exception as err:
        mistake = user_error(err)
        if mistake is None and isinstance(err, RuntimeError):  # torch's SIGCHLD handler: a dead data worker
            mistake = data_worker_death(err, cfg.data.path or ", ".join(cfg.data.paths) or "the data")
        if mistake is None:
            raise
        # what the failed run holds through the traceback (a trainer, a data loader and its workers) goes now,
        # while stderr is open: torn down at interpreter exit, a dead worker's loader printed "lost sys.stderr"
        # after the message (seen once under load in CI)
        traceback.clear_frames(err.__traceback__)
        raise SystemExit(str(mistake)) from None  # the one line on stderr, exit code 1, like every other refusal


if __name__ == "__main__":
    main()
