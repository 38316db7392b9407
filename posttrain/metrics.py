"""Training metrics: FLOP counting for MFU, memory, and the console / TensorBoard / metrics.jsonl logger.

MFU here counts the FLOPs that are actually computed, not a `6 * N * tokens` estimate:
* dense matmuls: 6 FLOPs per trainable weight per token, 4 per frozen weight (LoRA base weights);
* attention: per packed document, not per row, and halved under causal masking.
A caller adds the two (`training_flops`) and divides by wall time and the device's peak
(`device_peak_flops`).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Protocol, Sequence

import torch
from torch import Tensor

__all__ = [
    "MetricsLogger",
    "attention_flops",
    "dense_flops_per_token",
    "device_peak_flops",
    "document_lengths_from_ids",
    "mfu_percent",
    "peak_memory_gib",
    "reset_peak_memory",
    "training_flops",
]

# ---------------------------------------------------------------------------------------------------------
# Peak FLOP/s
# ---------------------------------------------------------------------------------------------------------

# Dense (no sparsity) bf16 tensor-core peak per device, from vendor datasheets. First substring match of the
# upper-cased device name wins, so more specific names come first ("H100 PCIE" before "H100", "H200"
# before "H20", "L40S" before "L4", "A100" before "A10").
_PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("GB200", 2.5e15),
    ("B200", 2.25e15),
    ("B100", 1.75e15),
    ("H200", 989e12),
    ("H100 PCIE", 756e12),
    ("H100", 989e12),
    ("H800", 989e12),
    ("H20", 148e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
    ("MI355X", 2.5e15),
    ("MI325X", 1307e12),
    ("MI300X", 1307e12),
    ("MI250X", 383e12),
)

_warned_unknown_devices: set[str] = set()


def device_peak_flops(device: torch.device | str, override: float | None = None) -> float | None:
    """Peak dense bf16 FLOP/s of one device, or None when unknown (then MFU is not reported).

    `override` (FLOP/s, e.g. `metrics.peak_tflops * 1e12`) wins over the lookup table. CPUs return None.
    """
    if override is not None:
        if override < 1e9:
            raise ValueError(
                f"peak FLOP/s override {override:g} is implausibly small; it is in FLOP/s, not TFLOP/s "
                f"(pass {override:g}e12 for {override:g} TFLOP/s)"
            )
        return float(override)
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    upper = name.upper()
    for key, flops in _PEAK_BF16_FLOPS:
        if key in upper:
            return flops
    if name not in _warned_unknown_devices:
        _warned_unknown_devices.add(name)
        warnings.warn(
            f"unknown peak FLOP/s for device {name!r}: MFU will not be reported; set metrics.peak_tflops",
            stacklevel=2,
        )
    return None


# ---------------------------------------------------------------------------------------------------------
# FLOP counting
# ---------------------------------------------------------------------------------------------------------


def dense_flops_per_token(n_trainable_path_params: int, n_frozen_params: int = 0) -> int:
    """Matmul FLOPs per token for one training step (forward + backward).

    A weight matrix with P entries costs 2P FLOPs per token in forward (multiply + add). Backward costs 2P
    for the input gradient and 2P for the weight gradient. So:
    * trainable weights: 6 FLOPs per parameter per token;
    * frozen weights (e.g. the base model under LoRA): 4 per parameter per token, since their weight
      gradient is skipped but the input gradient must still flow through them to the adapters below.
    Count only matmul weights: embedding lookups are gathers and are excluded, the output projection is a
    matmul and is included (once, even when tied to the embedding). Norm weights and biases are negligible.
    For MoE, count only the experts a token is routed to (top-k), not all experts.
    """
    return 6 * int(n_trainable_path_params) + 4 * int(n_frozen_params)


def attention_flops(
    document_lengths: Sequence[int] | Tensor,
    n_layers: int,
    n_heads: int,
    head_dim: int,
    causal: bool = True,
    training: bool = True,
) -> float:
    """FLOPs of the attention score and value matmuls over packed documents.

    With a document mask a packed row of documents L1, L2, ... computes sum(Li^2) attention entries, not
    (sum Li)^2. Per document of length L and per layer, forward computes QK^T and AV, each
    2 * L * L * n_heads * head_dim FLOPs; causal masking halves that (kernels skip masked blocks); backward
    costs twice the forward, so training multiplies by 3. Q/K/V/O projections are dense matmuls and are
    counted by `dense_flops_per_token`, not here.
    """
    if isinstance(document_lengths, Tensor):
        sum_sq = float((document_lengths.to(torch.float64) ** 2).sum().item())
    else:
        sum_sq = float(sum(int(length) ** 2 for length in document_lengths))
    flops = 2 * 2 * sum_sq * n_heads * head_dim * n_layers
    if causal:
        flops /= 2
    if training:
        flops *= 3
    return flops


def document_lengths_from_ids(document_ids: Tensor | None, position_ids: Tensor | None = None) -> Tensor:
    """Lengths of the documents packed into `[B, S]` rows, as a 1-D int64 tensor (row by row, in order).

    A new document starts at the first column of every row, wherever `document_ids` changes, and wherever
    `position_ids` does not continue the previous position by one (a restart at 0). Either may be None, not
    both. Padding (a negative document id) is left out: it attends only to itself
    (`models.common.attention.document_mask_mod`), and the dense FLOPs count real tokens only too.
    """
    if document_ids is None and position_ids is None:
        raise ValueError("document_lengths_from_ids needs document_ids or position_ids")
    ref = document_ids if document_ids is not None else position_ids
    if ref.dim() == 1:
        document_ids = document_ids[None] if document_ids is not None else None
        position_ids = position_ids[None] if position_ids is not None else None
        ref = ref[None]
    starts = torch.zeros(ref.shape, dtype=torch.bool, device=ref.device)
    starts[:, 0] = True
    if document_ids is not None:
        starts[:, 1:] |= document_ids[:, 1:] != document_ids[:, :-1]
    if position_ids is not None:
        starts[:, 1:] |= position_ids[:, 1:] != position_ids[:, :-1] + 1
    start_idx = starts.reshape(-1).nonzero().squeeze(1)
    ends = torch.cat([start_idx[1:], start_idx.new_tensor([starts.numel()])])
    lengths = ends - start_idx
    if document_ids is not None:
        lengths = lengths[document_ids.reshape(-1)[start_idx] >= 0]
    return lengths


def training_flops(
    n_tokens: int,
    *,
    n_trainable_params: int,
    n_frozen_params: int = 0,
    document_lengths: Sequence[int] | Tensor | None = None,
    n_layers: int = 0,
    n_heads: int = 0,
    head_dim: int = 0,
    causal: bool = True,
) -> float:
    """FLOPs of one training step over `n_tokens` tokens: dense matmuls plus attention (see above).

    `document_lengths` are the packed documents those tokens belong to (`document_lengths_from_ids`); None
    skips the attention term.
    """
    flops = float(n_tokens) * dense_flops_per_token(n_trainable_params, n_frozen_params)
    if document_lengths is not None:
        flops += attention_flops(document_lengths, n_layers, n_heads, head_dim, causal=causal, training=True)
    return flops


def mfu_percent(flops: float, seconds: float, peak_flops: float | None, n_devices: int = 1) -> float | None:
    """Model FLOPs utilization in percent: `flops` done by `n_devices` in `seconds`, over their peak."""
    if peak_flops is None or seconds <= 0 or n_devices <= 0:
        return None
    return 100.0 * flops / (seconds * peak_flops * n_devices)


# ---------------------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------------------


def peak_memory_gib(device: torch.device | str) -> float:
    """Peak memory since the last `reset_peak_memory`: CUDA allocated bytes, or the process peak RSS on CPU.

    The CPU number is the whole process's lifetime peak (it cannot be reset).
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource
    except ImportError:  # Windows
        return float("nan")
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return max_rss * scale / 2**30


def reset_peak_memory(device: torch.device | str) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


# ---------------------------------------------------------------------------------------------------------
# Logger
# ---------------------------------------------------------------------------------------------------------


class _MetricsSettings(Protocol):
    log_freq: int
    tensorboard: bool
    peak_tflops: float | None


# Keys every metrics.jsonl line carries (null when the caller did not provide them).
REQUIRED_KEYS = ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "mem_gib")
# What the recipes measure, shown on the console next to the loss whenever a logged line has it: the pair metrics
# of DPO and the reward model, distillation's KL, GRPO's reward and accuracy, and every evaluation result.
CONSOLE_RESULT_KEYS = (
    "reward_accuracy", "reward_margin", "kl", "reward_mean", "accuracy",
    "eval_loss", "eval_reward_accuracy", "eval_reward_margin", "eval_accuracy", "eval_reward_mean",
)


def _to_json_number(value: Any) -> float | int | None:
    """Python number for JSON; NaN, inf and None become None (JSON has no NaN)."""
    if value is None:
        return None
    if isinstance(value, Tensor):
        value = value.item()
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    value = float(value)
    return value if math.isfinite(value) else None


def _format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class MetricsLogger:
    """Writes logged steps to the console, TensorBoard (`<output_dir>/tb/`) and `<output_dir>/metrics.jsonl`.

    Only rank 0 writes; on other ranks every method is a no-op. `metrics` keys the console knows:
    loss, CONSOLE_RESULT_KEYS, lr, grad_norm, tokens_per_s, mfu (percent), mem_gib, data_wait_ms; any other numeric
    key goes to TensorBoard and the jsonl file only. `cfg` is any object with `log_freq`, `tensorboard`, `peak_tflops`.
    """

    def __init__(self, cfg: _MetricsSettings, output_dir: str | os.PathLike, *, rank: int, total_steps: int):
        self.log_freq = max(int(cfg.log_freq), 1)
        self.use_tensorboard = bool(cfg.tensorboard)
        self.peak_tflops = cfg.peak_tflops
        self.output_dir = Path(output_dir)
        self.rank = rank
        self.total_steps = int(total_steps)
        self.jsonl_path = self.output_dir / "metrics.jsonl"
        self.tb_dir = self.output_dir / "tb"
        self._jsonl = None
        self._writer = None
        self._eta_origin: tuple[float, int] | None = None  # (time, step) of the first logged step
        if self.is_writer:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")
            if self.use_tensorboard:
                self._writer = self._open_tensorboard(purge_step=None)

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    def _open_tensorboard(self, purge_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=str(self.tb_dir), purge_step=purge_step)

    def peak_flops(self, device: torch.device | str) -> float | None:
        """Peak FLOP/s of `device`: `cfg.peak_tflops` when set, else the lookup table."""
        override = None if self.peak_tflops is None else float(self.peak_tflops) * 1e12
        return device_peak_flops(device, override)

    def should_log(self, step: int) -> bool:
        """Log the first step, every `log_freq` steps, and the last step."""
        return step == 1 or step % self.log_freq == 0 or step == self.total_steps

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.is_writer:
            return
        values = {key: _to_json_number(value) for key, value in metrics.items()}
        record: dict[str, Any] = {"step": int(step)}
        record.update({key: values.get(key) for key in REQUIRED_KEYS})
        record.update({key: value for key, value in values.items() if key not in record})
        self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")
        self._jsonl.flush()
        if self._writer is not None:
            for key, value in metrics.items():
                if value is None:
                    continue
                if isinstance(value, Tensor):
                    value = value.item()
                self._writer.add_scalar(key, float(value), step)
            self._writer.flush()
        print(self.format_line(step, values), flush=True)

    def log_text(self, tag: str, text: str, step: int) -> None:
        """A piece of text (e.g. sampled completions, markdown) in TensorBoard's text tab; rank 0 only."""
        if self._writer is not None:
            self._writer.add_text(tag, text, step)
            self._writer.flush()

    def format_line(self, step: int, values: dict[str, float | int | None]) -> str:
        """One compact console line, e.g. `step 10/100 [#.........] eta 1m30s | loss 2.3456 | ...`."""
        now = time.monotonic()
        if self._eta_origin is None:
            self._eta_origin = (now, step)
        t0, s0 = self._eta_origin
        parts = []
        width = len(str(self.total_steps))
        if self.total_steps > 0:
            frac = min(max(step / self.total_steps, 0.0), 1.0)
            filled = int(frac * 10)
            head = f"step {step:>{width}}/{self.total_steps} [{'#' * filled}{'.' * (10 - filled)}]"
            if step > s0 and step < self.total_steps:
                eta = (now - t0) / (step - s0) * (self.total_steps - step)
                head += f" eta {_format_duration(eta)}"
        else:
            head = f"step {step}"
        parts.append(head)

        def add(key: str, fmt: str) -> None:
            value = values.get(key)
            if value is not None:
                parts.append(fmt.format(value))

        if values.get("loss") is None and any(key.startswith("eval_") for key in values):
            parts[0] += " eval"  # a line of evaluation results only
        add("loss", "loss {:.4f}")
        for key in CONSOLE_RESULT_KEYS:
            add(key, key + " {:.4f}")
        add("lr", "lr {:.2e}")
        add("grad_norm", "gnorm {:.3f}")
        add("tokens_per_s", "tok/s {:,.0f}")
        add("mfu", "mfu {:.1f}%")
        add("mem_gib", "mem {:.1f}GiB")
        add("data_wait_ms", "data {:.1f}ms")
        return " | ".join(parts)

    def truncate_after(self, step: int) -> None:
        """On resume from a checkpoint taken after `step`: drop logged lines with a step > `step`.

        Those steps are about to be run again. Unparseable lines (a write cut off by a crash) are dropped
        too. TensorBoard is told to purge events after `step` as well.
        """
        if not self.is_writer:
            return
        if self._jsonl is not None:
            self._jsonl.close()
        kept = []
        if self.jsonl_path.exists():
            with open(self.jsonl_path, encoding="utf-8") as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
                        kept.append(line if line.endswith("\n") else line + "\n")
        tmp = self.jsonl_path.with_name(self.jsonl_path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(tmp, self.jsonl_path)
        self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")
        if self._writer is not None:
            self._writer.close()
            self._writer = self._open_tensorboard(purge_step=step + 1)
        self._eta_origin = None

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
