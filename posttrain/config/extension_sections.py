"""Config sections of user code: a recipe, model, data format or loss named by import path may declare its
own sections, checked like the built-in ones.

    # my_pkg/recipe.py, used as  job.recipe = "my_pkg.recipe:run"
    @dataclass
    class MyRecipeSection:
        temperature: float = 1.0
        rounds: int = 3

    CONFIG_SECTIONS = {"my_recipe": MyRecipeSection}

    def run(cfg: JobConfig) -> None:
        section = cfg.extensions["my_recipe"]   # a MyRecipeSection

In the TOML file ``[my_recipe]`` then takes ``temperature`` and ``rounds`` (``--my_recipe.rounds 5`` on the
command line); an unknown key, a wrong type or an undeclared section is refused naming the file and key.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

from posttrain.config.errors import ConfigError
from posttrain.config.sections import SECTIONS
from posttrain.extensions import is_import_path, load_object

# The config keys that may name user code; the module each one names may hold CONFIG_SECTIONS.
EXTENSION_KEYS = ("job.recipe", "model.name", "data.format", "training.loss")
# Where an extension section's table was read (its error names that file even when the table has no keys)
SECTION_SOURCE = ""


def declared_extension_sections(chosen: dict[str, Any], *, must_import: bool = True) -> dict[str, type]:
    """{section name: dataclass} declared by the modules that `chosen` ({config key: value}) names.
    `must_import=False`: a module that does not import declares nothing (whoever loads it reports why)."""
    declared: dict[str, type] = {}
    for key, value in chosen.items():
        if not isinstance(value, str) or not is_import_path(value):
            continue
        try:
            load_object(value, key=key)
        except ValueError as e:
            if not must_import:
                continue
            raise ConfigError(str(e), key=key) from None
        module_name = value.partition(":")[0].strip()
        sections = getattr(sys.modules[module_name], "CONFIG_SECTIONS", {})
        if not isinstance(sections, dict):
            raise ConfigError(f"{module_name}.CONFIG_SECTIONS must be a dict of section name -> dataclass", key=key)
        for name, cls in sections.items():
            if not isinstance(name, str) or not dataclasses.is_dataclass(cls) or not isinstance(cls, type):
                raise ConfigError(
                    f"{module_name}.CONFIG_SECTIONS[{name!r}] must be a dataclass (the section's keys)", key=key
                )
            if name in SECTIONS:
                raise ConfigError(f"{module_name}.CONFIG_SECTIONS declares '{name}', a built-in section", key=key)
            if declared.get(name, cls) is not cls:
                raise ConfigError(f"section '{name}' is declared twice, by {declared[name].__module__} and {module_name}",
                                  key=key)
            declared[name] = cls
    return declared
