"""Config: one dataclass per component, read from TOML (+ `include`) and command-line overrides."""

from posttrain.config.errors import ConfigError
from posttrain.config.loader import (
    JobConfig,
    config_from_dict,
    config_to_dict,
    load_config,
    parse_config,
)
from posttrain.config.schema import format_help
from posttrain.config.sections import SECTIONS
from posttrain.config.validate import validate, validate_world_size

__all__ = [
    "SECTIONS",
    "ConfigError",
    "JobConfig",
    "config_from_dict",
    "config_to_dict",
    "format_help",
    "load_config",
    "parse_config",
    "validate",
    "validate_world_size",
]
