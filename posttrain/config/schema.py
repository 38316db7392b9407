"""What keys exist: every section field with its type, default, meaning and allowed values.

Built once from the dataclasses in `sections.py`; the loader checks names against it and `--help`
prints it.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import types
import typing
from dataclasses import dataclass
from typing import Any

from posttrain.config.sections import SECTIONS

_MISSING = object()


@dataclass(frozen=True)
class KeyInfo:
    """One config key, e.g. section="training", name="steps"."""

    section: str
    name: str
    hint: Any  # the resolved type hint, e.g. int, list[str], float | None
    default: Any
    help: str
    choices: tuple | None

    @property
    def dotted(self) -> str:
        return f"{self.section}.{self.name}"

    @property
    def optional(self) -> bool:
        return is_optional(self.hint)

    @property
    def base(self) -> Any:
        """The hint without its `| None`."""
        return strip_optional(self.hint)


def is_optional(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)


def strip_optional(hint: Any) -> Any:
    if not is_optional(hint):
        return hint
    rest = [a for a in typing.get_args(hint) if a is not type(None)]
    return rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return _MISSING


def section_keys(section: str, cls: type | None = None) -> dict[str, KeyInfo]:
    """The keys of one section, in declaration order (``cls``: an extension's section dataclass)."""
    return _dataclass_keys(section, cls or SECTIONS[section])


@functools.cache
def _dataclass_keys(section: str, cls: type) -> dict[str, KeyInfo]:
    hints = typing.get_type_hints(cls)
    keys = {}
    for f in dataclasses.fields(cls):
        choices = f.metadata.get("choices")
        hint = hints[f.name]
        if typing.get_origin(strip_optional(hint)) is typing.Literal and choices is None:
            choices = typing.get_args(strip_optional(hint))
        keys[f.name] = KeyInfo(
            section=section,
            name=f.name,
            hint=hint,
            default=_default_of(f),
            help=f.metadata.get("help", ""),
            choices=tuple(choices) if choices is not None else None,
        )
    return keys


def all_dotted_keys() -> list[str]:
    return [info.dotted for section in SECTIONS for info in section_keys(section).values()]


def type_name(hint: Any) -> str:
    """A short, readable type: int, float | None, list[str], ..."""
    if is_optional(hint):
        return f"{type_name(strip_optional(hint))} | None"
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return "str"
    if origin is not None:
        args = ", ".join(type_name(a) for a in typing.get_args(hint))
        return f"{origin.__name__}[{args}]"
    return getattr(hint, "__name__", str(hint))


def format_value(value: Any) -> str:
    """A value the way one would write it in TOML (None as `none`, the CLI spelling)."""
    if value is None:
        return "none"
    if value is _MISSING:
        return "(required)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {format_value(v)}" for k, v in value.items()) + "}"
    return repr(value)


def suggest(word: str, candidates: list[str]) -> str:
    """' (did you mean 'x'?)' for the closest candidate, or ''."""
    match = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def suggest_key(section: str, name: str, cls: type | None = None) -> str:
    """Suggestion for an unknown `section.name`: a close key in the same section, else the same
    name in another section, else any close dotted key. `cls`: an extension section's dataclass."""
    if section in SECTIONS or cls is not None:
        close = difflib.get_close_matches(name, list(section_keys(section, cls)), n=1, cutoff=0.6)
        if close:
            return f" (did you mean '{section}.{close[0]}'?)"
    elsewhere = [info.dotted for s in SECTIONS for info in section_keys(s).values() if info.name == name]
    if elsewhere:
        return f" (did you mean '{elsewhere[0]}'?)"
    return suggest(f"{section}.{name}", all_dotted_keys())


def format_help(prog: str = "train.py") -> str:
    """Every key, grouped by section, with its type, default and one-line meaning."""
    lines = [
        f"usage: {prog} [--config FILE] [--section.key VALUE | --section.key=VALUE ...]",
        "",
        "Each value comes from the first of: a command-line override, the TOML file given with --config",
        "(files named by its top-level `include = [...]` are read first and lose to it), the default below.",
        "On the command line: lists as a,b,c or [a, b]; booleans as true/false/1/0/yes/no (a bare",
        "--section.flag means true); `none` for an optional value.",
    ]
    for section in SECTIONS:
        keys = section_keys(section).values()
        width = max(len(f"--{info.dotted}") for info in keys)
        lines += ["", f"[{section}]"]
        for info in keys:
            flag = f"--{info.dotted}".ljust(width)
            lines.append(f"  {flag}  {type_name(info.hint)} = {format_value(info.default)}")
            meaning = info.help
            if info.choices is not None:
                meaning += f"  {{{', '.join(str(c) for c in info.choices)}}}"
            lines.append(f"      {meaning}")
    return "\n".join(lines) + "\n"
