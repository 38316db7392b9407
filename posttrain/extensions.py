"""User code named in the config by import path: `"package.module:attribute"`.

Config keys that accept one (each also takes its built-in names):
- `model.name`      a `ModelSpec` (registered on first use; its own heads live in its model class),
- `data.format`     a row format: `fn(row: dict, where: str, tokenizer) -> (input_ids, loss_mask)`
                    (or a `TokenizedSample`); `tokenizer` is None when the run has none,
- `training.loss`   an SFT loss function: `fn(model, batch, n_global) -> posttrain.trainer.LossOutput`,
- `job.recipe`      a recipe: `run(cfg: JobConfig) -> None`.

A user package on `PYTHONPATH` is all it takes (dataloader workers and torchrun ranks import it themselves).
This module imports nothing from posttrain, so any layer may use it.
"""

from __future__ import annotations

import importlib
from typing import Any


def is_import_path(value: str) -> bool:
    """True for `module:attribute` (what the config uses to name user code)."""
    module, sep, attr = value.partition(":")
    return bool(sep) and bool(module.strip()) and bool(attr.strip())


def load_object(path: str, *, key: str = "import path") -> Any:
    """The object `module:attr` (attr may be dotted: `module:Class.method`).

    Errors name the config key and say what to change; an ImportError raised inside the user's module is
    shown as such (not as "module not found").
    """
    module_name, sep, attr = path.partition(":")
    module_name, attr = module_name.strip(), attr.strip()
    if not sep or not module_name or not attr:
        raise ValueError(f"{key} = {path!r} is not an import path; write it as 'package.module:attribute'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is not None and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise ValueError(
                f"{key} = {path!r}: no module named {e.name!r}; put the package on PYTHONPATH (or pip install it)"
            ) from e
        raise ValueError(f"{key} = {path!r}: importing {module_name!r} failed ({type(e).__name__}: {e})") from e
    except Exception as e:  # the user's module raised while importing
        raise ValueError(f"{key} = {path!r}: importing {module_name!r} failed ({type(e).__name__}: {e})") from e
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n in dir(module) if not n.startswith("_"))
            raise ValueError(
                f"{key} = {path!r}: module {module_name!r} has no attribute {attr!r} (it has: {', '.join(public[:20])})"
            )
        obj = getattr(obj, part)
    return obj


def load_callable(path: str, *, key: str) -> Any:
    """`load_object`, checked to be callable."""
    obj = load_object(path, key=key)
    if not callable(obj):
        raise ValueError(f"{key} = {path!r} is a {type(obj).__name__}, not a function or other callable")
    return obj
