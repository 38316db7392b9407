"""A run's resume fingerprint, kept in each checkpoint's `checkpoint.json`.

Two parts:
- `immutable`: what a resumed run must share with the run that wrote the checkpoint, or the state means
  something else: the recipe, the model (its resolved architecture, `model.*` choices and overrides), the
  head, LoRA, the vocabulary (size and a hash of the tokens) and the data-parallel degree (the data stream
  is split that many ways). A change is refused with one line naming the key, the saved and the new value.
- `mutable`: what a resumed run may change: learning rate and optimizer hyper-parameters, the schedule,
  the number of steps, the data. A change is logged and applied from the resumed step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from posttrain.config import JobConfig

# Architecture fields that do not change what the weights mean: kernels, init, export-only ids, RoPE cache size.
_ARGS_NOT_IMMUTABLE = frozenset(
    {"attn_backend", "init_std", "max_seq_len", "bos_token_id", "eos_token_id", "pad_token_id"}
)
DATA_KEYS = ("data.path", "data.paths", "data.weights", "data.format")


def _json_value(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict) and value:
        for key in sorted(value):
            _flatten(f"{prefix}.{key}", value[key], out)
    else:
        out[prefix] = value


def _model_args(args: Any) -> dict[str, Any]:
    fields = dataclasses.asdict(args) if dataclasses.is_dataclass(args) else dict(vars(args))
    return {k: v for k, v in fields.items() if k not in _ARGS_NOT_IMMUTABLE and not k.startswith("_")}


def vocabulary_digest(tokenizer: Any) -> str | None:
    """A SHA-256 over the tokenizer's (token, id) pairs: another tokenizer of the same size differs."""
    hf = getattr(tokenizer, "hf", None)
    if hf is None:
        return None
    items = sorted(hf.get_vocab().items(), key=lambda item: item[1])
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode()).hexdigest()


def run_fingerprint(cfg: JobConfig, *, model_args: Any, dp_degree: int, tokenizer: Any = None) -> dict[str, Any]:
    """`{"immutable": {key: value}, "mutable": {key: value}}`, flat dotted keys, JSON values."""
    m, lora = cfg.model, cfg.lora
    immutable: dict[str, Any] = {
        "job.recipe": cfg.job.recipe,
        "model.backend": m.backend,
        "model.name": m.name if not m.hf_path else None,
        "model.flavor": m.flavor if not m.hf_path else None,
        "model.head": m.head,
        "model.num_labels": m.num_labels if m.head == "classification" else None,
        "lora.rank": lora.rank,
        "lora.alpha": lora.alpha if lora.rank else None,
        "lora.targets": sorted(lora.targets) if lora.rank else None,
        "parallelism.dp_degree": dp_degree,
        "vocabulary.size": len(tokenizer) if tokenizer is not None else None,
        "vocabulary.sha256": vocabulary_digest(tokenizer) if tokenizer is not None else None,
    }
    _flatten("model.overrides", dict(m.overrides), immutable)
    _flatten("model_args", _model_args(model_args), immutable)
    immutable.pop("model.overrides", None)  # an empty overrides table flattens to one empty key
    mutable: dict[str, Any] = {
        "training.steps": cfg.training.steps,
        "data.path": cfg.data.path,
        "data.paths": list(cfg.data.paths),
        "data.weights": list(cfg.data.weights),
        "data.format": cfg.data.format,
        "data.eval_path": cfg.data.eval_path,
    }
    _flatten("optimizer", dataclasses.asdict(cfg.optimizer), mutable)
    _flatten("lr_scheduler", dataclasses.asdict(cfg.lr_scheduler), mutable)
    return _json_value({"immutable": immutable, "mutable": mutable})


def _changes(saved: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    keys = list(current) + [k for k in saved if k not in current]
    return [(k, saved.get(k), current.get(k)) for k in keys if saved.get(k) != current.get(k)]


def immutable_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, saved value, new value) of every `immutable` entry that differs, config keys before derived ones."""
    return _changes(saved.get("immutable", {}), current["immutable"])


def mutable_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    return _changes(saved.get("mutable", {}), current["mutable"])


def refusal_message(folder: str, changes: list[tuple[str, Any, Any]]) -> str:
    """One line: the first changed key with both values, how many more, and what to do."""
    key, old, new = changes[0]
    more = f" (and {len(changes) - 1} more: {', '.join(k for k, _, _ in changes[1:4])})" if len(changes) > 1 else ""
    if key == "job.recipe":
        what = f"checkpoint {folder} was written by the {old!r} recipe; this run is {new!r}{more}"
    elif key == "parallelism.dp_degree":
        return (
            f"checkpoint {folder} was written with a data-parallel degree of {old}, this run has {new}{more}: the "
            f"data stream was split {old} ways and cannot be re-split exactly. Resume with the same dp_replicate x "
            "dp_shard (tp may change), or start a new job.output_dir from an HF export (checkpoint.export_hf, then "
            "model.hf_path)."
        )
    else:
        what = f"checkpoint {folder} was written with {key} = {json.dumps(old)}, this run has {json.dumps(new)}{more}"
    return (
        f"{what}: that cannot change when resuming. Resume with the saved value, or start a new job.output_dir "
        "(from an HF export: checkpoint.export_hf, then model.hf_path)."
    )
