"""The SFT loss and its gradients equal Hugging Face's on the same weights and tokens (fp32, CPU).

This pins the whole training path below the optimizer: chunked cross-entropy inside the forward, the label
shift done by the packer, and every parameter's gradient through the hand-written model.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from posttrain.losses import chunked_cross_entropy
from posttrain.models import load_hf

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("verify_hf_parity", REPO / "scripts" / "verify_hf_parity.py")
verify = sys.modules.get("verify_hf_parity") or importlib.util.module_from_spec(_spec)
sys.modules["verify_hf_parity"] = verify  # dataclasses look their module up while the file executes
_spec.loader.exec_module(verify)


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_loss_and_gradients_equal_transformers(model_type: str, tmp_path: Path) -> None:
    folder = verify.make_random_hf_model(model_type, tmp_path / model_type)
    theirs = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
    ours = load_hf(folder)
    vocab = ours.args.vocab_size
    torch.manual_seed(0)
    ids = torch.randint(0, vocab, (2, 24))
    hf_labels = ids.clone()
    hf_labels[0, :5] = -100  # an untrained prompt
    labels = torch.full_like(ids, -100)  # posttrain's labels are already shifted (the packer does it)
    labels[:, :-1] = hf_labels[:, 1:]

    loss_sum, n = ours(ids, output_fn=lambda h, w: chunked_cross_entropy(h, w, labels, vocab_size=vocab, chunk_size=7))
    (loss_sum / n).backward()
    theirs(input_ids=ids, labels=hf_labels).loss.backward()

    hf_loss = torch.nn.functional.cross_entropy(
        theirs(input_ids=ids).logits[:, :-1].reshape(-1, vocab), hf_labels[:, 1:].reshape(-1), ignore_index=-100
    )
    assert (loss_sum / n).item() == pytest.approx(hf_loss.item(), rel=1e-5)
    pairs = [
        ("layers.0.attention.wq.weight", "model.layers.0.self_attn.q_proj.weight"),
        ("layers.1.feed_forward.w2.weight", "model.layers.1.mlp.down_proj.weight"),
        ("norm.weight", "model.norm.weight"),
        ("tok_embeddings.weight", "model.embed_tokens.weight"),
    ]
    ours_p, theirs_p = dict(ours.named_parameters()), dict(theirs.named_parameters())
    for mine, hf in pairs:
        g_ours, g_hf = ours_p[mine].grad[: theirs_p[hf].shape[0]], theirs_p[hf].grad
        assert torch.allclose(g_ours, g_hf, rtol=1e-4, atol=1e-6 * g_hf.abs().max()), (mine, (g_ours - g_hf).abs().max())
