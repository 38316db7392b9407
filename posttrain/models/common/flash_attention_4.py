"""FlashAttention-4 behind SDPA's flash entry: ``model.sdpa_kernel = "fa4"``.

torch (2.11 on) can route ``F.scaled_dot_product_attention``'s flash kernels to FlashAttention-4, the CuTe-DSL
kernels of the ``flash-attn-4`` package (Hopper and Blackwell), through its flash-attention registry. The switch is
process-wide (it re-registers aten's flash ops for CUDA), so it is made once, when a model that asks for it is
built; SDPA is then pinned to its flash entry (``attention.SDPA_KERNELS``). The package is an opt-in dependency:
``pip install flash-attn-4`` (it brings nvidia-cutlass-dsl; kernels are compiled on first use).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
from typing import Any

import torch

PACKAGE_HINT = "pip install flash-attn-4"


class FlashAttention4Unavailable(RuntimeError):
    """FA4 cannot run here; the message says why in one line."""


def fa4_unavailable_reason() -> str | None:
    """Why FA4 cannot be switched on in this process (None when it can); imports nothing heavy."""
    attention = torch.nn.attention
    if not hasattr(attention, "activate_flash_attention_impl"):
        return f"torch {torch.__version__} has no flash-attention registry (torch >= 2.11 has one)"
    if "FA4" not in attention.list_flash_attention_impls():
        return f"torch {torch.__version__} does not list FA4 among its flash-attention implementations"
    if not torch.cuda.is_available():
        return "FA4 runs on CUDA GPUs only; no GPU is visible"
    major, minor = torch.cuda.get_device_capability()
    if major not in (9, 10):
        return f"FA4 needs a Hopper or Blackwell GPU (compute capability 9.x or 10.x); this one is {major}.{minor}"
    package = importlib.util.find_spec("flash_attn")
    if package is None:
        return f"the flash-attn-4 package is not installed ({PACKAGE_HINT})"
    if not any(os.path.isdir(os.path.join(root, "cute")) for root in package.submodule_search_locations or []):
        return f"flash_attn is installed without FA4's cute kernels (flash-attn 2?): {PACKAGE_HINT}"
    return None


def activate_fa4() -> None:
    """Route SDPA's flash kernels to FA4 for the rest of the process (again: nothing to do)."""
    reason = fa4_unavailable_reason()
    if reason is not None:
        raise FlashAttention4Unavailable(reason)
    attention = torch.nn.attention
    if getattr(attention, "current_flash_attention_impl", lambda: None)() == "FA4" and _entry_module() == __name__:
        return
    try:
        _import_cutlass_dsl()
        importlib.import_module("flash_attn.cute.interface")
        _register_through_this_module()
        attention.activate_flash_attention_impl("FA4")
    except Exception as err:  # the package is there but its import failed (CUDA libraries, versions)
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FlashAttention4Unavailable(f"switching SDPA to FA4 failed: {first_line} ({PACKAGE_HINT})") from err


def _import_cutlass_dsl() -> None:
    """nvidia-cutlass-dsl puts its ``cutlass`` package on sys.path with a .pth file, which Python reads only in a
    site-packages folder: an install with ``pip --target`` (a cluster's shared folder) needs the same step here."""
    if importlib.util.find_spec("cutlass") is not None or importlib.util.find_spec("nvidia_cutlass_dsl") is None:
        return
    import nvidia_cutlass_dsl

    for root in nvidia_cutlass_dsl.__path__:
        packages = os.path.join(root, "dsl_packages")
        if os.path.isdir(packages) and packages not in sys.path:
            sys.path.insert(0, packages)


def _register_through_this_module() -> None:
    """torch's FA4 entry unpacks (out, lse) from the package's forward, which later flash-attn-4 releases extend
    with more values: register the entry with this module's two adapters below as the kernel module."""
    from torch.nn.attention import _fa4

    if not hasattr(_fa4, "register_flash_attention_fa4"):  # a torch whose entry differs: its own default
        return
    torch.nn.attention.register_flash_attention_impl(
        "FA4", register_fn=functools.partial(_fa4.register_flash_attention_fa4, module_path=__name__)
    )


def _entry_module() -> str | None:
    """The kernel module torch's FA4 entry calls (None: not registered, or a torch without that entry)."""
    from torch.nn.attention import _fa4

    return getattr(_fa4, "_FA4_MODULE_PATH", None)


# calls through the adapters: a check that FA4 really ran (torch's entry may hand inputs it cannot take elsewhere)
CALLS = {"forward": 0, "backward": 0}


def _flash_attn_fwd(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    from flash_attn.cute import interface

    CALLS["forward"] += 1
    result = interface._flash_attn_fwd(*args, **kwargs)
    return result[0], result[1]


def _flash_attn_bwd(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from flash_attn.cute import interface

    CALLS["backward"] += 1
    dq, dk, dv = interface._flash_attn_bwd(*args, **kwargs)[:3]
    return dq, dk, dv
