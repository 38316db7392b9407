"""Worker for tests/integration/test_model_families_parallel.py: the shared parallel-equivalence checks of
``_parallel_worker.py`` (single-process reference on every rank; logits, loss and gradients compared) run on
the Gemma 3 TP plan (sandwich norms) and GPT-OSS under FSDP with activation checkpointing.

``python -m torch.distributed.run --nproc_per_node=2 _families_parallel_worker.py families OUT_DIR``
"""

from __future__ import annotations

import os

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import _parallel_worker as worker


def case_families(out: Path, hf_dirs: list[str]) -> dict:
    # Gemma's embedding scale (sqrt(dim)) makes gradients larger; summation order then moves them by ~1e-7
    worker.GRAD_TOL = dict(rtol=1e-4, atol=1e-6)
    worker.compare_to_reference("gemma3", "tp")
    worker.compare_to_reference("gemma3", "fsdp_tp", ac_mode="full", use_output_fn=True)
    worker.compare_to_reference("gpt_oss", "fsdp", ac_mode="full", use_output_fn=True)
    return {"ok": True}


worker.CASES["families"] = case_families

if __name__ == "__main__":
    worker.main()
    # Skip interpreter teardown: gloo's threads can abort the process there ("terminate called without an
    # active exception") after all work and the process-group shutdown are done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
