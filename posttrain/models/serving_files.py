"""What a server needs from an exported folder besides the weights: where generation stops, and files it may read.

transformers' ``generate`` and vLLM stop on the ids in ``generation_config.json`` (vLLM also on the tokenizer's
eos; both fall back to ``config.json``'s ``eos_token_id``). A chat model ends its turn with the template's
end-of-turn token (``<|im_end|>``, ``<|eot_id|>``, ...), which is often not the tokenizer's eos, so an export
without these ids generates past the end of the answer. Every export (full, merged LoRA, PEFT adapter, reward
model) goes through `write_serving_config` and `make_readable`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

GENERATION_CONFIG_NAME = "generation_config.json"
CONFIG_NAME = "config.json"


def read_generation_config(folder: str | os.PathLike[str] | None) -> dict[str, Any] | None:
    """The source model's ``generation_config.json`` (sampling defaults, eos ids), or None when it has none."""
    if not folder:
        return None
    path = Path(folder) / GENERATION_CONFIG_NAME
    if not path.is_file():
        return None
    with open(path) as f:
        return json.load(f)


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(value)] if isinstance(value, int) else [int(v) for v in value]


def tokenizer_token_ids(tokenizer: Any) -> dict[str, Any]:
    """``eos_token_id`` (every id generation stops at, end-of-turn first), ``bos_token_id`` and ``pad_token_id`` of
    a posttrain ``HFTokenizer`` or a transformers tokenizer; ids the tokenizer lacks are left out."""
    if tokenizer is None:
        return {}
    if hasattr(tokenizer, "stop_ids"):  # HFTokenizer: template end-of-turn, eos, known end-of-turn tokens
        stops, bos, pad = list(tokenizer.stop_ids()), tokenizer.bos_id, tokenizer.pad_id
    else:
        stops = _as_list(getattr(tokenizer, "eos_token_id", None))
        bos, pad = getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "pad_token_id", None)
    ids: dict[str, Any] = {}
    if stops:
        ids["eos_token_id"] = stops
    if bos is not None:
        ids["bos_token_id"] = int(bos)
    if pad is not None:
        ids["pad_token_id"] = int(pad)
    return ids


def write_json(path: Path, obj: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def serving_generation_config(
    source: dict[str, Any] | None, token_ids: dict[str, Any], fallback: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The export's generation config: the source model's (its sampling defaults kept), its eos ids joined by the
    tokenizer's, and bos / pad from the tokenizer where the source has none. `fallback` (the model's own ids, for a
    run with no tokenizer) fills what both lack."""
    config = dict(source or {})
    eos = list(dict.fromkeys(_as_list(config.get("eos_token_id")) + token_ids.get("eos_token_id", [])))
    if not eos and fallback:
        eos = _as_list(fallback.get("eos_token_id"))
    if eos:
        config["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    for key in ("bos_token_id", "pad_token_id"):
        value = token_ids.get(key, (fallback or {}).get(key))
        if config.get(key) is None and value is not None:
            config[key] = value
    return config


def write_serving_config(
    out_dir: str | os.PathLike[str],
    tokenizer: Any = None,
    source_generation_config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``generation_config.json`` into `out_dir` and put the same eos / bos / pad ids into its
    ``config.json`` (when it has one: a PEFT adapter folder has none). Returns the generation config."""
    out = Path(out_dir)
    config_path = out / CONFIG_NAME
    config = json.loads(config_path.read_text()) if config_path.is_file() else None
    fallback = {k: config.get(k) for k in ("eos_token_id", "bos_token_id", "pad_token_id")} if config else None
    generation = serving_generation_config(source_generation_config, tokenizer_token_ids(tokenizer), fallback)
    if config is not None:
        for key in ("eos_token_id", "bos_token_id", "pad_token_id"):
            if generation.get(key) is not None:
                config[key] = generation[key]
        write_json(config_path, config)
    if generation:
        write_json(out / GENERATION_CONFIG_NAME, generation)
    return generation


def save_tokenizer(tokenizer: Any, out: str | os.PathLike[str]) -> None:
    """The tokenizer's files (a transformers tokenizer or posttrain's ``HFTokenizer``) into `out`."""
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(out))
    elif hasattr(tokenizer, "save"):
        tokenizer.save(str(out))
    else:
        raise TypeError(f"cannot save tokenizer {type(tokenizer).__name__}: it has neither save_pretrained nor save")


def make_readable(out_dir: str | os.PathLike[str]) -> None:
    """Give every file of `out_dir` the mode a plain ``open()`` would (0644 under the usual umask 022).

    safetensors writes its files 0600, which a server running as another user cannot read."""
    umask = os.umask(0)
    os.umask(umask)
    for path in Path(out_dir).rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, 0o666 & ~umask)
