"""Activation offloading: chosen blocks keep what they save for backward in pinned host memory.

``activation_checkpoint.offload_blocks = n``: the first ``n`` of the blocks that activation checkpointing leaves
unwrapped (mode ``none`` / ``budget``: blocks 0..n-1; ``full`` / ``op`` with ``skip_last``: the earliest of the last
``skip_last``). Each such block runs under saved-tensor hooks: every tensor it saves for backward that is at
least ``MIN_OFFLOAD_BYTES`` and spans its whole storage is copied to pinned host memory on a side stream as it is
saved (one copy per storage: views of it come back as views), and its device memory is free once that copy is
done. Kept on the device: parameters and their casts (autocast's bf16 weights in eager: copying them out would
move the block's weights every micro-batch; compiled blocks recompute such casts), the block's other tensor
arguments (RoPE's cos / sin, shared by every block), tensor subclasses (float8), views of larger buffers. Its
backward gets the tensors back from a copy started when the backward of the block two places after it began (a
hook on that block's output gradient), so the copy runs beside two blocks' backward instead of in front of its own.

Why: a step's memory peak under ``skip_last`` is at the start of backward, where the unwrapped blocks' saved
activations are all alive (Llama-3.1-8B at 8,192 tokens: 0.72 GiB a block). Offloading ``n`` of them lets ``n``
more blocks go unwrapped at about the same peak, trading their recomputation for host-link traffic (0.72 GiB a
block each way; the link runs beside the compute). A block with fewer blocks after it gets a shorter lead; the
last block has none: its tensors come back when its backward asks, a wait of one copy.

With torch.compile the hooks act on the compiled block's saved tensors (the compiled autograd function saves
them at run time, outside the compiled code). Off CUDA the "host copy" is a copy in the same memory (nothing is
saved); the trainer warns. Not with ``compile.cudagraphs`` (refused: saved tensors live in the graphs' pool). Under
saved-tensor hooks autograd no longer notices a saved tensor written in place after it was saved; the blocks here
write none. Several forwards of a block before their backwards are brought back latest first.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import ActivationWrapper, CheckpointWrapper
from torch.distributed.tensor import DTensor
from torch.utils._pytree import tree_leaves

MIN_OFFLOAD_BYTES = 1 << 20
# A block comes back as the backward of the block this many places after it begins: two blocks' backward to copy
# one block in (on the H200's host link a block's copy takes about as long as its backward: one would leave waits).
PREFETCH_LEAD_BLOCKS = 2


@dataclass(eq=False)
class _Offloaded:
    """One storage's saved tensor in host memory; `on_device` once brought back ahead of its backward."""

    host: torch.Tensor
    device: torch.device
    copied_out: torch.cuda.Event | None
    on_device: torch.Tensor | None = None
    copied_in: torch.cuda.Event | None = None


@dataclass(eq=False)
class _View:
    """What a saved tensor packs to: its storage's host copy, and its own shape / strides over it."""

    storage: _Offloaded
    shape: tuple[int, ...]
    stride: tuple[int, ...]


@dataclass
class OffloadStats:
    offloaded: int = 0  # tensors sent to host memory
    offloaded_bytes: int = 0
    kept: int = 0  # saved tensors left on the device (small, parameters, subclasses, shared storage)
    prefetched: int = 0  # brought back ahead of their backward
    fetched_on_demand: int = 0  # brought back when the backward asked (a wait)


@dataclass
class ActivationOffloader:
    """The host copies of the offloaded blocks and the side stream that moves them."""

    stats: OffloadStats = field(default_factory=OffloadStats)
    # per block, one list of host copies per forward whose backward has not come yet (latest last)
    _blocks: dict[int, list[list[weakref.ref]]] = field(default_factory=dict)
    _streams: dict[torch.device, torch.cuda.Stream] = field(default_factory=dict)

    @contextlib.contextmanager
    def hooks(self, block: int, kept: set[int]) -> Iterator[None]:
        """Saved-tensor hooks around one forward of `block`; `kept`: storages (data pointers) that stay."""
        generations = self._blocks.setdefault(block, [])
        generations[:] = [g for g in generations if any(ref() is not None for ref in g)]
        copies: list[weakref.ref] = []
        generations.append(copies)
        # one host copy per storage in this forward; the tensor held until the forward ends, so that no other
        # storage takes its address meanwhile
        by_storage: dict[int, tuple[torch.Tensor, _Offloaded]] = {}

        def pack(t: torch.Tensor) -> Any:
            if not self._takes(t, kept):
                self.stats.kept += 1
                return t.detach()  # not t: a saved output holding itself would keep its graph alive in a cycle
            address = t.untyped_storage().data_ptr()
            if address not in by_storage:
                by_storage[address] = (t, self._send(t))
                copies.append(weakref.ref(by_storage[address][1]))
            return _View(by_storage[address][1], tuple(t.shape), t.stride())

        def unpack(packed: Any) -> torch.Tensor:
            if isinstance(packed, torch.Tensor):
                return packed
            whole = self._receive(packed.storage)
            if tuple(whole.shape) == packed.shape and whole.stride() == packed.stride:
                return whole
            return whole.as_strided(packed.shape, packed.stride)

        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
                yield
        finally:
            by_storage.clear()

    def take_stats(self) -> dict[str, float]:
        """Metrics since the last call (logged with each step): GiB sent to the host, tensors brought back ahead of
        their backward and on demand (each a wait), tensors left on the device."""
        s, self.stats = self.stats, OffloadStats()
        return {"offload/gib": s.offloaded_bytes / 2**30, "offload/prefetched": s.prefetched,
                "offload/fetched_on_demand": s.fetched_on_demand, "offload/kept": s.kept}

    def prefetch(self, block: int) -> None:
        """Start bringing `block`'s host copies back (called as the backward of a block after it begins): those of
        its latest forward whose copies are not back yet."""
        waiting = [g for g in self._blocks.get(block, ()) if any(
            (item := ref()) is not None and item.on_device is None and item.copied_out is not None for ref in g)]
        for ref in waiting[-1] if waiting else ():
            item = ref()
            if item is None or item.on_device is not None or item.copied_out is None:
                continue  # freed (its graph is gone), already back, or on the CPU
            current = torch.cuda.current_stream(item.device)
            # allocated in the backward's stream, where it is freed; the side stream waits for that memory's
            # earlier users before writing into it
            on_device = torch.empty_strided(item.host.shape, item.host.stride(), dtype=item.host.dtype,
                                            device=item.device)
            side = self._stream(item.device)
            side.wait_stream(current)
            with torch.cuda.stream(side):
                on_device.copy_(item.host, non_blocking=True)
                item.copied_in = side.record_event()
            on_device.record_stream(side)
            item.on_device = on_device
            self.stats.prefetched += 1

    def _takes(self, t: torch.Tensor, kept: set[int]) -> bool:
        if (type(t) is not torch.Tensor or t.nbytes < MIN_OFFLOAD_BYTES or (t.is_leaf and t.requires_grad)
                or _is_leaf_cast(t)):
            return False  # a subclass, small, a parameter / an input the caller holds anyway, or a cast of one
        storage = t.untyped_storage()
        # whole storage: once the saved tensor is gone its memory is free (a view of a larger buffer frees nothing)
        return (t.storage_offset() == 0 and storage.nbytes() == t.nbytes and _dense(t)
                and storage.data_ptr() not in kept)

    def _send(self, t: torch.Tensor) -> _Offloaded:
        self.stats.offloaded += 1
        self.stats.offloaded_bytes += t.nbytes
        if not t.is_cuda:
            return _Offloaded(host=t.clone(), device=t.device, copied_out=None)
        host = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, pin_memory=True)
        side = self._stream(t.device)
        side.wait_stream(torch.cuda.current_stream(t.device))  # t is written
        with torch.cuda.stream(side):
            host.copy_(t, non_blocking=True)
            copied_out = side.record_event()
        t.record_stream(side)  # its memory returns to the allocator when the copy is done, not before
        return _Offloaded(host=host, device=t.device, copied_out=copied_out)

    def _receive(self, item: _Offloaded) -> torch.Tensor:
        if item.copied_out is None:  # CPU
            return item.host
        current = torch.cuda.current_stream(item.device)
        if item.on_device is None:
            self.stats.fetched_on_demand += 1
            current.wait_event(item.copied_out)
            item.on_device = item.host.to(item.device, non_blocking=True)
        elif item.copied_in is not None:
            current.wait_event(item.copied_in)
        return item.on_device  # kept while the graph holds the item: a tensor saved twice unpacks twice

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's shard on this rank (its storage is the one the saved tensors share), else the tensor."""
    return t.to_local() if isinstance(t, DTensor) else t


def _is_leaf_cast(t: torch.Tensor) -> bool:
    """A dtype cast of a parameter (or another leaf), or a view of one: autocast's bf16 copy of a weight, in eager."""
    fn = (t._base if t._base is not None else t).grad_fn
    return fn is not None and type(fn).__name__ == "ToCopyBackward0" and any(
        next_fn is not None and type(next_fn).__name__ == "AccumulateGrad" for next_fn, _ in fn.next_functions)


def _dense(t: torch.Tensor) -> bool:
    """Its elements fill a block of memory without gaps or overlap, in some order of its dimensions."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda dim: dim[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


class OffloadingBlock(ActivationWrapper):
    """A block whose saved activations live in host memory between its forward and backward (``offload``), or
    one that only starts bringing back the block before it as its own backward begins. Names and state-dict keys
    as torch's checkpoint wrapper (``_checkpoint_wrapped_module``, stripped in ``state_dict()``)."""

    def __init__(self, block: nn.Module, offloader: ActivationOffloader, index: int, offload: bool,
                 prefetches: tuple[int, ...]) -> None:
        super().__init__(block)
        self.offloader = offloader
        self.index = index
        self.offload = offload
        self.prefetches = prefetches  # the offloaded blocks to bring back when this one's backward begins

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.offload and torch.is_grad_enabled():
            parameters = [_local(p) for p in self._checkpoint_wrapped_module.parameters()]
            # the other tensor arguments (cos / sin; HF layers pass them as a tuple) are the caller's to keep
            others = [_local(a) for a in tree_leaves([args[1:], kwargs]) if isinstance(a, torch.Tensor)]
            kept = {t.untyped_storage().data_ptr() for t in [*parameters, *others] if type(t) is torch.Tensor}
            with self.offloader.hooks(self.index, kept):
                out = self._checkpoint_wrapped_module(*args, **kwargs)
        else:
            out = self._checkpoint_wrapped_module(*args, **kwargs)
        hidden = out[0] if isinstance(out, (tuple, list)) and out else out  # HF layers may return tuples
        if self.prefetches and isinstance(hidden, torch.Tensor) and hidden.requires_grad:
            # its gradient is ready when the backward of the block after this one ends, i.e. as this block's
            # backward begins
            hidden.register_hook(self._prefetch)
        return out

    def _prefetch(self, grad: torch.Tensor) -> None:
        for block in self.prefetches:
            self.offloader.prefetch(block)


def activation_offloader(model: nn.Module) -> ActivationOffloader | None:
    """The offloader of `model`'s offloading blocks, if it has any."""
    return next((m.offloader for m in model.modules() if isinstance(m, OffloadingBlock)), None)


def apply_activation_offloading(model: nn.Module, n_blocks: int) -> ActivationOffloader | None:
    """Wrap the first `n_blocks` blocks of ``model.layers`` that are not checkpointed (module docstring), and the
    blocks whose backward brings them back. Call after activation checkpointing, before compile."""
    if n_blocks < 0:
        raise ValueError(f"activation_checkpoint.offload_blocks must be >= 0, got {n_blocks}")
    if n_blocks == 0:
        return None
    blocks = list(model.layers.named_children())
    unwrapped = [i for i, (_, block) in enumerate(blocks) if not isinstance(block, ActivationWrapper)]
    if len(unwrapped) < n_blocks:
        raise ValueError(
            f"activation_checkpoint.offload_blocks = {n_blocks}, but only {len(unwrapped)} of the "
            f"{len(blocks)} blocks are not checkpointed (raise skip_last, or use mode 'none')")
    offloaded = unwrapped[:n_blocks]
    if any(b - a != 1 for a, b in zip(offloaded, offloaded[1:])):
        raise ValueError("activation_checkpoint.offload_blocks: the blocks left unwrapped are not consecutive "
                         "(selective mode); use mode none, full, op or budget")
    offloader = ActivationOffloader()
    triggers: dict[int, list[int]] = {}  # block -> the offloaded blocks it brings back as its backward begins
    for j in offloaded:
        trigger = min(j + PREFETCH_LEAD_BLOCKS, len(blocks) - 1)  # the last block has none after it
        if trigger > j and not isinstance(blocks[trigger][1], CheckpointWrapper):
            triggers.setdefault(trigger, []).append(j)
    for i in sorted({*offloaded, *triggers}):
        name, block = blocks[i]
        prefetches = tuple(sorted(triggers.get(i, ()), reverse=True))  # in the order their backwards come
        model.layers.register_module(
            name, OffloadingBlock(block, offloader, i, offload=i in offloaded, prefetches=prefetches))
    return offloader


__all__ = ["ActivationOffloader", "MIN_OFFLOAD_BYTES", "OffloadStats", "OffloadingBlock", "PREFETCH_LEAD_BLOCKS",
           "activation_offloader", "apply_activation_offloading"]
