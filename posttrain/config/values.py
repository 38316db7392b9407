"""Turn a raw value (from TOML, or a command-line string) into the type its field declares.

Supported field types: str, int, float (an int is accepted), bool, list[str|int|float|bool], dict,
`X | None`, `Literal[...]`; a field's `choices` metadata restricts the value (each element for lists).
TOML has no null, so an optional field takes the string "none" (or "null") there too.
"""

from __future__ import annotations

import typing
from typing import Any

from posttrain.config.errors import ConfigError
from posttrain.config.schema import KeyInfo, format_value, suggest, type_name

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib  # type: ignore[no-redef]

_NONE_WORDS = ("none", "null")
_TRUE_WORDS = ("true", "1", "yes", "on")
_FALSE_WORDS = ("false", "0", "no", "off")

_EXPECTS = {str: "a string", int: "an int", float: "a float", bool: "a bool (true/false)"}
_PLURAL = {str: "strings", int: "ints", float: "floats", bool: "bools"}


def _expects(hint: Any) -> str:
    if typing.get_origin(hint) is typing.Literal:
        return "a string"
    if typing.get_origin(hint) is list:
        (elem,) = typing.get_args(hint) or (Any,)
        return f"a list of {_PLURAL.get(elem, type_name(elem))}"
    if typing.get_origin(hint) is dict or hint is dict:
        return "a table"
    return _EXPECTS.get(hint, type_name(hint))


def _type_error(info: KeyInfo, got: str) -> ConfigError:
    none = " (or none)" if info.optional else ""
    return ConfigError(f"{info.dotted} expects {_expects(info.base)}{none}, got {got}", key=info.dotted)


def _check_choices(value: Any, info: KeyInfo) -> Any:
    if info.choices is None or value is None:
        return value
    for item in value if isinstance(value, list) else [value]:
        if item not in info.choices:
            allowed = ", ".join(str(c) for c in info.choices)
            hint = suggest(str(item), [str(c) for c in info.choices])
            raise ConfigError(
                f"{info.dotted} must be one of {allowed}; got {item!r}{hint}", key=info.dotted
            )
    return value


# --- TOML (already typed) values -------------------------------------------------------------


def _toml_scalar(value: Any, hint: Any, choices: tuple | None) -> Any:
    """`value` as `hint`, or raise TypeError."""
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str or typing.get_origin(hint) is typing.Literal:
        if isinstance(value, str):
            return value
        # `fused = true` for a string field whose choices are "true"/"false"
        if isinstance(value, bool) and choices is not None and format_value(value) in choices:
            return format_value(value)
    elif hint is dict or typing.get_origin(hint) is dict:
        if isinstance(value, dict):
            return dict(value)
    elif hint is Any:
        return value
    else:
        return value  # a type this module does not know: take it as written
    raise TypeError


def convert_toml_value(value: Any, info: KeyInfo) -> Any:
    """A TOML (or JSON) value checked against, and converted to, the field's type."""
    if info.optional and (value is None or (isinstance(value, str) and value.lower() in _NONE_WORDS)):
        return None
    base = info.base
    try:
        if typing.get_origin(base) is list:
            if not isinstance(value, list):
                raise TypeError
            (elem,) = typing.get_args(base) or (Any,)
            converted = [_toml_scalar(v, elem, info.choices) for v in value]
        else:
            converted = _toml_scalar(value, base, info.choices)
    except TypeError:
        raise _type_error(info, format_value(value)) from None
    return _check_choices(converted, info)


# --- command-line strings --------------------------------------------------------------------


def _cli_scalar(text: str, hint: Any) -> Any:
    """`text` as `hint`, or raise ValueError."""
    if hint is bool:
        word = text.strip().lower()
        if word in _TRUE_WORDS:
            return True
        if word in _FALSE_WORDS:
            return False
        raise ValueError
    if hint is int:
        return int(text.strip())
    if hint is float:
        return float(text.strip())
    if hint is dict or typing.get_origin(hint) is dict:
        value = _toml_literal(text)
        if not isinstance(value, dict):
            raise ValueError
        return value
    return text  # str, Literal, or a type this module does not know


def _toml_literal(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        raise ValueError from None


def _split_list(text: str) -> list[str]:
    """`a,b,c` or `[a, b]` or `["a", "b"]` -> item strings."""
    body = text.strip()
    if body.startswith("[") and body.endswith("]"):
        body = body[1:-1]
    items = [item.strip() for item in body.split(",")]
    if items and items[-1] == "":  # a trailing comma, or an empty list
        items.pop()
    return [item[1:-1] if len(item) >= 2 and item[0] == item[-1] and item[0] in "'\"" else item for item in items]


def convert_cli_value(text: str, info: KeyInfo) -> Any:
    """A command-line string parsed as the field's type."""
    if info.optional and text.strip().lower() in _NONE_WORDS:
        return None
    base = info.base
    try:
        if typing.get_origin(base) is list:
            (elem,) = typing.get_args(base) or (Any,)
            converted = None
            if text.strip().startswith("["):
                try:  # a TOML literal: ["a,b", "c"], [1e-4, 2]
                    literal = _toml_literal(text.strip())
                    converted = [_toml_scalar(v, elem, info.choices) for v in literal]
                except (TypeError, ValueError):
                    converted = None  # e.g. [a, b] with bare words: split it ourselves
            if converted is None:
                converted = [_cli_scalar(item, elem) for item in _split_list(text)]
        else:
            converted = _cli_scalar(text, base)
    except (TypeError, ValueError):
        raise _type_error(info, repr(text)) from None
    return _check_choices(converted, info)
