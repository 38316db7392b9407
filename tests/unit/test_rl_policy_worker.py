"""The GRPO policy worker without Ray: reference / old log-probs, an update through the trainer core (KL in the
loss, several minibatches, sequence-mean), and the checkpoint round trip with the controller's state."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from posttrain.config import parse_config
from posttrain.datasets.tokenizer import HFTokenizer
from posttrain.models import save_hf
from posttrain.models.registry import get_model_spec, resolve_scratch_args
from posttrain.rl.workers import PolicyWorker, SetupRefused

ASSETS = Path(__file__).resolve().parents[1] / "assets"
# The worker runs in this process and sets its torch threads: keep the count the session gave it (under
# pytest-xdist its share of the cores, tests/conftest.py) instead of leaving 2 to every later test here.
THREADS = str(torch.get_num_threads())


def _flat(values: list[list[float]]) -> list[float]:
    return [v for row in values for v in row]


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> Path:
    spec = get_model_spec("qwen3")
    args = resolve_scratch_args(spec, "debug", overrides={"dim": 64, "n_layers": 1, "ffn_dim": 128})
    torch.manual_seed(0)
    model = spec.model_cls(args)
    model.init_weights()
    out = tmp_path_factory.mktemp("tiny_hf")
    save_hf(model, out, tokenizer=HFTokenizer(ASSETS / "tokenizer"))
    return out


def _rows(n: int = 4) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        prompt = torch.randint(10, 1000, (5 + i,), generator=g).tolist()
        tokens = torch.randint(10, 1000, (3 + i % 2,), generator=g).tolist()
        rows.append({"prompt_ids": prompt, "token_ids": tokens, "advantage": 1.0 if i % 2 else -1.0})
    return rows


def test_policy_worker_scores_updates_and_checkpoints(tiny_hf: Path, tmp_path: Path) -> None:
    cfg = parse_config([
        "--job.recipe", "grpo", "--job.output_dir", str(tmp_path), "--model.hf_path", str(tiny_hf),
        "--grpo.prompts", "unused.jsonl", "--grpo.kl_coef", "0.1", "--grpo.minibatches", "2",
        "--grpo.loss_agg", "sequence_mean", "--training.micro_batch_size", "2", "--training.steps", "3",
        "--optimizer.lr", "1e-2", "--metrics.tensorboard", "false", "--grpo.cpu_threads", THREADS,
    ])
    worker = PolicyWorker()
    info = worker.setup(cfg, rank=0, world_size=1, master_addr="127.0.0.1", master_port=0)
    assert info["dp_degree"] == 1
    rows = _rows()
    scored = worker.log_probs(rows, old=True, ref=True, entropy=True)
    for key in ("old_logp", "ref_logp", "entropy"):
        assert [len(v) for v in scored[key]] == [len(r["token_ids"]) for r in rows], key
    assert _flat(scored["old_logp"]) == pytest.approx(_flat(scored["ref_logp"]))  # the policy starts as its reference
    for row, old, ref in zip(rows, scored["old_logp"], scored["ref_logp"]):
        row["old_logp"], row["ref_logp"] = old, ref

    first = worker.train_minibatch(rows[:2])
    assert first["ratio"] / first["tokens"] == pytest.approx(1.0, abs=1e-5)  # on-policy: ratio 1
    assert first["kl"] == pytest.approx(0.0, abs=1e-6)
    second = worker.train_minibatch(rows[2:])
    assert second["kl"] > 0  # the first update moved the policy away from the reference
    after = worker.log_probs(rows, old=True, ref=True, entropy=False)
    assert _flat(after["ref_logp"]) == pytest.approx(_flat(scored["ref_logp"]))  # the reference stays frozen
    assert _flat(after["old_logp"]) != pytest.approx(_flat(scored["old_logp"]))

    worker.save(1, {"step": 1, "prompts": {"epoch": 0, "position": 8}})
    resumed = PolicyWorker()
    resumed.setup(cfg, rank=0, world_size=1, master_addr="127.0.0.1", master_port=0)
    state = resumed.resume()
    assert state == {"step": 1, "controller": {"step": 1, "prompts": {"epoch": 0, "position": 8}}}
    again = resumed.log_probs(rows, old=True, ref=False, entropy=False)
    assert _flat(again["old_logp"]) == pytest.approx(_flat(after["old_logp"]), abs=1e-6)
    resumed.close()  # last opened, first closed: each trainer restores the signal handlers it found
    worker.close()


@pytest.mark.parametrize("share_prompts", [False, True])
def test_packed_policy_worker_scores_and_updates_like_the_padded_one(tiny_hf: Path, tmp_path: Path,
                                                                     share_prompts: bool) -> None:
    """grpo.micro_batch_tokens (and grpo.share_prompts: completions after one copy of their prompt): the same old /
    reference log-probs, entropies and update as padded rows."""
    results = []
    for micro_tokens in ("0", "24"):
        cfg = parse_config([
            "--job.recipe", "grpo", "--job.output_dir", str(tmp_path / micro_tokens), "--model.hf_path", str(tiny_hf),
            "--grpo.prompts", "unused.jsonl", "--grpo.kl_coef", "0.1", "--grpo.micro_batch_tokens", micro_tokens,
            "--grpo.share_prompts", str(share_prompts and micro_tokens != "0").lower(),
            "--training.micro_batch_size", "2", "--training.steps", "2", "--optimizer.lr", "1e-2",
            "--metrics.tensorboard", "false", "--grpo.cpu_threads", THREADS, "--model.attn_backend", "sdpa",
        ])
        worker = PolicyWorker()
        worker.setup(cfg, rank=0, world_size=1, master_addr="127.0.0.1", master_port=0)
        rows = _rows(5)
        if share_prompts:  # groups of completions of one prompt, as GRPO samples them
            for i, r in enumerate(rows):
                r["prompt_ids"] = list(rows[i % 2]["prompt_ids"])
        scored = worker.log_probs(rows, old=True, ref=True, entropy=True)
        for row, old, ref in zip(rows, scored["old_logp"], scored["ref_logp"]):
            row["old_logp"], row["ref_logp"] = old, ref
        update = worker.train_minibatch(rows)
        after = worker.log_probs(rows, old=True, ref=False, entropy=False)
        results.append((scored, update, after))
        worker.close()
    (padded, padded_update, padded_after), (packed, packed_update, packed_after) = results
    for key in ("old_logp", "ref_logp", "entropy"):
        assert [len(v) for v in packed[key]] == [len(v) for v in padded[key]], key
        assert _flat(packed[key]) == pytest.approx(_flat(padded[key]), abs=1e-5), key
    for key in ("loss", "grad_norm", "tokens", "kl"):
        assert packed_update[key] == pytest.approx(padded_update[key], rel=1e-4, abs=1e-6), key
    assert _flat(packed_after["old_logp"]) == pytest.approx(_flat(padded_after["old_logp"]), abs=1e-4)


def test_the_first_minibatch_needs_no_recomputed_old_log_probs(tiny_hf: Path, tmp_path: Path) -> None:
    """The controller scores old log-probs only for rows outside the first minibatch of the first epoch (no
    reference model): that minibatch's update, without them, is the update with them."""
    from posttrain.config.sections import GRPOSection
    from posttrain.rl.controller import rows_needing_old, update_order

    g = GRPOSection(epochs=1, minibatches=2)
    order = update_order(10, g, order_seed=3)
    assert sorted(order[0][0] + order[0][1]) == list(range(10)) and len(order[0][0]) == 5
    def needing(order, recompute_old=True, need_ref=False, differs=False):
        return rows_needing_old(order, recompute_old=recompute_old, need_ref=need_ref, train_forward_differs=differs)

    assert needing(order) == sorted(order[0][1])
    assert needing(order, need_ref=True) == list(range(10))
    assert needing(order, differs=True) == list(range(10))  # LoRA dropout: the update's forward is another one
    assert needing(order, recompute_old=False) == []
    two_epochs = update_order(10, GRPOSection(epochs=2, minibatches=2), order_seed=3)
    assert needing(two_epochs) == list(range(10))  # all seen again after the first update

    updates = []
    for with_old in (True, False):
        cfg = parse_config([
            "--job.recipe", "grpo", "--job.output_dir", str(tmp_path / str(with_old)), "--model.hf_path", str(tiny_hf),
            "--grpo.prompts", "unused.jsonl", "--grpo.minibatches", "2", "--training.micro_batch_size", "2",
            "--training.steps", "2", "--optimizer.lr", "1e-2", "--metrics.tensorboard", "false",
            "--grpo.cpu_threads", THREADS, "--model.attn_backend", "sdpa",
        ])
        worker = PolicyWorker()
        worker.setup(cfg, rank=0, world_size=1, master_addr="127.0.0.1", master_port=0)
        rows = _rows(4)
        if with_old:
            for row, old in zip(rows, worker.log_probs(rows, old=True, ref=False, entropy=False)["old_logp"]):
                row["old_logp"] = old
        updates.append(worker.train_minibatch(rows))
        worker.close()
    for key in ("loss", "grad_norm", "tokens", "ratio"):
        assert updates[1][key] == pytest.approx(updates[0][key], rel=1e-5, abs=1e-7), key


def test_a_sliding_window_model_refuses_shared_prompts_once_built(tmp_path: Path) -> None:
    """The controller reads config.json only where it already exists; the worker checks the model it built."""
    spec = get_model_spec("gemma3")
    args = resolve_scratch_args(spec, "debug", overrides={"dim": 64, "ffn_dim": 128})
    model = spec.model_cls(args)
    model.init_weights()
    save_hf(model, tmp_path / "hf", tokenizer=HFTokenizer(ASSETS / "tokenizer"))
    cfg = parse_config([
        "--job.recipe", "grpo", "--job.output_dir", str(tmp_path / "run"), "--model.hf_path", str(tmp_path / "hf"),
        "--grpo.prompts", "unused.jsonl", "--grpo.micro_batch_tokens", "64", "--grpo.share_prompts", "true",
        "--metrics.tensorboard", "false", "--grpo.cpu_threads", THREADS, "--model.attn_backend", "sdpa",
    ])
    # an exception, not SystemExit: Ray hands it to the controller, which ends the run with its line
    with pytest.raises(SetupRefused, match=r"^grpo.share_prompts does not support sliding-window attention "
                                           r"\(sliding_window = \d+ in the model: .*set grpo.share_prompts = false$"):
        PolicyWorker().setup(cfg, rank=0, world_size=1, master_addr="127.0.0.1", master_port=0)
