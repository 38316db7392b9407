"""GRPO: the single controller (the Ray driver) and its loop, readable top to bottom.

    python train.py --config train_configs/debug_grpo.toml          (job.recipe = "grpo")

Roles (posttrain/rl/workers.py) are Ray actors: `grpo.trainer_workers` PolicyWorkers forming one
torch.distributed group (the ordinary Trainer: FSDP / TP / LoRA / optimizer / checkpoints; the reference
model lives in them too), `grpo.rollout_workers` RolloutWorkers each holding an engine, and reward functions
run as Ray tasks. `grpo.placement = "colocated"` puts rollout worker i on the devices of policy rank i
(time-shared: the loop never runs both at once); "split" gives each its own. Ray starts a local cluster
unless `grpo.ray_address` names one.

One step:
  prompts -> G completions each (engines) -> rewards (tasks) -> overlong penalty -> drop zero-variance
  groups -> old / reference log-probs (policy group) -> KL-in-reward -> group advantages ->
  epochs x minibatches optimizer steps -> weight sync to the engines (timed) -> metrics -> checkpoint.
A restart with the same output_dir resumes from the latest checkpoint: policy, optimizer, lr schedule, RNG,
prompt stream and step; rollouts of a step are seeded by (job.seed, step), so the resumed run continues as
the uninterrupted one would.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from posttrain.config import JobConfig, config_to_dict
from posttrain.config.sections import GRPOSection
from posttrain.datasets.tokenizer import HFTokenizer
from posttrain.inference.engine import SamplingParams
from posttrain.metrics import MetricsLogger
from posttrain.models.hf import read_hf_config
from posttrain.rl.batches import chunk, split_evenly
from posttrain.rl.reward_tasks import score_rewards
from posttrain.rl.packed_batches import sliding_window_refusal
from posttrain.rl.workers import PolicyWorker, RolloutWorker, SetupRefused

logger = logging.getLogger("posttrain")

_ACCURACY_REWARDS = ("math_answer", "reasoning_gym")


# ------------------------------------------------------------------------------------------ setup


def check_grpo_config(cfg: JobConfig) -> GRPOSection:
    g = cfg.grpo

    def require(ok: bool, key: str, why: str) -> None:
        if not ok:
            raise SystemExit(f"grpo.{key} {why}")

    require(bool(g.prompts), "prompts", "is empty: name a jsonl file / glob or reasoning_gym:<task>")
    if not cfg.model.hf_path:
        raise SystemExit("GRPO starts from a checkpoint: set model.hf_path (e.g. an SFT run's <output_dir>/hf)")
    require(g.group_size >= 2, "group_size", f"must be >= 2 (group-relative advantages), got {g.group_size}")
    require(g.prompts_per_step >= 1, "prompts_per_step", "must be >= 1")
    require(g.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
    require(g.temperature >= 0, "temperature", "must be >= 0")
    require(0 < g.top_p <= 1, "top_p", "must be in (0, 1]")
    require(g.micro_batch_tokens == 0 or g.micro_batch_tokens >= g.max_new_tokens + 1, "micro_batch_tokens",
            f"({g.micro_batch_tokens}) must be 0 (padded rows) or hold a prompt token and grpo.max_new_tokens "
            f"({g.max_new_tokens}): at least {g.max_new_tokens + 1}")
    require(not g.share_prompts or g.micro_batch_tokens > 0, "share_prompts",
            "needs packed rows: set grpo.micro_batch_tokens > 0")
    if g.share_prompts and (Path(cfg.model.hf_path).expanduser() / "config.json").is_file():
        # (a Hub id, or a folder an earlier job writes, is checked by the policy workers once the model is built)
        hf = read_hf_config(Path(cfg.model.hf_path).expanduser())
        hf = hf.get("text_config", hf)
        window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
        if window:
            raise SystemExit(sliding_window_refusal(window, f"{cfg.model.hf_path}/config.json"))
    require(g.epochs >= 1 and g.minibatches >= 1, "epochs", "and grpo.minibatches must be >= 1")
    require(bool(g.rewards), "rewards", "is empty")
    require(not g.reward_weights or len(g.reward_weights) == len(g.rewards), "reward_weights",
            f"has {len(g.reward_weights)} entries for {len(g.rewards)} rewards")
    require(g.clip_low >= 0 and g.clip_high >= 0, "clip_low", "and grpo.clip_high must be >= 0")
    require(g.kl_coef >= 0, "kl_coef", "must be >= 0")
    require(g.tis_cap > 0, "tis_cap", "must be > 0")
    require(g.old_logprobs == "recompute" or g.epochs * g.minibatches == 1, "old_logprobs",
            "= 'engine' (TIS against the engine's log-probs) needs grpo.epochs = grpo.minibatches = 1; "
            "use 'recompute' for several updates per step")
    require(g.rollout_workers >= 1 and g.trainer_workers >= 1, "rollout_workers", "and grpo.trainer_workers must be >= 1")
    require(g.weight_sync_bucket_mb >= 1, "weight_sync_bucket_mb", "must be >= 1")
    require(g.engine_max_batch_size >= 1, "engine_max_batch_size", "must be >= 1")
    require(not g.engine_compile or g.engine == "native", "engine_compile", "applies to the native engine only "
            "(vLLM compiles its own); set grpo.engine_compile = false")
    require(0 < g.gpu_memory_utilization <= 1, "gpu_memory_utilization",
            f"must be in (0, 1], got {g.gpu_memory_utilization}")
    require(g.weight_sync != "cuda_ipc" or g.placement == "colocated", "weight_sync",
            "= 'cuda_ipc' needs grpo.placement = 'colocated' (engines on the policy's GPU)")
    require(g.weight_sync_timeout_s > 0, "weight_sync_timeout_s", "must be > 0")
    # with training.device = "auto" the same rule waits for the Ray cluster's resources (place_actors)
    require(not (g.weight_sync == "collective" and g.placement == "colocated" and cfg.training.device == "cuda"),
            "weight_sync", "= 'collective' on GPUs needs grpo.placement = 'split' (NCCL refuses two ranks on one "
            "GPU); colocated engines take 'cuda_ipc'")
    if cfg.model.backend == "hf":
        raise SystemExit("GRPO weight sync needs model.backend = 'native' (the engines take HF-named tensors "
                         "gathered from posttrain's own model); model.backend = 'hf' is not supported")
    if g.engine == "vllm" and cfg.lora.rank > 0:
        logger.info("LoRA with the vLLM engine: adapters are merged into the synced weights")
    return g


def _absolute(path: str) -> str:
    """Actors may start in another working directory: local paths travel as absolute ones."""
    return str(Path(path).resolve()) if path and Path(path).exists() else path


def resolved_config(cfg: JobConfig) -> JobConfig:
    g = cfg.grpo
    prompts = g.prompts if g.prompts.startswith("reasoning_gym:") else _absolute(g.prompts)
    eval_prompts = g.eval_prompts if g.eval_prompts.startswith("reasoning_gym:") else _absolute(g.eval_prompts)
    return replace(
        cfg,
        job=replace(cfg.job, output_dir=str(Path(cfg.job.output_dir).resolve())),
        model=replace(cfg.model, hf_path=_absolute(cfg.model.hf_path)),
        tokenizer=replace(cfg.tokenizer, path=_absolute(cfg.tokenizer.path), add_tokens_file=_absolute(cfg.tokenizer.add_tokens_file)),
        grpo=replace(g, prompts=prompts, eval_prompts=eval_prompts),
    )


def _drop_token_auth_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


def quiet_ray_token_auth_notice() -> None:
    """Ray >= 2.60 turns token authentication on for a new local cluster and says so on the console at every
    start; it stays on, the notice stays off the user's console. (Setting RAY_AUTH_MODE instead, after `import
    ray`, desyncs Ray's cached config from its subprocesses: the cluster then refuses its own driver.)"""
    logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(_drop_token_auth_notice)


def start_ray(g: GRPOSection, *, bundles: int) -> None:
    import ray

    quiet_ray_token_auth_notice()
    if g.ray_address:
        ray.init(address=g.ray_address, log_to_driver=True)
        return
    cpus = g.ray_num_cpus or os.cpu_count() or 1
    ray.init(address="local", num_cpus=max(cpus, bundles), include_dashboard=False, log_to_driver=True)


def place_actors(cfg: JobConfig, g: GRPOSection):
    """Policy and rollout actors on placement-group bundles: colocated shares bundle i between policy rank i
    and rollout worker i (half of its GPU / CPU each); split gives every actor a bundle of its own."""
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    # training.device: "cuda" / "cpu" as said; "auto" uses GPUs when the cluster has any (the driver may have none)
    gpu = cfg.training.device == "cuda" or (cfg.training.device == "auto" and ray.cluster_resources().get("GPU", 0) > 0)
    colocated = g.placement == "colocated"
    if g.weight_sync == "cuda_ipc" and not gpu:
        raise SystemExit("grpo.weight_sync = 'cuda_ipc' needs GPUs (training.device = 'cuda'); use 'object_store'")
    if g.weight_sync == "collective" and gpu and colocated:
        raise SystemExit("grpo.weight_sync = 'collective' on GPUs needs grpo.placement = 'split' (NCCL refuses two "
                         "ranks on one GPU); colocated engines take 'cuda_ipc'")
    n_bundles = max(g.trainer_workers, g.rollout_workers) if colocated else g.trainer_workers + g.rollout_workers
    bundle = {"CPU": 1, "GPU": 1} if gpu else {"CPU": 1}
    pg = placement_group([dict(bundle) for _ in range(n_bundles)], strategy="PACK")
    ray.get(pg.ready())
    share = 0.5 if colocated else 1.0

    def on(index: int) -> dict[str, Any]:
        return {
            "num_cpus": share,
            "num_gpus": share if gpu else 0,
            "scheduling_strategy": PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=index),
        }

    policy = [ray.remote(PolicyWorker).options(**on(i)).remote() for i in range(g.trainer_workers)]
    engine_dtype = g.engine_dtype if g.engine_dtype != "auto" else ("bfloat16" if gpu else "float32")
    engine_kw: dict[str, Any] = {"gpu_memory_utilization": g.gpu_memory_utilization}
    engine_kw.update({"max_batch_size": g.engine_max_batch_size, "compile_decode": g.engine_compile}
                     if g.engine == "native" else {"seed": cfg.job.seed})
    rollouts = [
        ray.remote(RolloutWorker).options(**on(j if colocated else g.trainer_workers + j)).remote(
            g.engine, cfg.model.hf_path, device="cuda" if gpu else "cpu", dtype=engine_dtype,
            threads=g.cpu_threads, **engine_kw,
        )
        for j in range(g.rollout_workers)
    ]
    return pg, policy, rollouts


# ------------------------------------------------------------------------------------------ loop pieces


def generate(rollouts: list, prompt_ids: list[list[int]], sampling) -> tuple[list[Any], float]:
    """Completions of `prompt_ids` (in order), the prompts split over the engines; and the seconds it took."""
    import ray

    t0 = time.perf_counter()
    pieces = chunk(prompt_ids, -(-len(prompt_ids) // len(rollouts)))
    refs = [
        worker.generate.remote(piece, replace(sampling, seed=None if sampling.seed is None else sampling.seed + j))
        for j, (worker, piece) in enumerate(zip(rollouts, pieces))
    ]
    completions = [c for part in ray.get(refs) for c in part]
    return completions, time.perf_counter() - t0


_score_task = None  # score_rewards as a Ray task, made once per process


def score(reward_names: list[str], weights: list[float], texts: list[str], samples: list[dict], *,
          tasks: int = 2) -> tuple[torch.Tensor, dict[str, float], float, torch.Tensor | None]:
    """Weighted rewards [N] from Ray tasks over chunks of the completions, per-reward means, seconds, and
    which completions the first accuracy reward (math_answer / reasoning_gym) scores 1 ([N] bool; None
    without such a reward)."""
    import ray

    global _score_task
    t0 = time.perf_counter()
    if _score_task is None:
        _score_task = ray.remote(num_cpus=0)(score_rewards)
    remote = _score_task
    size = -(-len(texts) // tasks)
    refs = [remote.remote(reward_names, texts[i : i + size], samples[i : i + size]) for i in range(0, len(texts), size)]
    per_fn: list[list[float]] = [[] for _ in reward_names]
    errors = 0
    for part, n_errors in ray.get(refs):
        for k, scores in enumerate(part):
            per_fn[k].extend(scores)
        errors += n_errors
    table = torch.tensor(per_fn, dtype=torch.float32)  # [n_fns, N]
    rewards = (torch.tensor(weights, dtype=torch.float32)[:, None] * table).sum(0)
    stats = {f"reward/{name}": float(table[k].mean()) for k, name in enumerate(reward_names)}
    stats["reward_errors"] = float(errors)
    correct = None
    for k, name in enumerate(reward_names):
        if name in _ACCURACY_REWARDS:
            correct = table[k] >= 1.0 - 1e-6
            stats["accuracy"] = float(correct.float().mean())
            break
    return rewards, stats, time.perf_counter() - t0, correct


def accuracy_by_task(correct: torch.Tensor, samples: list[dict], prefix: str) -> dict[str, float]:
    """`<prefix>/<task>`: the share of correct completions of each task named by the samples' "task" (none
    when fewer than two tasks are named: the overall accuracy says it all)."""
    by_task: dict[str, list[bool]] = {}
    for ok, sample in zip(correct.tolist(), samples):
        if sample.get("task"):
            by_task.setdefault(str(sample["task"]), []).append(ok)
    if len(by_task) < 2:
        return {}
    return {f"{prefix}/{task}": sum(oks) / len(oks) for task, oks in sorted(by_task.items())}


def out_of_time(elapsed_s: float, step_seconds: list[float], budget_s: float) -> bool:
    """True when another step would likely end past `budget_s` (0 = no budget): the estimate of a step is the
    slowest of the last three (the first steps of a run are slower: warm-up, graph capture)."""
    if budget_s <= 0 or not step_seconds:
        return False
    return elapsed_s + max(step_seconds[-3:]) > budget_s


def policy_log_probs(policy: list, dp: tuple[list[int], int], rows: list[dict], *, old: bool, ref: bool,
                     entropy: bool) -> dict[str, list]:
    """Per-token log-probs of every row, each data-parallel rank scoring its share (ranks of one TP group
    get the same rows); the results come back in row order."""
    import ray

    dp_ranks, dp_degree = dp
    shares = split_evenly(rows, dp_degree)
    results = ray.get([w.log_probs.remote(shares[r], old=old, ref=ref, entropy=entropy) for w, r in zip(policy, dp_ranks)])
    by_dp = {r: res for r, res in zip(dp_ranks, results)}
    out: dict[str, list] = {}
    for key in ("old_logp", "ref_logp", "entropy"):
        if not by_dp[0][key]:
            continue
        values = [None] * len(rows)
        for r in range(dp_degree):
            for j, v in enumerate(by_dp[r][key]):
                i = r + j * dp_degree
                if i < len(rows):
                    values[i] = v
        out[key] = values
    return out


def train_minibatch(policy: list, dp: tuple[list[int], int], rows: list[dict]) -> dict[str, float]:
    import ray

    dp_ranks, dp_degree = dp
    shares = split_evenly(rows, dp_degree)
    return ray.get([w.train_minibatch.remote(shares[r]) for w, r in zip(policy, dp_ranks)])[0]


def open_weight_group(policy: list, rollouts: list, timeout_s: float) -> None:
    """The weight-update group of grpo.weight_sync = "collective": policy rank 0 (rank 0, serving the
    rendezvous) and every engine (ranks 1..n), joined all at once (each join waits for the others)."""
    import ray

    world_size = 1 + len(rollouts)
    host, port = ray.get(policy[0].host_weight_group.remote(world_size, timeout_s))
    ray.get([policy[0].join_weight_group.remote(world_size, timeout_s)] + [
        r.join_weight_group.remote(host, port, 1 + j, world_size, timeout_s) for j, r in enumerate(rollouts)
    ], timeout=timeout_s)  # NCCL's communicator setup may block outside the group's timeout


def sync_weights(policy: list, rollouts: list, bucket_bytes: int, transport: str = "object_store") -> tuple[float, int]:
    """Policy -> engines, bucket by bucket (grpo.weight_sync): through the Ray object store; as CUDA IPC handles
    of tensors left in the policy's device memory ("cuda_ipc"); or broadcast over the weight-update group
    ("collective": the bucket's layout travels through Ray, its bytes through the group). (seconds, tensors sent)."""
    import ray

    t0 = time.perf_counter()
    produce = {"object_store": "weight_buckets", "cuda_ipc": "shared_weight_buckets",
               "collective": "broadcast_weight_buckets"}[transport]
    streams = [getattr(w, produce).options(num_returns="streaming").remote(bucket_bytes) for w in policy]
    pending, copied = [], []
    for bucket in streams[0]:  # rank 0 yields; the other ranks take part in the gathers and yield nothing
        if transport == "cuda_ipc":  # copied before the next bucket opens: one bucket of extra memory per engine
            copied += ray.get([r.update_shared_weights.remote(bucket) for r in rollouts])
        elif transport == "collective":  # rank 0 broadcasts the bucket once every engine has joined the receive
            copied += ray.get([r.receive_weights.remote(bucket) for r in rollouts])
        else:
            pending += [r.update_weights.remote(bucket) for r in rollouts]
    for stream in streams[1:]:
        for ref in stream:
            ray.get(ref)
    sent = copied + ray.get(pending)
    return time.perf_counter() - t0, sum(sent[:: max(len(rollouts), 1)])


def evaluate(rollouts: list, tokenizer: HFTokenizer, eval_set: list[dict], prompt_ids: list[list[int]], g: GRPOSection,
             stops: tuple[int, ...]) -> dict[str, float]:
    """Greedy completions of the held-out prompts, scored by the rewards: eval_reward_mean, eval_accuracy."""
    t0 = time.perf_counter()
    greedy = SamplingParams(max_new_tokens=g.max_new_tokens, temperature=0.0, stop_token_ids=stops)
    completions, _ = generate(rollouts, prompt_ids, greedy)
    texts = [tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in completions]
    rewards, stats, _, correct = score(g.rewards, g.reward_weights or [1.0] * len(g.rewards), texts, eval_set)
    out = {"eval_reward_mean": float(rewards.mean()),
           "eval_response_len_mean": sum(len(c.token_ids) for c in completions) / max(len(completions), 1)}
    if correct is not None:
        out["eval_accuracy"] = stats["accuracy"]
        out.update(accuracy_by_task(correct, eval_set, "eval_accuracy"))
    out["time/eval"] = time.perf_counter() - t0
    return out


# grpo_loss's per-token sums (divided by its "tokens" sum here) and the names they are logged under
_LOSS_STATS = {"pg_loss": "pg_loss", "ratio": "ratio_mean", "clip_low": "clip_frac_low", "clip_high": "clip_frac_high",
               "kl": "kl", "tis_weight": "tis_weight", "tis_truncated": "tis_truncated_frac", "entropy": "entropy"}


def token_means(update_metrics: list[dict[str, float]]) -> dict[str, float]:
    """Per-token means of the loss statistics, averaged over the step's optimizer steps."""
    out: dict[str, float] = {}
    for key, name in _LOSS_STATS.items():
        values = [u[key] / u["tokens"] for u in update_metrics if key in u and u.get("tokens")]
        if values:
            out[name] = sum(values) / len(values)
    if "clip_frac_low" in out:
        out["clip_frac"] = out["clip_frac_low"] + out.get("clip_frac_high", 0.0)
    return out


class SampleLog:
    """A few completions per step: `<output_dir>/samples.jsonl` and TensorBoard text."""

    def __init__(self, output_dir: Path, metrics: MetricsLogger) -> None:
        self.path = output_dir / "samples.jsonl"
        self.metrics = metrics

    def truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if _step_of(line) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, step: int, rows: list[dict[str, Any]]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.writelines(json.dumps({"step": step, **row}) + "\n" for row in rows)
        text = "\n\n".join(
            f"**reward {r['reward']:.3f}** ({r['finish_reason']})  \nprompt: `{r['prompt']}`  \n"
            f"completion: `{r['completion']}`" for r in rows
        )
        self.metrics.log_text("samples", text, step)


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return 1 << 62


# ------------------------------------------------------------------------------------------ the phases of a step


@dataclass
class StepRollouts:
    """One step's completions and what the phases learn about them, in the order they learn it."""

    samples: list[dict]  # the prompt row of each completion (group_size per prompt)
    completions: list[Any]
    texts: list[str]
    lengths: torch.Tensor  # generated tokens per completion
    timings: dict[str, float]
    task_rewards: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # the weighted reward functions
    rewards: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # plus the overlong penalty
    reward_stats: dict[str, float] = field(default_factory=dict)
    keep_group: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))
    kept: list[int] = field(default_factory=list)  # completions in groups that carry a signal
    rows: list[dict[str, Any]] = field(default_factory=list)  # the kept completions, as the policy trains on them
    kl_values: list[torch.Tensor] = field(default_factory=list)  # per-token k3(old policy, reference) of each row


def rollout_phase(rollouts: list, tokenizer: HFTokenizer, batch: list[dict], prompt_ids: list[list[int]], sampling,
                  group_size: int) -> StepRollouts:
    """1. group_size completions of every prompt, from the engines."""
    group_prompts = [ids for ids in prompt_ids for _ in range(group_size)]
    completions, t_generate = generate(rollouts, group_prompts, sampling)
    return StepRollouts(
        samples=[s for s in batch for _ in range(group_size)],
        completions=completions,
        texts=[tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in completions],
        lengths=torch.tensor([len(c.token_ids) for c in completions], dtype=torch.float32),
        timings={"generate": t_generate},
    )


def score_phase(step: StepRollouts, g: GRPOSection, weights: list[float]) -> None:
    """2. rewards (Ray tasks) and the overlong penalty; groups with no reward variance carry no signal and are
    dropped (or kept) by config; the kept completions become the rows the policy trains on."""
    from posttrain.rl.algorithms import overlong_penalty, zero_variance_groups

    rewards, step.reward_stats, step.timings["reward"], _ = score(g.rewards, weights, step.texts, step.samples)
    step.task_rewards = rewards.clone()
    if g.overlong_buffer > 0:
        rewards = rewards + overlong_penalty(step.lengths, g.max_new_tokens, g.overlong_buffer, g.overlong_penalty)
    step.rewards = rewards
    flat = zero_variance_groups(rewards, g.group_size)
    step.keep_group = ~flat if g.filter_zero_variance else torch.ones_like(flat)
    step.kept = [i for i in range(len(step.completions)) if step.keep_group[i // g.group_size]]
    step.rows = [
        {"prompt_ids": step.completions[i].prompt_ids, "token_ids": step.completions[i].token_ids,
         "engine_logp": step.completions[i].log_probs, "advantage": 0.0}
        for i in step.kept
    ]


def update_order(n_rows: int, g: GRPOSection, order_seed: int) -> list[list[list[int]]]:
    """Per epoch, its minibatches as indices into the step's rows (shuffled by `order_seed`)."""
    order = torch.Generator().manual_seed(order_seed)
    return [chunk(torch.randperm(n_rows, generator=order).tolist(), -(-n_rows // g.minibatches))
            for _ in range(g.epochs)]


def rows_needing_old(minibatches: list[list[list[int]]], *, recompute_old: bool, need_ref: bool,
                     train_forward_differs: bool) -> list[int]:
    """Rows whose old log-probs the policy group recomputes before the update: none with one update a step; with
    several, every row but those of the first minibatch of the first epoch, whose update still runs on the policy
    that sampled them (its forward's detached log-probs are those numbers, as with one update). Every row with a
    reference model (the KL to it is measured from the same old log-probs on every row) and when the training
    forward differs from the scoring one (LoRA dropout: the first minibatch would see a ratio of exactly 1 where
    the others see the dropout's)."""
    if not recompute_old:
        return []
    if need_ref or train_forward_differs:
        return sorted({i for epoch in minibatches for mb in epoch for i in mb})
    return sorted({i for e, epoch in enumerate(minibatches) for m, mb in enumerate(epoch) if (e, m) != (0, 0)
                   for i in mb})


def advantage_phase(step: StepRollouts, policy: list, dp: tuple[list[int], int], g: GRPOSection, *,
                    old_rows: list[int], need_ref: bool) -> None:
    """3. old log-probs (of `old_rows`) / reference log-probs from the policy group, the KL to the reference, then
    group advantages over the kept groups (the KL as a reward penalty when kl_mode = "reward")."""
    from posttrain.rl.algorithms import group_advantages, kl_k3

    rows = step.rows
    t0 = time.perf_counter()
    scored_rows = rows if need_ref else [rows[i] for i in old_rows]  # with a reference, old_rows is every row
    scored = {}
    if scored_rows:
        scored = policy_log_probs(policy, dp, scored_rows, old=bool(old_rows), ref=need_ref, entropy=False)
    for key, values in scored.items():
        if key != "entropy":
            for row, v in zip(scored_rows, values):
                row[key] = v
    step.timings["logprobs"] = time.perf_counter() - t0
    if need_ref and rows:
        for row in rows:
            base = torch.tensor(row.get("old_logp") or row["engine_logp"])
            step.kl_values.append(kl_k3(base, torch.tensor(row["ref_logp"])))

    kept_rewards = step.rewards[step.kept] if step.kept else torch.zeros(0)
    if need_ref and g.kl_mode == "reward" and rows:
        kept_rewards = kept_rewards - g.kl_coef * torch.stack([k.sum() for k in step.kl_values])
    advantages = group_advantages(kept_rewards, g.group_size, scale=g.advantage) if rows else kept_rewards
    for row, a in zip(rows, advantages.tolist()):
        row["advantage"] = a


def update_phase(step: StepRollouts, policy: list, dp: tuple[list[int], int],
                 minibatches: list[list[list[int]]]) -> tuple[list[dict[str, float]], int]:
    """4. the policy update: one optimizer step per minibatch (`update_order`: epochs x minibatches of row
    indices). Returns each optimizer step's metrics and the tokens trained on."""
    t0 = time.perf_counter()
    update_metrics: list[dict[str, float]] = []
    train_tokens = 0
    rows = step.rows
    if rows:
        for epoch in minibatches:
            for indices in epoch:
                minibatch = [rows[i] for i in indices]
                update_metrics.append(train_minibatch(policy, dp, minibatch))
                train_tokens += sum(len(r["prompt_ids"]) + len(r["token_ids"]) - 1 for r in minibatch)
    step.timings["update"] = time.perf_counter() - t0
    # policy rank 0's own time in those calls, and its packing share (the rest of "update" is Ray's round trips)
    step.timings["update_worker"] = sum(u.get("worker_s", 0.0) for u in update_metrics)
    step.timings["update_pack"] = sum(u.get("pack_s", 0.0) for u in update_metrics)
    return update_metrics, train_tokens


def step_metrics(step: StepRollouts, update_metrics: list[dict[str, float]], train_tokens: int,
                 t_total: float) -> dict[str, Any]:
    """6. what a step logs: rewards, lengths, kept groups, throughput, phase times and the update's losses."""
    t = step.timings
    lengths, completions = step.lengths, step.completions
    generated = float(lengths.sum())
    m: dict[str, Any] = {
        "reward_mean": float(step.task_rewards.mean()),
        "reward_std": float(step.task_rewards.std()) if len(step.task_rewards) > 1 else 0.0,
        **step.reward_stats,
        "response_len_mean": float(lengths.mean()),
        "response_len_max": float(lengths.max()),
        "response_clipped_frac": sum(c.finish_reason == "length" for c in completions) / len(completions),
        "groups_kept_frac": float(step.keep_group.float().mean()),
        "rollout_tokens_per_s": generated / max(t["generate"], 1e-9),
        "train_tokens_per_s": train_tokens / max(t["update"], 1e-9) if train_tokens else None,
        "tokens_per_s": train_tokens / max(t["update"], 1e-9) if train_tokens else None,
        "time/generate": t["generate"], "time/reward": t["reward"], "time/logprobs": t["logprobs"],
        "time/update": t["update"], "time/update_worker": t.get("update_worker"), "time/update_pack": t.get("update_pack"),
        "time/sync": t["sync"], "time/step": t_total,
    }
    if step.kl_values:
        m["kl_rollout"] = float(torch.cat(step.kl_values).mean())  # k3(old policy, reference) per token
    if update_metrics:
        last = update_metrics[-1]
        m["lr"], m["grad_norm"] = last.get("lr"), last.get("grad_norm")
        m["loss"] = sum(u["loss"] for u in update_metrics) / len(update_metrics)
        m.update(token_means(update_metrics))
    return m


def log_step(step_number: int, m: dict[str, Any]) -> None:
    t = {k.removeprefix("time/"): v for k, v in m.items() if k.startswith("time/")}
    logger.info(
        "step %d: reward %.3f (std %.3f) accuracy %s | length %.1f | generate %.1fs reward %.1fs logprobs %.1fs "
        "update %.1fs sync %.2fs", step_number, m["reward_mean"], m["reward_std"],
        f"{m['accuracy']:.3f}" if "accuracy" in m else "-", m["response_len_mean"], t["generate"], t["reward"],
        t["logprobs"], t["update"], t["sync"],
    )


def sample_rows(step: StepRollouts, tokenizer: HFTokenizer, n: int) -> list[dict[str, Any]]:
    """`n` completions spread over the step, for samples.jsonl."""
    completions = step.completions
    shown = list(range(0, len(completions), max(1, len(completions) // n)))[:n]
    return [
        {"prompt": tokenizer.decode(completions[i].prompt_ids), "completion": step.texts[i],
         "reward": float(step.rewards[i]), "answer": str(step.samples[i].get("answer", "")),
         "finish_reason": completions[i].finish_reason}
        for i in shown
    ]


# ------------------------------------------------------------------------------------------ the loop


def run(cfg: JobConfig) -> None:
    import ray

    from posttrain.rl.prompts import PromptSource

    t_run = time.perf_counter()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    check_grpo_config(cfg)
    cfg = resolved_config(cfg)
    g = cfg.grpo
    output_dir = Path(cfg.job.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = HFTokenizer(cfg.tokenizer.path or cfg.model.hf_path, pad_token=cfg.tokenizer.pad_token or None)
    stops = tokenizer.stop_ids(cfg.model.hf_path)  # eos, end-of-turn tokens, generation_config's eos ids
    weights = list(g.reward_weights) or [1.0] * len(g.rewards)
    framing = {"system_prompt": g.system_prompt or None, "instruction": g.instruction or None}
    prompts = PromptSource(g.prompts, seed=cfg.job.seed, **framing)
    eval_set = []
    if g.eval_prompts and g.eval_freq:  # a different seed: reasoning-gym items never overlap the training ones
        source = PromptSource(g.eval_prompts, seed=cfg.job.seed + 1, shuffle=False, field="grpo.eval_prompts", **framing)
        eval_set = source.next_batch(min(g.eval_size, len(source)))

    def encode(sample: dict[str, Any]) -> list[int]:
        ids, _ = tokenizer.tokenize_messages(sample["messages"], add_generation_prompt=True)
        return ids

    eval_ids = [encode(s) for s in eval_set]
    total = cfg.training.steps
    metrics = MetricsLogger(cfg.metrics, output_dir, rank=0, total_steps=total)
    samples_log = SampleLog(output_dir, metrics)
    colocated = g.placement == "colocated"
    start_ray(g, bundles=max(g.trainer_workers, g.rollout_workers) if colocated else g.trainer_workers + g.rollout_workers)
    # SIGTERM (scancel, pod deletion) ends the run through the `finally` below, so a local Ray cluster goes too
    # (installed after ray.init, whose own handler aborts the process)
    previous_sigterm = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        # ---- actors: the policy group (rendezvous at rank 0's node), the engines
        _placement_group, policy, rollouts = place_actors(cfg, g)
        master_addr, master_port = ray.get(policy[0].address.remote())
        try:
            infos = ray.get([
                w.setup.remote(cfg, rank=r, world_size=g.trainer_workers, master_addr=master_addr, master_port=master_port)
                for r, w in enumerate(policy)
            ])
        except SetupRefused as err:  # Ray's error is also an instance of the actor's exception; its cause has the line
            raise SystemExit(str(getattr(err, "cause", err))) from None
        dp = ([i["dp_rank"] for i in infos], infos[0]["dp_degree"])
        # the policy's trainer wrote its own view (steps counted in optimizer steps); the run's config is this one
        (output_dir / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2))

        # ---- resume (policy, optimizer, lr, RNG via the trainer's CheckpointManager; prompt stream and step here)
        step = 0
        resumed = ray.get([w.resume.remote() for w in policy])[0]
        if resumed is not None:
            step = resumed["step"]
            prompts.load_state_dict(resumed["controller"]["prompts"])
            metrics.truncate_after(step)
            samples_log.truncate_after(step)
            logger.info("resumed GRPO from step %d", step)
        bucket_bytes = g.weight_sync_bucket_mb * 2**20
        # The engines start from model.hf_path; after a resume (or with vocabulary growth, LoRA, ...) the policy
        # differs: one sync brings them level.
        if g.weight_sync == "collective":
            open_weight_group(policy, rollouts, g.weight_sync_timeout_s)
        t_sync, n_tensors = sync_weights(policy, rollouts, bucket_bytes, g.weight_sync)
        logger.info("weight sync: %d tensors in %.2fs", n_tensors, t_sync)
        if g.eval_freq and eval_set and step == 0:
            m0 = evaluate(rollouts, tokenizer, eval_set, eval_ids, g, stops)
            metrics.log(0, {**m0, "time/setup": time.perf_counter() - t_run, "time/sync_first": t_sync})
            logger.info("step 0: eval_accuracy %s (%.1fs)", m0.get("eval_accuracy", "-"), m0["time/eval"])

        need_ref = g.kl_coef > 0
        recompute_old = g.old_logprobs == "recompute" and (g.epochs > 1 or g.minibatches > 1)
        step_seconds: list[float] = []
        last = step >= total
        while not last:
            step += 1
            t_step = time.perf_counter()
            batch = prompts.next_batch(g.prompts_per_step)
            sampling = SamplingParams(
                max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p, top_k=g.top_k,
                stop_token_ids=stops, seed=(cfg.job.seed * 1_000_003 + step * 7_919) % (2**31),
            )
            rollout = rollout_phase(rollouts, tokenizer, batch, [encode(s) for s in batch], sampling, g.group_size)
            score_phase(rollout, g, weights)
            minibatches = update_order(len(rollout.rows), g, order_seed=cfg.job.seed * 31 + step)
            old_rows = rows_needing_old(minibatches, recompute_old=recompute_old, need_ref=need_ref,
                                        train_forward_differs=cfg.lora.rank > 0 and cfg.lora.dropout > 0)
            advantage_phase(rollout, policy, dp, g, old_rows=old_rows, need_ref=need_ref)
            update_metrics, train_tokens = update_phase(rollout, policy, dp, minibatches)
            if not rollout.rows:
                logger.warning("step %d: every group had the same reward for all completions; no update", step)
            # 5. weight sync to the engines (timed)
            rollout.timings["sync"] = (
                sync_weights(policy, rollouts, bucket_bytes, g.weight_sync)[0] if rollout.rows else 0.0
            )
            # 6. log (and evaluate every eval_freq steps and at the last step: training.steps or the time budget)
            m = step_metrics(rollout, update_metrics, train_tokens, time.perf_counter() - t_step)
            step_seconds.append(m["time/step"])
            last = step >= total or out_of_time(time.perf_counter() - t_run, step_seconds, g.time_budget_s)
            if last and step < total:
                logger.info("grpo.time_budget_s (%.0fs) reached: step %d is the last of this run", g.time_budget_s, step)
            if g.eval_freq and eval_set and (step % g.eval_freq == 0 or last):
                m.update(evaluate(rollouts, tokenizer, eval_set, eval_ids, g, stops))
            metrics.log(step, m)
            log_step(step, m)
            if g.log_samples:
                samples_log.write(step, sample_rows(rollout, tokenizer, g.log_samples))

            # checkpoint (policy, optimizer, lr, RNG, prompt stream, step)
            if (cfg.checkpoint.interval > 0 and step % cfg.checkpoint.interval == 0) or (
                cfg.checkpoint.save_final and last
            ):
                state = {"step": step, "prompts": prompts.state_dict()}
                ray.get([w.save.remote(step, state) for w in policy])

        ray.get([w.export_hf.remote() for w in policy])
        ray.get([w.close.remote() for w in policy] + [r.close.remote() for r in rollouts])
    finally:
        metrics.close()
        ray.shutdown()
        signal.signal(signal.SIGTERM, previous_sigterm)


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)
