"""GRPO plumbing: completions -> micro-batches (labels and per-token values aligned with the response), and the
trainer -> engine weight sync (HF names, buckets, LoRA merged) that makes the engine's logits the trainer's."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from posttrain.inference.native import NativeEngine
from posttrain.models import load_hf, save_hf
from posttrain.models.common.lora import LoRALinear
from posttrain.models.registry import get_model_spec, resolve_scratch_args
from posttrain.rl.batches import completion_batch, response_values, split_evenly
from posttrain.rl.weight_sync import hf_weight_buckets, open_bucket, share_bucket


def _tiny_model(seed: int) -> torch.nn.Module:
    spec = get_model_spec("qwen3")
    args = resolve_scratch_args(spec, "debug", overrides={"dim": 64, "n_layers": 2, "ffn_dim": 128, "vocab_size": 250})
    torch.manual_seed(seed)
    model = spec.model_cls(args)
    model.init_weights()
    return model.eval()


def test_completion_batch_puts_each_response_token_at_its_label() -> None:
    rows = [
        {"prompt_ids": [5, 6, 7], "token_ids": [8, 9], "advantage": 1.5, "old_logp": [-0.1, -0.2]},
        {"prompt_ids": [5], "token_ids": [4, 3, 2], "advantage": -0.5, "old_logp": [-1.0, -2.0, -3.0]},
    ]
    b = completion_batch(rows, pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8], [5, 4, 3, 0]]
    assert b["labels"].tolist() == [[-100, -100, 8, 9], [4, 3, 2, -100]]
    assert b["document_ids"].tolist() == [[0, 0, 0, 0], [0, 0, 0, -1]]
    assert b["advantages"].tolist() == [[0, 0, 1.5, 1.5], [-0.5, -0.5, -0.5, 0]]
    back = response_values(b["old_logp"], rows)
    assert torch.allclose(torch.tensor(back[0]), torch.tensor([-0.1, -0.2])) and back[1] == [-1.0, -2.0, -3.0]
    assert "n_targets" not in b and int(completion_batch(rows, pad_id=0, sequence_targets=True)["n_targets"]) == 2


def test_split_evenly_pads_every_share_to_the_same_length() -> None:
    rows = [{"prompt_ids": [1, 2], "token_ids": [3], "advantage": float(i)} for i in range(5)]
    shares = split_evenly(rows, 2)
    assert [len(s) for s in shares] == [3, 3]
    assert [r["advantage"] for r in shares[0]] == [0.0, 2.0, 4.0] and shares[1][-1]["token_ids"] == []


def test_weight_buckets_equal_save_hf_and_sync_the_engine(tmp_path) -> None:
    policy, stale = _tiny_model(0), _tiny_model(1)
    save_hf(policy, tmp_path / "policy")
    expected = load_file(str(tmp_path / "policy" / "model.safetensors"))
    buckets = list(hf_weight_buckets(policy, bucket_bytes=64 * 1024))
    assert len(buckets) > 2
    sent = {name: t for bucket in buckets for name, t in bucket}
    assert sent.keys() == expected.keys()
    assert all(torch.equal(sent[k], expected[k]) for k in expected)

    save_hf(stale, tmp_path / "stale")
    engine = NativeEngine(load_hf(tmp_path / "stale"))
    for bucket in buckets:
        engine.update_weights(bucket)
    ids = torch.tensor([[1, 7, 42, 9, 100]])
    with torch.no_grad():
        assert torch.allclose(engine.model(ids), policy(ids), atol=1e-6)


def test_weight_buckets_merge_lora(tmp_path) -> None:
    model = _tiny_model(0)
    lora = LoRALinear(model.layers["0"].attention.wq, rank=4, alpha=8.0)
    model.layers["0"].attention.wq = lora
    lora.reset_lora_parameters()
    torch.nn.init.normal_(lora.lora_b.weight)
    merged = {n: t for b in hf_weight_buckets(model) for n, t in b}
    q = merged["model.layers.0.self_attn.q_proj.weight"]
    expected = lora.base.weight + lora.scaling * lora.lora_b.weight @ lora.lora_a.weight
    assert torch.allclose(q, expected.detach(), atol=1e-6)


def test_weight_buckets_merge_expert_lora_like_save_hf(tmp_path) -> None:
    """LoRA on stacked MoE experts: the synced experts are W + their adapters' update, as save_hf writes them."""
    from posttrain.models import build_model
    from posttrain.models.common.lora import adapters_disabled, apply_lora, init_lora_adapters

    torch.manual_seed(0)
    model = build_model("qwen3_moe", "debug", device="cpu", vocab_size=256)
    apply_lora(model, rank=4, alpha=8, targets=("wq", "experts"))
    init_lora_adapters(model, seed=1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_b.weight"):
                p.normal_(std=0.1)
    synced = {n: t for b in hf_weight_buckets(model, bucket_bytes=2**16) for n, t in b}
    save_hf(model, tmp_path / "hf")
    saved = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert synced.keys() == saved.keys()
    expert_names = [n for n in saved if ".experts." in n]
    assert expert_names
    for name in saved:
        assert torch.equal(synced[name], saved[name]), name
    with adapters_disabled(model):  # scaling 0: the base weights
        base = {n: t for b in hf_weight_buckets(model) for n, t in b}
    assert all(not torch.equal(synced[n], base[n]) for n in expert_names)  # the expert adapters were merged


def test_cuda_ipc_sharing_refuses_host_tensors() -> None:
    with pytest.raises(ValueError, match="model.embed_tokens.weight is on cpu"):
        share_bucket([("model.embed_tokens.weight", torch.zeros(2, 2))])


def _open_and_sum(shared, queue) -> None:
    queue.put([(name, float(t.sum())) for name, t in open_bucket(shared)])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA IPC needs a GPU (not run in CI)")
def test_cuda_ipc_bucket_opens_in_another_process() -> None:
    bucket = [("a", torch.randn(64, 64, device="cuda")), ("b", torch.arange(10.0, device="cuda"))]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_open_and_sum, args=(share_bucket(bucket), queue))
    child.start()
    got = queue.get(timeout=120)
    child.join(timeout=60)
    assert [name for name, _ in got] == ["a", "b"]
    for (_, total), (_, tensor) in zip(got, bucket):
        assert total == pytest.approx(float(tensor.sum()), rel=1e-6)
