"""AdamW whose CUDA step is one Triton launch per parameter group.

torch's fused AdamW walks the parameters through `multi_tensor_apply`: launches of at most 320 blocks of 512
threads each, one after the other, which on an H200 keep ~60% of the threads a bandwidth-bound kernel wants in
flight. The session-10 profile measured it at 7.4 ms for Llama-3.2-1B's 1.24B bf16 parameters (~2.3 TB/s of the
traffic AdamW needs, 2.7 counting its write-back of the divided gradients: about half of the HBM's), 5% of the SFT
step. Here every `BLOCK` elements of every parameter in a group is one program of a single launch; the programs
find their tensor through a table of device addresses (param, grad, exp_avg, exp_avg_sq, step), rebuilt only when
an address changes: 4.3 ms for the same parameters (4.0 TB/s; BENCHMARKS.md, session 14).

The math is torch's fused AdamW (fp32 in registers, rounded once to the state's dtype): decoupled weight decay,
bias corrections from each parameter's own step, `grad_scale` (clipping: the gradients are divided by it) and
`found_inf` (a non-finite step is skipped, its step count restored) read from the optimizer's attributes as torch's
fused kernel reads them. One difference: the gradients are not written back divided by `grad_scale` (torch's
kernel does; nothing here reads a gradient after the step).

The bias corrections are computed in fp32 (torch's in double): `1 - beta2**step` loses digits near beta2 = 1 (about
1e-4 of the update at beta2 = 0.999 and step 1, 1e-6 at posttrain's 0.95), far below a bf16 parameter's ulp.

The optimizer is a `torch.optim.AdamW(fused=True)`: same param groups, state and checkpoints, and anything its
kernel does not take (sparse, complex or misaligned tensors, dtypes or devices that differ within a group, a
tensor lr, amsgrad, maximize, a beta of 0, a numel not a multiple of 16) goes to torch's fused step for that call.
Should the kernel fail to build on its first launch (a Triton without some feature, no C compiler for its
launcher), torch's fused step takes over for good, with one warning.

`grad_norm` reads the same tables for the gradients' 2-norm that clipping needs before the step: one launch per
group instead of `torch._foreach_norm`'s multi-tensor launches (1.1 ms per Llama-3.2-1B step on the H200). The step
counts advance in one small launch per group (instead of `_foreach_add_` / `_foreach_sub_` over every step tensor).
"""

from __future__ import annotations

import itertools
import logging
import math
import os

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

__all__ = ["TritonAdamW", "triton_adamw_available"]

logger = logging.getLogger("posttrain")

_BLOCK = 4096
_STEPS_BLOCK = 256
# Triton's interpreter (TRITON_INTERPRET=1) runs the kernel on CPU tensors: how the CPU tests check its math.
_DEVICE_TYPES = ("cuda", "cpu") if os.environ.get("TRITON_INTERPRET") == "1" else ("cuda",)
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def triton_adamw_available(device: torch.device) -> bool:
    return triton is not None and device.type in _DEVICE_TYPES


if triton is not None:

    @triton.jit
    def _adamw_blocks(tensor_of_block, first_block, numels, param_addrs, grad_addrs, avg_addrs, avg_sq_addrs,
                      step_addrs,
                      grad_scale, found_inf, lr, beta1, beta2, log2_beta1, log2_beta2, eps, weight_decay,
                      like, HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr, BLOCK: tl.constexpr):
        DTYPE = like.dtype.element_ty  # `like`: one of the group's parameters, for its dtype
        # (No argument may be called `params`: triton 3.6's generated binder has a local of that name.)
        block = tl.program_id(0)
        t = tl.load(tensor_of_block + block)
        offsets = (block - tl.load(first_block + t)).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        numel = tl.load(numels + t)
        if HAS_FOUND_INF:  # a skipped step: nothing is loaded or stored
            numel = tl.where(tl.load(found_inf) == 0.0, numel, 0)
        # Every numel is a multiple of 16 and every address 16-byte aligned (checked on the host): the hints let
        # the masked loads and stores be vector ones (unhinted, a loaded bound makes them scalar: half the speed).
        mask = offsets < tl.multiple_of(numel, 16)
        p_ptr = tl.multiple_of(tl.load(param_addrs + t).to(tl.pointer_type(DTYPE)), 16)
        g_ptr = tl.multiple_of(tl.load(grad_addrs + t).to(tl.pointer_type(DTYPE)), 16)
        m_ptr = tl.multiple_of(tl.load(avg_addrs + t).to(tl.pointer_type(DTYPE)), 16)
        v_ptr = tl.multiple_of(tl.load(avg_sq_addrs + t).to(tl.pointer_type(DTYPE)), 16)
        step = tl.load(tl.load(step_addrs + t).to(tl.pointer_type(tl.float32)))

        p = tl.load(p_ptr + offsets, mask=mask).to(tl.float32)
        g = tl.load(g_ptr + offsets, mask=mask).to(tl.float32)
        m = tl.load(m_ptr + offsets, mask=mask).to(tl.float32)
        v = tl.load(v_ptr + offsets, mask=mask).to(tl.float32)
        if HAS_GRAD_SCALE:
            g = g / tl.load(grad_scale)
        p = p - lr * weight_decay * p
        m = beta1 * m + (1.0 - beta1) * g
        v = beta2 * v + (1.0 - beta2) * g * g
        bias_correction1 = 1.0 - tl.exp2(step * log2_beta1)
        bias_correction2_sqrt = tl.sqrt(1.0 - tl.exp2(step * log2_beta2))
        p = p - (lr / bias_correction1) * m / (tl.sqrt(v) / bias_correction2_sqrt + eps)
        tl.store(p_ptr + offsets, p.to(DTYPE), mask=mask)
        tl.store(m_ptr + offsets, m.to(DTYPE), mask=mask)
        tl.store(v_ptr + offsets, v.to(DTYPE), mask=mask)


    @triton.jit
    def _grad_squares_blocks(tensor_of_block, first_block, numels, grad_addrs, partials, like, BLOCK: tl.constexpr):
        """partials[block] = the sum of the squares of one block of one gradient (fp32)."""
        DTYPE = like.dtype.element_ty
        block = tl.program_id(0)
        t = tl.load(tensor_of_block + block)
        offsets = (block - tl.load(first_block + t)).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < tl.multiple_of(tl.load(numels + t), 16)
        g_ptr = tl.multiple_of(tl.load(grad_addrs + t).to(tl.pointer_type(DTYPE)), 16)
        g = tl.load(g_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        tl.store(partials + block, tl.sum(g * g, 0))

    @triton.jit
    def _advance_steps(step_addrs, n, found_inf, HAS_FOUND_INF: tl.constexpr, BLOCK: tl.constexpr):
        """Every step tensor of a group += 1, or += 0 on a skipped (non-finite) step."""
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        in_group = i < n
        steps = tl.load(step_addrs + i, mask=in_group, other=0).to(tl.pointer_type(tl.float32))
        increment = 1.0
        if HAS_FOUND_INF:
            increment = tl.where(tl.load(found_inf) == 0.0, 1.0, 0.0)
        tl.store(steps, tl.load(steps, mask=in_group) + increment, mask=in_group)


class _GroupTables:
    """The device tables one group's launch reads: which tensor each block belongs to (fixed by the numels) and
    the five addresses of each tensor (rebuilt when one moves: a new gradient each step under set_to_none, mostly
    at the same address from the caching allocator)."""

    def __init__(self) -> None:
        self.numels_key: tuple[int, ...] | None = None
        self.addresses_key: tuple[int, ...] | None = None

    def update(self, numels: list[int], addresses: list[int], device: torch.device) -> None:
        if tuple(numels) != self.numels_key:
            blocks = [math.ceil(n / _BLOCK) for n in numels]
            first = [0, *itertools.accumulate(blocks[:-1])]
            self.n_blocks = sum(blocks)
            self.tensor_of_block = torch.repeat_interleave(
                torch.arange(len(numels), dtype=torch.int32), torch.tensor(blocks)).to(device)
            self.first_block = torch.tensor(first, dtype=torch.int32, device=device)
            self.numels = torch.tensor(numels, dtype=torch.int64, device=device)
            self.numels_key = tuple(numels)
        if tuple(addresses) != self.addresses_key:
            table = torch.tensor(addresses, dtype=torch.int64)
            if device.type == "cuda":
                table = table.pin_memory().to(device, non_blocking=True)
            self.params, self.grads, self.avgs, self.avg_sqs, self.steps = table.view(5, len(numels))
            self.addresses_key = tuple(addresses)


class TritonAdamW(torch.optim.AdamW):
    """`torch.optim.AdamW(fused=True)` whose step runs `_adamw_blocks` (module docstring)."""

    def __init__(self, params, **kwargs) -> None:
        super().__init__(params, fused=True, foreach=False, **kwargs)
        self._tables: dict[int, _GroupTables] = {}
        self._kernel_failed: str | None = None  # why the kernel could not be built; torch's step from then on
        self._kernel_ran = False
        self._norm_ran = False
        self._norm_failed: str | None = None  # why the norm's kernel could not be built; torch's norm from then on

    @staticmethod
    def _group_takes(group: dict) -> bool:
        if group["amsgrad"] or group["maximize"] or group["differentiable"] or isinstance(group["lr"], Tensor):
            return False
        return all(0.0 < beta < 1.0 for beta in group["betas"])  # the kernel takes log2(beta)

    @staticmethod
    def _tensors_take(tensors: list[tuple[Tensor, ...]], addresses: list[int]) -> bool:
        if any(address % 16 for address in addresses):
            return False
        first = tensors[0][0]
        for p, g, m, v, step in tensors:
            if (p.device != first.device or p.device.type not in _DEVICE_TYPES or p.dtype not in _DTYPES
                    or g.is_sparse or isinstance(p, DTensor) or isinstance(g, DTensor) or step.device != p.device
                    or step.dtype != torch.float32):
                return False
            for x in (p, g, m, v):
                if (x.dtype != first.dtype or x.device != first.device or x.numel() != p.numel() or x.numel() % 16
                        or not x.is_contiguous()):
                    return False
        return True

    def _group_tensors(self, group: dict, make_state: bool) -> list[tuple[Tensor, ...]] | None:
        tensors = []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                if not make_state:
                    return None
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            tensors.append((p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["step"]))
        return tensors

    def _prepared(self, make_state: bool) -> list[tuple[int, dict, list[tuple[Tensor, ...]], list[int]]] | None:
        """(index, group, tensors, addresses) of each group with gradients, or None when the kernel does not take
        them all (checked before any state is made: amsgrad's state has a key this class does not make) or, without
        `make_state`, when a parameter has no state yet."""
        if self._kernel_failed is not None or not all(self._group_takes(group) for group in self.param_groups):
            return None
        prepared = []
        for index, group in enumerate(self.param_groups):
            tensors = self._group_tensors(group, make_state)
            if tensors is None:
                return None
            if tensors:
                # param, grad, exp_avg, exp_avg_sq and step addresses, each column in parameter order
                prepared.append((index, group, tensors, [x.data_ptr() for column in zip(*tensors) for x in column]))
        if not all(self._tensors_take(tensors, addresses) for _, _, tensors, addresses in prepared):
            return None
        return prepared

    def _group_tables(self, index: int, tensors: list[tuple[Tensor, ...]], addresses: list[int]) -> _GroupTables:
        tables = self._tables.setdefault(index, _GroupTables())
        tables.update([p.numel() for p, *_ in tensors], addresses, tensors[0][0].device)
        return tables

    @torch.no_grad()
    def grad_norm(self, parameters) -> Tensor | None:
        """The 2-norm of the gradients of `parameters` (0-d fp32, non-finite when a gradient is), one launch per
        group; None when they are not exactly the parameters with gradients this optimizer steps, or its kernel
        would not take them (or has no state for them yet: the first step): the caller computes the norm."""
        with_grads = [p for p in parameters if p.grad is not None]
        prepared = self._prepared(make_state=False) if with_grads and self._norm_failed is None else None
        if prepared is None:
            return None
        mine = {id(p) for _, _, tensors, _ in prepared for p, *_ in tensors}
        if len(mine) != len(with_grads) or any(id(p) not in mine for p in with_grads):
            return None
        sums = []
        for index, _, tensors, addresses in prepared:
            tables = self._group_tables(index, tensors, addresses)
            partials = torch.empty(tables.n_blocks, dtype=torch.float32, device=tensors[0][0].device)
            try:
                _grad_squares_blocks[(tables.n_blocks,)](
                    tables.tensor_of_block, tables.first_block, tables.numels, tables.grads, partials, tensors[0][1],
                    BLOCK=_BLOCK, num_warps=8,
                )
            except Exception as err:  # noqa: BLE001 - a build error; the kernel only reads
                if self._norm_ran:
                    raise
                self._norm_failed = f"{type(err).__name__}: {str(err)[:200]}"  # the step's kernel may still run
                logger.warning("Triton gradient norm unavailable (%s); using torch's foreach norm", self._norm_failed)
                return None
            self._norm_ran = True
            sums.append(partials.sum())
        return torch.stack([x.to(sums[0].device) for x in sums]).sum().sqrt()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        prepared = self._prepared(make_state=True)
        if prepared is None:  # torch's fused kernel for what this one does not take
            super().step()
            return loss
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        for index, group, tensors, addresses in prepared:
            try:
                self._launch(index, group, tensors, addresses, grad_scale, found_inf)
            except Exception as err:  # noqa: BLE001 - a build error, raised before the kernel touches a tensor
                if self._kernel_ran:
                    raise
                self._kernel_failed = f"{type(err).__name__}: {str(err)[:200]}"
                logger.warning("Triton AdamW unavailable (%s); using torch's fused AdamW", self._kernel_failed)
                super().step()
                return loss
            self._kernel_ran = True
        return loss

    def _launch(self, index: int, group: dict, tensors: list[tuple[Tensor, ...]], addresses: list[int], grad_scale,
                found_inf) -> None:
        device = tensors[0][0].device
        # where torch's fused step puts them too (a no-op when they are on the parameters' device already)
        grad_scale = grad_scale.to(device, non_blocking=True) if grad_scale is not None else None
        found_inf = found_inf.to(device, non_blocking=True) if found_inf is not None else None
        tables = self._group_tables(index, tensors, addresses)
        _advance_steps[(triton.cdiv(len(tensors), _STEPS_BLOCK),)](
            tables.steps, len(tensors), found_inf if found_inf is not None else tables.numels,
            HAS_FOUND_INF=found_inf is not None, BLOCK=_STEPS_BLOCK,
        )
        beta1, beta2 = group["betas"]
        try:
            _adamw_blocks[(tables.n_blocks,)](
                tables.tensor_of_block, tables.first_block, tables.numels,
                tables.params, tables.grads, tables.avgs, tables.avg_sqs, tables.steps,
                grad_scale if grad_scale is not None else tables.numels,
                found_inf if found_inf is not None else tables.numels,
                float(group["lr"]), float(beta1), float(beta2), math.log2(beta1), math.log2(beta2),
                float(group["eps"]), float(group["weight_decay"]),
                tensors[0][0], HAS_GRAD_SCALE=grad_scale is not None,
                HAS_FOUND_INF=found_inf is not None, BLOCK=_BLOCK, num_warps=8,
            )
        except Exception:
            steps = [step for *_, step in tensors]
            torch._foreach_sub_(steps, 1.0)  # the update did not happen
            if found_inf is not None:
                torch._foreach_add_(steps, [found_inf] * len(steps))
            raise
