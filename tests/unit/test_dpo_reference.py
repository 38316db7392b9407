"""DPO's loss function on a real tiny model: per-pair log-probs from one packed forward, a reference equal to the
policy, and the LoRA reference (the policy with its adapters off) equal to the base model."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from posttrain.config.sections import DPOSection
from posttrain.datasets.preference import pack_pairs, tokenize_preference_row
from posttrain.datasets.tokenizer import HFTokenizer
from posttrain.models import build_model
from posttrain.models.common.lora import apply_lora
from posttrain.recipes.dpo import (
    ReferenceLogProbs,
    adapters_disabled,
    dpo_loss,
    pair_log_probs,
)

ASSETS = Path(__file__).resolve().parents[1] / "assets"


@pytest.fixture(scope="module")
def batch() -> dict:
    tok = HFTokenizer(ASSETS / "tokenizer")
    rows = [
        {"prompt": [{"role": "user", "content": f"What is {i} + 1?"}],
         "chosen": [{"role": "assistant", "content": f"The answer is {i + 1}."}],
         "rejected": [{"role": "assistant", "content": f"It is {i + 7}, I think."}]}
        for i in range(3)
    ]
    pairs = [tokenize_preference_row(r, tok, index=i, where=f"t:{i}") for i, r in enumerate(rows)]
    return pack_pairs(pairs, seq_len=2 * len(pairs[0]) + 8, rows=2, pad_id=tok.pad_id)


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("qwen3", "debug", device="cpu")


def test_packed_log_probs_equal_each_sequence_scored_alone(batch: dict) -> None:
    model = _model()
    chosen, rejected, chosen_len, rejected_len = pair_log_probs(model, batch, chunk_size=16)
    seq, labels, ids = batch["sequence_ids"], batch["labels"], batch["input_ids"]
    for k in range(3):
        for j, got in ((0, chosen[k]), (1, rejected[k])):
            where = seq == 2 * k + j
            row = int(where.any(dim=1).nonzero()[0])
            cols = where[row].nonzero().squeeze(1)
            logits = model(ids[row : row + 1, cols])  # the sequence alone, no packing
            logp = torch.log_softmax(logits[0].double(), -1)
            lab = labels[row, cols]
            keep = lab != -100
            expected = logp[keep].gather(1, lab[keep][:, None]).sum()
            assert got.item() == pytest.approx(expected.item(), rel=1e-4)
            assert (chosen_len if j == 0 else rejected_len)[k].item() == int(keep.sum())


def test_dpo_loss_with_policy_equal_to_reference_is_log_two_at_chance(batch: dict) -> None:
    policy = _model()
    reference = ReferenceLogProbs(copy.deepcopy(policy).requires_grad_(False), chunk_size=16)
    out = dpo_loss(policy, batch, None, dpo=DPOSection(beta=0.1), reference=reference, chunk_size=16)
    assert out.n_targets.item() == 3
    assert out.loss_sum.item() == pytest.approx(3 * math.log(2), rel=1e-5)
    assert out.metrics["reward_accuracy"].item() == pytest.approx(1.5)  # three ties, one half each
    out.loss_sum.backward()
    assert policy.layers["0"].attention.wq.weight.grad.abs().sum() > 0


def test_lora_reference_is_the_base_model_with_adapters_off(batch: dict) -> None:
    base = _model()
    policy = copy.deepcopy(base)
    apply_lora(policy, rank=4, alpha=8, targets=("wq", "wv", "w2"))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_b" in name:
                p.normal_(0, 0.5)  # trained adapters: the policy now differs from the base
    base_logps = pair_log_probs(base, batch, chunk_size=16)[0]
    assert not torch.allclose(pair_log_probs(policy, batch, chunk_size=16)[0], base_logps)
    reference = ReferenceLogProbs(policy, chunk_size=16, adapters_off=True)
    ref_chosen, _ = reference(batch)
    assert torch.allclose(ref_chosen, base_logps, rtol=1e-5)
    assert all(m.scaling == 2.0 for m in policy.modules() if hasattr(m, "lora_a"))  # restored afterwards
    with adapters_disabled(policy):
        assert torch.allclose(pair_log_probs(policy, batch, chunk_size=16)[0], base_logps, rtol=1e-5)


def test_precomputed_reference_table_matches_the_live_reference(batch: dict) -> None:
    ref_model = _model(1)
    live = ReferenceLogProbs(ref_model, chunk_size=16)
    cached = ReferenceLogProbs(ref_model, chunk_size=16)
    cached.precompute([(batch, True)], n_pairs=3, device=torch.device("cpu"), to_device=lambda b: b)
    assert cached.model is None
    for a, b in zip(live(batch), cached(batch)):
        assert torch.allclose(a, b)
