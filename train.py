"""The one entrypoint: config -> recipe -> run. Works under `torchrun` and as plain `python`.

    python train.py --config train_configs/debug_sft.toml [--section.key VALUE ...]
    torchrun --nproc_per_node=2 train.py --config train_configs/debug_sft.toml
"""

from __future__ import annotations

import importlib
import sys

from posttrain.config import load_config
from posttrain.datasets.errors import DataError, data_worker_death
from posttrain.extensions import load_callable

RECIPES = {
    "sft": "posttrain.recipes.sft",
    "dpo": "posttrain.recipes.dpo",
    "reward_model": "posttrain.recipes.reward_model",
    "distill": "posttrain.recipes.distill",
    "grpo": "posttrain.rl.controller",
}


def main(argv: list[str] | None = None) -> None:
    cfg = load_config(sys.argv[1:] if argv is None else argv)
    if cfg.job.dry_run:
        from posttrain.dry_run import dry_run

        dry_run(cfg)
        return
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
    try:
        run(cfg)
    except DataError as err:  # bad data or data settings: the message names the file:line or key
        raise SystemExit(str(err)) from err
    except RuntimeError as err:  # torch's SIGCHLD handler raises a dead data worker wherever training is
        died = data_worker_death(err, cfg.data.path or ", ".join(cfg.data.paths) or "the data")
        if died is None:
            raise
        raise SystemExit(died) from err


if __name__ == "__main__":
    main()
