"""README "Fork a model", step by step: copy the Qwen3 folder into a user package, rename the spec, change the
block, train it by import path on one process and with FSDP and TP on two CPU ranks, see TP refused until the
plan covers the new norm, and see the HF export refused naming the weight the adapter cannot map."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration

BLOCK_CHANGE = '''
from torch import nn
from posttrain.models.common.rms_norm import RMSNorm
from posttrain.models.common.transformer import TransformerBlock

class SandwichBlock(TransformerBlock):
    def __init__(self, layer_id, args, backend):
        super().__init__(layer_id, args, backend)
        self.post_ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x, cos, sin, mask, kv_cache=None):
        extra = {} if kv_cache is None else {"kv_cache": kv_cache}
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, **extra)
        return h + self.post_ffn_norm(self.feed_forward(self.ffn_norm(h)))

    def init_weights(self, init_std):
        super().init_weights(init_std)
        self.post_ffn_norm.reset_parameters()
'''
LAYERS = ("        self.layers = nn.ModuleDict({str(i): SandwichBlock(i, args, self.attn_backend) "
          "for i in range(args.n_layers)})\n")
TP_PLAN = '''from torch.distributed.tensor.parallel import SequenceParallel
from posttrain.models.common.tp_plan import dense_decoder_tp_plan

def tp_plan(model, *, loss_parallel=False):
    plan = dense_decoder_tp_plan(model, loss_parallel=loss_parallel)
    plan.block["post_ffn_norm"] = SequenceParallel(use_local_output=True)  # acts on the sequence shard
    return plan
'''


def _fork(root: Path) -> None:
    fork = root / "my_models" / "qwen3_fork"
    shutil.copytree(REPO / "posttrain" / "models" / "qwen3", fork, ignore=shutil.ignore_patterns("__pycache__"))
    (root / "my_models" / "__init__.py").write_text("")
    init = fork / "__init__.py"
    text = init.read_text().replace('name="qwen3"', 'name="qwen3_fork"')
    text = text.replace("hf_model_types=(hf_adapter.HF_MODEL_TYPE,)", "hf_model_types=()")
    init.write_text(text)
    model = fork / "model.py"
    model.write_text(model.read_text() + BLOCK_CHANGE)
    text = model.read_text().replace("        super().__init__(args)\n", "        super().__init__(args)\n" + LAYERS, 1)
    model.write_text(text)


def _train(root: Path, out: Path, *extra: str, ranks: int = 1) -> subprocess.CompletedProcess:
    launch = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                  f"--nproc_per_node={ranks}"]
    cmd = [*launch, "train.py", "--config", "train_configs/debug_sft.toml", "--model.name",
           "my_models.qwen3_fork:MODEL_SPEC", "--job.output_dir", str(out), "--training.steps", "2",
           "--training.seq_len", "128", "--checkpoint.interval", "2", "--data.num_workers", "0", *extra]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(REPO)]), "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, check=False, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)


def _steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_a_forked_family_trains_by_import_path_and_its_gaps_are_named(tmp_path: Path) -> None:
    _fork(tmp_path)

    one = _train(tmp_path, tmp_path / "one", "--checkpoint.export_hf", "true")
    assert _steps(tmp_path / "one")[-1] == 2, one.stderr[-3000:]
    assert (tmp_path / "one" / "checkpoints" / "step-2").is_dir()
    assert one.returncode != 0 and "layers.0.post_ffn_norm.weight has no Hugging Face name" in one.stderr
    assert "Traceback" not in one.stderr and "checkpoint.export_hf" in one.stderr  # one line, not a traceback

    fsdp = _train(tmp_path, tmp_path / "fsdp", "--checkpoint.export_hf", "false", ranks=2)
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]
    assert _steps(tmp_path / "fsdp")[-1] == 2

    tp = ("--checkpoint.export_hf", "false", "--parallelism.dp_shard", "1", "--parallelism.tp", "2")
    refused = _train(tmp_path, tmp_path / "tp_refused", *tp, ranks=2)
    assert refused.returncode != 0 and "covers no style for 2 parameter(s): layers.0.post_ffn_norm.weight" in refused.stderr

    fork = tmp_path / "my_models" / "qwen3_fork"
    (fork / "tp_plan.py").write_text(TP_PLAN)
    init = fork / "__init__.py"
    text = init.read_text().replace("from .model import Qwen3Model\n", "from .model import Qwen3Model\nfrom .tp_plan import tp_plan\n")
    init.write_text(text.replace("tp_plan=dense_decoder_tp_plan", "tp_plan=tp_plan"))
    tp_run = _train(tmp_path, tmp_path / "tp", *tp, ranks=2)
    assert tp_run.returncode == 0, tp_run.stderr[-3000:]
    assert _steps(tmp_path / "tp")[-1] == 2
