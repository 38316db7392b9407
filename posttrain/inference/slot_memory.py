"""How many decode slots the native engine may take: what one slot costs, what the engine may spend, the cap.

A slot costs (``slot_bytes``):

* its keys and values: every layer, ``cache_len`` positions, ``n_kv_heads x head_dim`` each (sliding-window
  layers keep full-length caches too, see ``posttrain.models.common.kv_cache``);
* its decode state (``SlotState``: the tokens and fp32 log-probs of up to ``cache_len`` new tokens, a few scalars);
* its share of the decode step's temporaries, which grow with the batch and stay in the captured graphs' memory
  pool: the last-position logits and the sampling buffers over the vocabulary (fp32; top-p sorts them, with
  int64 indices), the fp32 attention scores of one layer, the hidden activations of one token; and its row
  of the prefill's last-position logits.

Besides the slots the engine needs room for one prefill forward (``prefill_bytes``): the small cache of up to
``max_prefill_tokens`` prompt tokens and one layer's activations over them.

What the engine may spend follows vLLM's ``gpu_memory_utilization`` (``engine_memory_budget``): its process may hold
that share of the device's total memory, weights included; it never takes more than is free, so memory held by
other processes (a colocated policy) is respected. On the CPU there is no device memory to ask about: the slots
are not capped unless a byte budget is given (the engine's ``kv_cache_memory_bytes``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

# fp32-sized rows over the vocabulary live at once per slot in a decode step (logits, log-probs, probabilities,
# the exponential race, and with top-p the sorted values, their int64 order, softmax and cumsum), rounded up,
# plus the prefill's and the refill's fp32 logits of the slot
VOCAB_ROWS_PER_SLOT = 16
# the decode state's per-slot scalars: token, position, generated count, budget (int64) and the done flag
_STATE_SCALAR_BYTES = 4 * 8 + 1


@dataclass(frozen=True)
class SlotBytes:
    """Bytes one slot of ``positions`` cached positions costs, by part."""

    positions: int
    kv_cache: int
    decode_state: int
    workspace: int

    @property
    def total(self) -> int:
        return self.kv_cache + self.decode_state + self.workspace


@dataclass(frozen=True)
class DeviceMemory:
    """Device memory as the engine's process sees it: ``free`` (the driver's free memory plus this process's
    cached, unused blocks), ``total``, and ``held`` (what this process's tensors hold, the model included)."""

    free: int
    total: int
    held: int


def kv_bytes_per_position(args: Any, n_layers: int, dtype: torch.dtype) -> int:
    """Keys and values of one position over all layers."""
    return 2 * n_layers * args.n_kv_heads * args.head_dim * dtype.itemsize


def activation_bytes_per_token(args: Any, dtype: torch.dtype) -> int:
    """One layer's activations of one token, roughly: residual, norms and attention input / output (4 x dim),
    q / k / v, and the MLP's gate, up and product (or the routed experts' of a MoE layer)."""
    ffn_width = max(args.ffn_dim, getattr(args, "n_experts_per_tok", 1) * getattr(args, "moe_ffn_dim", args.ffn_dim))
    qkv = (args.n_heads + 2 * args.n_kv_heads) * args.head_dim
    return dtype.itemsize * (4 * args.dim + qkv + 3 * ffn_width)


def slot_bytes(args: Any, *, n_layers: int, cache_len: int, dtype: torch.dtype) -> SlotBytes:
    """What one slot of ``cache_len`` positions costs for a model of ``args`` (a posttrain ``ModelArgs``) with
    ``n_layers`` cached layers, in ``dtype``."""
    kv = cache_len * kv_bytes_per_position(args, n_layers, dtype)
    state = (cache_len + 1) * (8 + 4) + _STATE_SCALAR_BYTES  # out_tokens int64 + out_log_probs fp32
    vocab = args.vocab_size * (4 * VOCAB_ROWS_PER_SLOT + dtype.itemsize)
    scores = args.n_heads * cache_len * (4 + 4 + dtype.itemsize)  # fp32 scores, softmax, probs in dtype
    return SlotBytes(positions=cache_len, kv_cache=kv, decode_state=state,
                     workspace=vocab + scores + activation_bytes_per_token(args, dtype))


def prefill_bytes(args: Any, *, n_layers: int, max_prefill_tokens: int, cache_len: int, dtype: torch.dtype) -> int:
    """Room for one prefill forward: its cache and one layer's activations over the most tokens one forward
    takes (``max_prefill_tokens``, or a single prompt of up to ``cache_len`` tokens when that is longer)."""
    tokens = max(max_prefill_tokens, cache_len)
    return tokens * (kv_bytes_per_position(args, n_layers, dtype) + activation_bytes_per_token(args, dtype))


def engine_memory_budget(memory: DeviceMemory, utilization: float) -> int:
    """Bytes the engine may still allocate: up to ``utilization`` of the total for its process, less what the
    process holds already, and never more than is free."""
    return max(0, min(int(utilization * memory.total) - memory.held, memory.free))


def device_memory(device: torch.device) -> DeviceMemory | None:
    """The device's memory as seen from this process (CUDA); None on other devices."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    held = torch.cuda.memory_allocated(device)
    return DeviceMemory(free=free + torch.cuda.memory_reserved(device) - held, total=total, held=held)


def slots_that_fit(requested: int, per_slot: int, budget: int) -> int:
    """At most ``requested`` slots of ``per_slot`` bytes within ``budget`` bytes (0 when not even one fits)."""
    return max(0, min(requested, budget // per_slot))


@dataclass(frozen=True)
class SlotPlan:
    """The slots a cache shape gets: ``slots`` of the ``requested``, each costing ``per_slot``, within
    ``budget`` bytes (None: not capped), and where the budget came from (one line, for the log)."""

    requested: int
    slots: int
    per_slot: SlotBytes
    budget: int | None
    source: str

    @property
    def capped(self) -> bool:
        return self.slots < self.requested


def plan_slots(requested: int, per_slot: SlotBytes, *, memory: DeviceMemory | None, utilization: float,
               kv_cache_memory_bytes: int | None, prefill_reserve: int) -> SlotPlan:
    """How many of ``requested`` slots the engine takes. The budget is ``kv_cache_memory_bytes`` when given;
    else, with ``memory`` (a CUDA device), ``engine_memory_budget`` less ``prefill_reserve``; else (CPU) none.
    Raises ``torch.OutOfMemoryError`` (one line naming the sizes) when not even one slot fits."""
    if kv_cache_memory_bytes is not None:
        budget = kv_cache_memory_bytes
        source = f"kv_cache_memory_bytes = {format_bytes(kv_cache_memory_bytes)}"
    elif memory is not None:
        budget = engine_memory_budget(memory, utilization) - prefill_reserve
        source = (f"gpu_memory_utilization {utilization} of {format_bytes(memory.total)} total, less "
                  f"{format_bytes(memory.held)} this process holds (the model included) and "
                  f"{format_bytes(prefill_reserve)} for a prefill, {format_bytes(memory.free)} free")
    else:
        return SlotPlan(requested, requested, per_slot, None, "no device memory limit (CPU)")
    slots = slots_that_fit(requested, per_slot.total, budget)
    if slots < 1:
        raise torch.OutOfMemoryError(
            f"the native engine cannot hold even one sequence: a slot of {per_slot.positions} positions (prompt + "
            f"completion, rounded up) needs {format_bytes(per_slot.total)} (KV cache "
            f"{format_bytes(per_slot.kv_cache)}, decode workspace "
            f"{format_bytes(per_slot.workspace + per_slot.decode_state)}) but the slots may take "
            f"{format_bytes(max(budget, 0))} ({source}); shorten the prompts or max_new_tokens, or raise "
            f"gpu_memory_utilization / kv_cache_memory_bytes"
        )
    return SlotPlan(requested, slots, per_slot, budget, source)


def format_bytes(n_bytes: float) -> str:
    """``n_bytes`` in GiB, MiB or KiB, whichever keeps the number at or above 1."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
        if abs(n_bytes) >= size:
            return f"{n_bytes / size:.2f} {unit}"
    return f"{n_bytes / 2**10:.2f} KiB"
