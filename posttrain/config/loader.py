"""Build a JobConfig from defaults, a TOML file (with `include`s) and command-line overrides.

    python train.py --config train_configs/debug_sft.toml --training.steps 20 --data.path=x.jsonl

Precedence: command line > TOML (the including file > the files it includes, later includes > earlier
ones) > the dataclass defaults in `sections.py`. Every value is checked against its field's type and
`choices` as it is read, so an error names the file (or "command line") that set it; `validate` then
checks ranges and keys that must agree.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from posttrain.config.errors import ConfigError
from posttrain.config.extension_sections import EXTENSION_KEYS, SECTION_SOURCE, declared_extension_sections
from posttrain.config.schema import KeyInfo, format_help, format_value, section_keys, suggest, suggest_key
from posttrain.config.sections import (
    SECTIONS,
    ActivationCheckpointSection,
    CheckpointSection,
    CompileSection,
    DataSection,
    JobSection,
    LoRASection,
    LRSchedulerSection,
    DistillSection,
    DPOSection,
    EvaluationSection,
    GRPOSection,
    MetricsSection,
    ModelSection,
    OptimizerSection,
    ParallelismSection,
    ProfilingSection,
    TokenizerSection,
    TrainingSection,
)
from posttrain.config.validate import validate
from posttrain.config.values import convert_cli_value, convert_toml_value

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib  # type: ignore[no-redef]

COMMAND_LINE = "command line"


@dataclass
class JobConfig:
    """The whole run's settings, one dataclass per component. Hand each component its own section."""

    job: JobSection = field(default_factory=JobSection)
    model: ModelSection = field(default_factory=ModelSection)
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    data: DataSection = field(default_factory=DataSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    lr_scheduler: LRSchedulerSection = field(default_factory=LRSchedulerSection)
    parallelism: ParallelismSection = field(default_factory=ParallelismSection)
    activation_checkpoint: ActivationCheckpointSection = field(default_factory=ActivationCheckpointSection)
    compile: CompileSection = field(default_factory=CompileSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    lora: LoRASection = field(default_factory=LoRASection)
    dpo: DPOSection = field(default_factory=DPOSection)
    distill: DistillSection = field(default_factory=DistillSection)
    grpo: GRPOSection = field(default_factory=GRPOSection)
    evaluation: EvaluationSection = field(default_factory=EvaluationSection)
    profiling: ProfilingSection = field(default_factory=ProfilingSection)
    # Sections declared by user code named by import path (posttrain/config/extension_sections.py)
    extensions: dict[str, Any] = field(default_factory=dict)


_missing = set(SECTIONS) - {f.name for f in dataclasses.fields(JobConfig)}
if _missing:  # a section registered in SECTIONS needs its JobConfig field too
    raise ImportError(f"JobConfig has no field for the config section(s) {sorted(_missing)}; add them in loader.py")


# section -> key -> (value already converted to the field's type, where it came from)
_Layer = dict[str, dict[str, tuple[Any, str]]]


def _merge(into: _Layer, layer: _Layer) -> None:
    """`layer`'s keys win over `into`'s."""
    for section, keys in layer.items():
        into.setdefault(section, {}).update(keys)


def _lookup_key(section: str, name: str, *, source: str, cls: type | None = None) -> KeyInfo:
    if section not in SECTIONS and cls is None:
        raise ConfigError(f"unknown section '{section}'{suggest(section, list(SECTIONS))}", source=source)
    keys = section_keys(section, cls)
    if name not in keys:
        dotted = f"{section}.{name}"
        raise ConfigError(f"unknown key '{dotted}'{suggest_key(section, name, cls)}", source=source, key=dotted)
    return keys[name]


def _top_level_key_error(key: str, value: Any, source: str) -> ConfigError:
    if isinstance(value, dict):
        return ConfigError(f"unknown section '{key}'{suggest(key, list(SECTIONS))}", source=source)
    owners = [s for s in SECTIONS if key in section_keys(s)]
    hint = f" (did you mean '{owners[0]}.{key}'?)" if owners else ""
    return ConfigError(f"top-level key '{key}' is not a section; put it under its [section] table{hint}", source=source)


def _layer_from_tables(tables: dict[str, Any], source: str) -> _Layer:
    """Check and convert {section: {key: value}} (parsed TOML or JSON) read from `source`."""
    layer: _Layer = {}
    for section, table in tables.items():
        if section not in SECTIONS and not isinstance(table, dict):
            raise _top_level_key_error(section, table, source)
        if not isinstance(table, dict):
            raise ConfigError(f"'{section}' must be a table ([{section}]), got {format_value(table)}", source=source)
        if section not in SECTIONS:  # maybe an extension's section: checked once the extensions are known
            layer.setdefault(section, {}).update({name: (value, source) for name, value in table.items()})
            layer[section].setdefault(SECTION_SOURCE, (None, source))
            continue
        for name, value in table.items():
            info = _lookup_key(section, name, source=source)
            try:
                layer.setdefault(section, {})[name] = (convert_toml_value(value, info), source)
            except ConfigError as e:
                raise e.with_source(source) from None
    return layer


def _display_path(path: Path) -> str:
    """A path as short as it can be said from the current directory."""
    try:
        rel = os.path.relpath(path)
    except ValueError:  # another drive on Windows
        return str(path)
    return str(path) if rel.startswith("..") else rel


def _include_names(value: Any, source: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ConfigError(f"include expects a file name or a list of file names, got {format_value(value)}", source=source)


def _load_toml(path: Path, display: str, chain: tuple[tuple[Path, str], ...] = ()) -> _Layer:
    """The file's keys over those of the files it includes (loaded first, recursively)."""
    resolved = path.resolve()
    try:
        with open(resolved, "rb") as f:
            tables = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"invalid TOML: {e}", source=display) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read the file: {e}", source=display) from None

    layer: _Layer = {}
    chain = chain + ((resolved, display),)
    for name in _include_names(tables.pop("include", []), display):
        target = (resolved.parent / Path(name).expanduser()).resolve()
        if not target.is_file():
            raise ConfigError(f"include '{name}' not found (looked at {target})", source=display)
        if any(target == seen for seen, _ in chain):
            start = next(i for i, (seen, _) in enumerate(chain) if seen == target)
            cycle = " -> ".join([shown for _, shown in chain[start:]] + [_display_path(target)])
            raise ConfigError(f"include cycle: {cycle}", source=display)
        _merge(layer, _load_toml(target, _display_path(target), chain))
    _merge(layer, _layer_from_tables(tables, display))
    return layer


def _split_argv(argv: Sequence[str]) -> tuple[str | None, list[tuple[str, str | None]]]:
    """(--config FILE, [(dotted key, value text or None for a bare flag)]); prints help on -h/--help."""
    config_file: str | None = None
    overrides: list[tuple[str, str | None]] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        following = argv[i + 1] if i + 1 < len(argv) else None
        has_value = following is not None and not following.startswith("--")
        if token in ("-h", "--help"):
            sys.stdout.write(format_help())
            raise SystemExit(0)
        if token == "--config" or token.startswith("--config="):
            if config_file is not None:
                raise ConfigError("--config given more than once", source=COMMAND_LINE)
            if "=" in token:
                config_file = token.split("=", 1)[1]
            elif has_value:
                config_file, i = following, i + 1
            else:
                raise ConfigError("--config expects a file", source=COMMAND_LINE)
        elif token.startswith("--") and len(token) > 2:
            key, eq, text = token[2:].partition("=")
            if eq:
                overrides.append((key, text))
            elif has_value:
                overrides.append((key, following))
                i += 1
            else:
                overrides.append((key, None))
        else:
            raise ConfigError(
                f"unexpected argument '{token}' (overrides look like --section.key VALUE or --section.key=VALUE)",
                source=COMMAND_LINE,
            )
        i += 1
    return config_file, overrides


def _override_layer(overrides: list[tuple[str, str | None]]) -> _Layer:
    layer: _Layer = {}
    for raw_key, text in overrides:
        key = raw_key.replace("-", "_")
        section, dot, name = key.partition(".")
        if not dot:
            if key in SECTIONS:
                raise ConfigError(f"--{raw_key} needs a key: --{key}.KEY", source=COMMAND_LINE)
            owners = [s for s in SECTIONS if key in section_keys(s)]
            hint = f" (did you mean '--{owners[0]}.{key}'?)" if owners else ""
            raise ConfigError(f"unknown option '--{raw_key}'; overrides look like --section.key{hint}", source=COMMAND_LINE)
        if section not in SECTIONS:  # maybe an extension's section: checked once the extensions are known
            layer.setdefault(section, {})[name] = (text, COMMAND_LINE)
            layer[section].setdefault(SECTION_SOURCE, (None, COMMAND_LINE))
            continue
        info = _lookup_key(section, name, source=COMMAND_LINE)
        if text is None:
            if info.base is not bool:
                raise ConfigError(f"--{info.dotted} expects a value", source=COMMAND_LINE, key=info.dotted)
            text = "true"  # a bare boolean flag
        try:
            layer.setdefault(section, {})[name] = (convert_cli_value(text, info), COMMAND_LINE)
        except ConfigError as e:
            raise e.with_source(COMMAND_LINE) from None
    return layer


def _extension_layer(layer: _Layer) -> tuple[_Layer, dict[str, type]]:
    """The sections of `layer` that no built-in owns, checked and converted against the sections declared by
    the user code the config names; an undeclared section or key is refused naming the file (or command
    line) that set it."""
    def chosen(section: str, name: str) -> str:
        entry = layer.get(section, {}).get(name)
        return entry[0] if entry is not None else getattr(SECTIONS[section](), name)

    pending = {s: keys for s, keys in layer.items() if s not in SECTIONS}
    # Without a table to check, user code that does not import is left to the run to report (it loads it).
    chosen_values = {key: chosen(*key.split(".")) for key in EXTENSION_KEYS}
    declared = declared_extension_sections(chosen_values, must_import=bool(pending))
    out: _Layer = {}
    for section, keys in pending.items():
        cls = declared.get(section)
        if cls is None:
            source = keys[SECTION_SOURCE][1]
            hint = suggest(section, [*SECTIONS, *declared]) or (
                " (a recipe or model named by import path declares its own sections in its module's CONFIG_SECTIONS)"
            )
            raise ConfigError(f"unknown section '{section}'{hint}", source=source)
        out[section] = {}
        for name, (raw, source) in keys.items():
            if name == SECTION_SOURCE:
                continue
            info = _lookup_key(section, name, source=source, cls=cls)
            convert = convert_cli_value if source == COMMAND_LINE else convert_toml_value
            try:
                out[section][name] = (convert(raw, info), source)
            except ConfigError as e:
                raise e.with_source(source) from None
    return out, declared


def _build(layer: _Layer) -> JobConfig:
    extension_layer, declared = _extension_layer(layer)
    extensions = {}
    for section, cls in declared.items():
        values = {name: value for name, (value, _) in extension_layer.get(section, {}).items()}
        try:
            extensions[section] = cls(**values)
        except (TypeError, ValueError) as e:  # a missing required key or the dataclass's own check
            raise ConfigError(f"[{section}]: {e}", key=section) from None
    return JobConfig(
        **{
            section: cls(**{name: value for name, (value, _) in layer.get(section, {}).items()})
            for section, cls in SECTIONS.items()
        },
        extensions=extensions,
    )


def _validated(layer: _Layer) -> JobConfig:
    cfg = _build(layer)
    try:
        validate(cfg)
    except ConfigError as e:
        if e.key is not None:
            section, _, name = e.key.partition(".")
            if name in layer.get(section, {}):
                raise e.with_source(layer[section][name][1]) from None
        raise
    return cfg


def parse_config(argv: Sequence[str] | None = None) -> JobConfig:
    """Parse `[--config FILE] [--section.key VALUE | --section.key=VALUE ...]`; raise ConfigError.

    `argv` defaults to sys.argv[1:]. `-h` / `--help` prints every key and exits 0.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    config_file, overrides = _split_argv(argv)
    layer: _Layer = {}
    if config_file is not None:
        path = Path(config_file).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"config file '{config_file}' not found (looked at {path.resolve()})", source=COMMAND_LINE
            )
        _merge(layer, _load_toml(path, config_file))
    _merge(layer, _override_layer(overrides))
    return _validated(layer)


def load_config(argv: Sequence[str] | None = None) -> JobConfig:
    """`parse_config` for entrypoints: on a ConfigError, print it to stderr and exit with code 2."""
    try:
        return parse_config(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def config_to_dict(cfg: JobConfig) -> dict[str, dict[str, Any]]:
    """{section: {key: value}}, JSON-serializable (for <output_dir>/config.json)."""
    out = {section: dataclasses.asdict(getattr(cfg, section)) for section in SECTIONS}
    out.update({section: dataclasses.asdict(value) for section, value in cfg.extensions.items()})
    return out


def config_from_dict(tables: dict[str, Any], *, source: str = "config dict") -> JobConfig:
    """The inverse of `config_to_dict` (missing keys take defaults); checked like a TOML file."""
    return _validated(_layer_from_tables(dict(tables), source))
