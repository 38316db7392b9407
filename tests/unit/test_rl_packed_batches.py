"""GRPO's packed micro-batches (grpo.micro_batch_tokens): the layout, the same log-probs, loss and gradients as
the padded layout on a real model (CPU, SDPA, fp32), one shape every step, and equal forwards across ranks."""

from __future__ import annotations

import pytest
import torch

from posttrain.config.sections import GRPOSection
from posttrain.models.registry import get_model_spec, resolve_scratch_args
from posttrain.rl.batches import PER_TOKEN_KEYS, padding_row
from posttrain.models.common.shared_prompts import shared_document_id
from posttrain.rl.packed_batches import (
    micro_batches,
    pack_order,
    packed_batch,
    packed_response_values,
    shared_pack_order,
    shared_prompt_batch,
)
from posttrain.rl.workers import grpo_loss_fn, response_log_probs, with_target_index
from posttrain.trainer import count_targets

ROW_LEN = 32


def _rows(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        prompt = torch.randint(10, 500, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist()
        n_resp = int(torch.randint(1, 12, (1,), generator=g))
        rows.append({
            "prompt_ids": prompt,
            "token_ids": torch.randint(10, 500, (n_resp,), generator=g).tolist(),
            "advantage": float(torch.randn((), generator=g)),
            "old_logp": (-torch.rand(n_resp, generator=g)).tolist(),
            "ref_logp": (-torch.rand(n_resp, generator=g)).tolist(),
            "engine_logp": (-torch.rand(n_resp, generator=g)).tolist(),
        })
    return rows


def test_pack_order_fills_rows_first_fit_decreasing_and_skips_empty_completions() -> None:
    rows = _rows(12, seed=1) + [padding_row()]
    packs = pack_order(rows, ROW_LEN)
    sizes = [len(r["prompt_ids"]) + len(r["token_ids"]) - 1 for r in rows]
    assert sorted(i for p in packs for i in p) == list(range(12))  # each completion once, the padding row nowhere
    assert all(sum(sizes[i] for i in p) <= ROW_LEN for p in packs)
    loads = [sum(sizes[i] for i in p) for p in packs]
    assert all(a + b > ROW_LEN for j, a in enumerate(loads) for b in loads[j + 1 :])  # first fit: no two would merge
    with pytest.raises(ValueError, match=r"grpo.micro_batch_tokens \(8\) is shorter than a completion"):
        pack_order(rows, 8)


def test_packed_row_gives_each_completion_its_document_and_values_at_its_tokens() -> None:
    rows = _rows(3, seed=2)
    batch = packed_batch(rows, row_len=ROW_LEN, pad_id=0, sequence_targets=True)
    assert batch["input_ids"].shape == (1, ROW_LEN) and int(batch["n_targets"]) == 3
    at = 0
    for doc, r in enumerate(rows):
        n_in = len(r["prompt_ids"]) + len(r["token_ids"]) - 1
        span = slice(at, at + n_in)
        assert batch["document_ids"][0, span].eq(doc).all()
        assert batch["position_ids"][0, span].tolist() == list(range(n_in))
        assert batch["input_ids"][0, span].tolist() == (r["prompt_ids"] + r["token_ids"])[:-1]
        resp = slice(at + len(r["prompt_ids"]) - 1, at + n_in)
        assert batch["labels"][0, resp].tolist() == r["token_ids"]
        assert batch["labels"][0, at : resp.start].eq(-100).all()
        assert batch["old_logp"][0, resp].tolist() == pytest.approx(r["old_logp"])
        assert batch["advantages"][0, resp].eq(torch.tensor(r["advantage"], dtype=torch.float32)).all()
        at += n_in
    assert batch["document_ids"][0, at:].eq(-1).all() and batch["labels"][0, at:].eq(-100).all()
    assert batch["position_ids"][0, at:].tolist() == list(range(ROW_LEN - at))
    # the inverse reads back each completion's values
    assert packed_response_values(batch["ref_logp"], rows) == [pytest.approx(r["ref_logp"]) for r in rows]


def test_a_per_token_list_of_the_wrong_length_is_refused() -> None:
    rows = _rows(3, 0)
    rows[1]["old_logp"] = rows[1]["old_logp"][:-1] + [0.0, 0.0]
    with pytest.raises(ValueError, match=r"completion 1 has \d+ old_logp values for \d+ tokens"):
        packed_batch(rows, row_len=ROW_LEN, pad_id=0)


def test_every_step_has_one_shape_and_ranks_run_as_many_forwards() -> None:
    shapes = set()
    for seed in range(3):  # three "steps" with other completions
        for _, batch, _ in micro_batches(_rows(10, seed), micro_rows=0, micro_tokens=ROW_LEN, pad_id=0):
            shapes.add(tuple(batch["input_ids"].shape))
    assert shapes == {(1, ROW_LEN)}
    forwards = list(micro_batches(_rows(3, 0), micro_rows=0, micro_tokens=ROW_LEN, pad_id=0,
                                  forwards_over_ranks=lambda n: n + 2))
    assert len(forwards) == len(pack_order(_rows(3, 0), ROW_LEN)) + 2
    assert all(idx == [] and b["labels"].eq(-100).all() for idx, b, _ in forwards[-2:])
    # the padding forwards carry the per-token keys the loss reads (zeros), like the real ones
    assert all(set(PER_TOKEN_KEYS) <= set(b) for _, b, _ in forwards)


@pytest.fixture(scope="module")
def tiny_model() -> torch.nn.Module:
    spec = get_model_spec("qwen3")
    args = resolve_scratch_args(spec, "debug", overrides={"dim": 64, "n_layers": 2, "ffn_dim": 128, "attn_backend": "sdpa"})
    torch.manual_seed(0)
    model = spec.model_cls(args)
    model.init_weights()
    return model.float()


def _layout_pass(model, rows, *, micro_tokens: int, agg: str, target_index: bool = False,
                 share_prompts: bool = False) -> tuple[list[list[float]], float, list[torch.Tensor]]:
    """Per-row log-probs (no grad), then the GRPO loss normalised as the trainer does and its gradients."""
    seq = agg == "sequence_mean"
    forwards = list(micro_batches(rows, micro_rows=3, micro_tokens=micro_tokens, pad_id=0, sequence_targets=seq,
                                  share_prompts=share_prompts))
    if target_index:  # as PolicyWorker sends them: the label positions selected by an index made on the host
        forwards = [(i, with_target_index(b), v) for i, b, v in forwards]
    logps: list[list[float]] = [[] for _ in rows]
    with torch.no_grad():
        for indices, batch, values_of in forwards:
            logp, _ = response_log_probs(model, batch, temperature=0.7, chunk_size=16)
            for i, v in zip(indices, values_of(logp)):
                logps[i] = v
    grpo = GRPOSection(loss_agg=agg, kl_coef=0.1, temperature=0.7, old_logprobs="engine")
    n_global = sum(int(count_targets(b)) for _, b, _ in forwards)
    model.zero_grad()
    total = 0.0
    for _, batch, _ in forwards:
        out = grpo_loss_fn(model, batch, n_global, grpo=grpo, chunk_size=16)
        (out.loss_sum / n_global).backward()
        total += float(out.loss_sum.detach()) / n_global
    return logps, total, [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("target_index", [False, True])
@pytest.mark.parametrize("agg", ["token_mean", "sequence_mean"])
def test_packed_rows_give_the_padded_log_probs_loss_and_gradients(tiny_model, agg: str, target_index: bool) -> None:
    rows = _rows(9, seed=3) + [padding_row()]
    padded_logp, padded_loss, padded_grads = _layout_pass(tiny_model, rows, micro_tokens=0, agg=agg)
    packed_logp, packed_loss, packed_grads = _layout_pass(tiny_model, rows, micro_tokens=ROW_LEN, agg=agg,
                                                          target_index=target_index)
    assert len(pack_order(rows, ROW_LEN)) < len(rows) - 1  # several completions share a row
    for a, b in zip(packed_logp, padded_logp):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-5, atol=1e-5)
    assert packed_loss == pytest.approx(padded_loss, rel=1e-5, abs=1e-6)
    for a, b in zip(packed_grads, padded_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # fp32 sums in another order


def test_packed_forwards_compile_once(tiny_model) -> None:
    """A compiled block sees one shape over steps of different completions: no recompilation."""
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    layers = torch.nn.ModuleList(tiny_model.layers.values())
    originals = [b.forward for b in layers]
    for b in layers:
        b.compile(backend=counting_backend, fullgraph=True)
    try:
        per_step = []
        for seed in range(3):
            with torch.no_grad():
                for _, batch, _ in micro_batches(_rows(8, seed + 10), micro_rows=0, micro_tokens=ROW_LEN, pad_id=0):
                    response_log_probs(tiny_model, batch, temperature=1.0, chunk_size=16)
            per_step.append(len(graphs))
        assert per_step[0] >= 1 and per_step[0] == per_step[1] == per_step[2]
    finally:
        for b in layers:
            b._compiled_call_impl = None
        torch._dynamo.reset()
        del originals


def _groups(prompts: int, group_size: int, seed: int) -> list[dict]:
    """GRPO's rows: `group_size` completions of each prompt, the groups interleaved as a shuffled minibatch."""
    rows = _rows(prompts * group_size, seed)
    for i, r in enumerate(rows):
        r["prompt_ids"] = list(rows[i % prompts]["prompt_ids"])
    return rows


def test_shared_prompt_rows_hold_each_prompt_once_per_group_part() -> None:
    rows = _groups(3, 4, seed=5) + [padding_row()]
    packs = shared_pack_order(rows, ROW_LEN)
    parts = [part for pack in packs for part in pack]
    assert sorted(i for part in parts for i in part) == list(range(12))  # every completion once, padding none
    for pack in packs:
        for part in pack:
            assert len({tuple(rows[i]["prompt_ids"]) for i in part}) == 1
        used = sum(len(rows[part[0]]["prompt_ids"]) - 1 + sum(len(rows[i]["token_ids"]) for i in part)
                   for part in pack)
        assert used <= ROW_LEN
    # fewer positions than one prompt copy per completion
    assert sum(len(pack) for pack in packs) < 12
    group = [rows[i] for i in parts[0]]
    batch, spans = shared_prompt_batch([group], row_len=ROW_LEN, pad_id=0)
    prompt = group[0]["prompt_ids"]
    ids, pos, labels = batch["document_ids"][0].tolist(), batch["position_ids"][0].tolist(), batch["labels"][0].tolist()
    assert ids[:len(prompt) - 1] == [shared_document_id(0, 0)] * (len(prompt) - 1)
    assert batch["input_ids"][0, :len(prompt) - 1].tolist() == prompt[:-1]
    for m, (r, (start, n)) in enumerate(zip(group, spans), start=1):
        assert n == len(r["token_ids"]) and labels[start:start + n] == r["token_ids"]
        assert batch["input_ids"][0, start:start + n].tolist() == prompt[-1:] + r["token_ids"][:-1]
        assert pos[start:start + n] == list(range(len(prompt) - 1, len(prompt) - 1 + n))
        assert ids[start:start + n] == [shared_document_id(0, m)] * n
        assert batch["old_logp"][0, start:start + n].tolist() == pytest.approx(r["old_logp"])


def test_a_group_longer_than_a_row_is_split_with_a_prompt_copy_per_part() -> None:
    rows = _groups(1, 8, seed=6)
    packs = shared_pack_order(rows, 16)
    parts = [part for pack in packs for part in pack]
    assert len(parts) > 1 and sorted(i for p in parts for i in p) == list(range(8))
    with pytest.raises(ValueError, match="grpo.micro_batch_tokens"):
        shared_pack_order(rows, 8)


@pytest.mark.parametrize("agg", ["token_mean", "sequence_mean"])
def test_shared_prompts_give_the_padded_log_probs_loss_and_gradients(tiny_model, agg: str) -> None:
    rows = _groups(3, 4, seed=7) + [padding_row()]
    padded_logp, padded_loss, padded_grads = _layout_pass(tiny_model, rows, micro_tokens=0, agg=agg)
    shared_logp, shared_loss, shared_grads = _layout_pass(tiny_model, rows, micro_tokens=ROW_LEN, agg=agg,
                                                          target_index=True, share_prompts=True)
    for a, b in zip(shared_logp, padded_logp):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-5, atol=1e-5)
    assert shared_loss == pytest.approx(padded_loss, rel=1e-5, abs=1e-6)
    for a, b in zip(shared_grads, padded_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_share_prompts_needs_packed_rows_and_no_sliding_window(tmp_path) -> None:
    import json

    from posttrain.config.loader import parse_config
    from posttrain.rl.controller import check_grpo_config

    configs = {"llama": {"model_type": "llama"}, "qwen3": {"model_type": "qwen3", "sliding_window": 4096,
                                                           "use_sliding_window": False},
               "gemma3": {"model_type": "gemma3", "text_config": {"sliding_window": 512}},
               "gpt_oss": {"model_type": "gpt_oss", "sliding_window": 128}}
    for name, config in configs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    base = ["--config", "train_configs/debug_grpo.toml", "--grpo.share_prompts", "true", "--grpo.micro_batch_tokens"]
    for name in ("llama", "qwen3"):
        check_grpo_config(parse_config([*base, "512", "--model.hf_path", str(tmp_path / name)]))
    with pytest.raises(SystemExit, match="grpo.share_prompts needs packed rows"):
        check_grpo_config(parse_config([*base, "0", "--model.hf_path", str(tmp_path / "llama")]))
    for name in ("gemma3", "gpt_oss"):  # the window would count the group's other completions
        with pytest.raises(SystemExit, match="grpo.share_prompts does not support sliding-window attention"):
            check_grpo_config(parse_config([*base, "512", "--model.hf_path", str(tmp_path / name)]))
    # a Hub id (or a folder an earlier job writes) is not fetched here: the policy workers check the built model
    check_grpo_config(parse_config([*base, "512", "--model.hf_path", "no-such-owner/no-such-model"]))
