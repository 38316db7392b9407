"""The Triton cross-entropy gradient kernel (run by Triton's CPU interpreter here) against the reference math
`logit_math.ce_grad_`: same rows, same gradient up to one rounding of the chunk's dtype, tails that are not a
multiple of the block, targets at both ends of the vocabulary."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[2]

CHECK = textwrap.dedent("""
    import itertools
    import torch
    from posttrain.losses import ce_grad_kernel
    from posttrain.losses.ce_grad_kernel import ce_grad_rows_
    from posttrain.losses.logit_math import ce_grad_

    torch.manual_seed(0)
    # per SM 0 (one program per row) and 2 (the interpreter's one "SM": two programs loop over the rows, the
    # second pass walking each row backwards)
    for per_sm, (dtype, grad_tol) in itertools.product((0, 2), ((torch.float32, 1e-5), (torch.bfloat16, 2 ** -8))):
        ce_grad_kernel.L2_PROGRAMS_PER_SM = per_sm
        for rows, vocab in ((3, 5000), (2, 4096), (1, 9001), (5, 8193)):
            x = (torch.randn(rows, vocab) * 4).to(dtype)
            x[0, 7] = 30.0  # one dominant logit: the running max must rescale the running sum
            targets = torch.randint(0, vocab, (rows,))
            targets[0], targets[-1] = 0, vocab - 1
            got, want = x.clone(), x.clone()
            got_rows, want_rows = ce_grad_rows_(got, targets), ce_grad_(want, targets)
            assert got.dtype == dtype and got_rows.dtype == torch.float32
            torch.testing.assert_close(got_rows, want_rows, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=grad_tol)
            assert abs(got.float().sum(-1)).max() < 1e-2  # softmax - one_hot sums to zero per row
    print("ok")
""")


def test_triton_kernel_matches_reference_math_in_the_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_kernel_is_chosen_only_on_cuda_without_softcap(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from posttrain.losses import ce_grad_kernel
    from posttrain.losses.ce_grad_kernel import ce_grad_fn

    monkeypatch.setattr(ce_grad_kernel, "_kernel_failed", None)  # restored after the test

    def fallback(*args):
        return None

    assert ce_grad_fn(torch.device("cpu"), None, fallback) is fallback
    assert ce_grad_fn(torch.device("cuda"), 30.0, fallback) is fallback
    chosen = ce_grad_fn(torch.device("cuda"), None, fallback)
    assert chosen is not fallback
    # a kernel that cannot run (here: CPU tensors outside the interpreter) hands over to the fallback, once
    calls = []
    assert ce_grad_fn(torch.device("cuda"), None, lambda *a: calls.append(a) or "fallback")(
        torch.zeros(2, 8), torch.zeros(2, dtype=torch.long)
    ) == "fallback"
    assert len(calls) == 1 and ce_grad_fn(torch.device("cuda"), None, fallback) is fallback
