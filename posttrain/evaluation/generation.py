"""Generation-based evaluation during training: greedy answers to held-out prompts, scored against their
answers, logged as `eval_accuracy` (with `eval_prompts`, `eval_mean_new_tokens`).

Prompts (`evaluation.generation_path`, jsonl): each row has `messages` (chat turns ending with the user's;
a trailing assistant turn is dropped), `prompt` (a string, one user turn) or `question` (the rows
scripts/make_math_data.py writes to eval.jsonl), and `answer`. A prompt is rendered by the tokenizer's chat
template with the generation prompt appended, exactly as the SFT data trained on it.

Decoding: greedy, `evaluation.max_new_tokens`, stopping at the tokenizer's eos / end-of-turn token. With the
native KV-cache engine (`posttrain.inference.native.NativeEngine`) for posttrain's own models, else (a model
of the HF backend) the reference decoder `posttrain.models.greedy.greedy_generate` (no cache: fine for short
answers). The engine needs full
weights: at world size 1 it runs on the training model itself; with more ranks every rank gathers the full
weights into a plain copy (a collective; memory for one extra unsharded model per rank), generates for its
share of the prompts (SPMD) and the correct counts are summed over ranks.

Scoring: the math-answer rule (`posttrain.inference.math_answer.math_answer_reward`, also the RL reward
"math_answer": the last `\\boxed{}` or the last number, compared as exact fractions), or a given scorer.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from posttrain.evaluation.validation import evaluation_due
from posttrain.inference.engine import SamplingParams
from posttrain.inference.math_answer import math_answer_reward
from posttrain.inference.native import NativeEngine

logger = logging.getLogger("posttrain")



# ------------------------------------------------------------------------------------------------ prompts

def read_generation_prompts(path: str | Path, *, limit: int = 0) -> list[dict[str, Any]]:
    """Rows of `path` as {"messages": [...], "answer": str, ...} (the first `limit`, 0 = all)."""
    rows = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            where = f"{path}:{line_no}"
            if "answer" not in row:
                raise SystemExit(f"{where}: a generation-eval row needs an 'answer' (evaluation.generation_path)")
            if "messages" in row:
                messages = [dict(m) for m in row["messages"]]
                if messages and messages[-1].get("role") == "assistant":
                    messages = messages[:-1]
            elif "prompt" in row or "question" in row:
                messages = [{"role": "user", "content": str(row.get("prompt", row.get("question")))}]
            else:
                raise SystemExit(f"{where}: a generation-eval row needs 'messages', 'prompt' or 'question'")
            if not messages:
                raise SystemExit(f"{where}: no prompt turns left to answer")
            rows.append({**row, "messages": messages, "answer": str(row["answer"])})
            if limit and len(rows) >= limit:
                break
    if not rows:
        raise SystemExit(f"evaluation.generation_path = {path} holds no rows")
    return rows


# ------------------------------------------------------------------------------------------------ decoding

def greedy_completions(model: nn.Module, prompts: Sequence[list[int]], *, max_new_tokens: int,
                       stop: Sequence[int], max_batch_size: int = 64) -> list[list[int]]:
    """Greedy new tokens for each prompt (a stop token included when hit), with the native KV-cache engine
    for posttrain's own models, else the reference decoder."""
    if not prompts:
        return []
    was_training = model.training
    try:
        if hasattr(model, "layers"):
            # no CUDA graphs: capturing them costs seconds per evaluation, and keeping them would keep a KV
            # cache in the training GPU's memory between evaluations
            engine = NativeEngine(model, max_batch_size=max_batch_size, cuda_graphs=False)
            sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop_token_ids=tuple(stop))
            return [c.token_ids for c in engine.generate([list(p) for p in prompts], sampling)]
        from posttrain.models.greedy import greedy_generate

        model.eval()
        return [greedy_generate(model, list(p), max_new_tokens, stop) for p in prompts]
    finally:
        model.train(was_training)


def full_weight_copy(model: nn.Module) -> nn.Module:
    """A plain (unsharded, unparallelized) copy of a sharded native model, on every rank: a collective."""
    from torch.distributed.tensor import DTensor

    from posttrain.models.registry import get_model_spec_for

    spec = get_model_spec_for(model)
    state = {}
    for name, value in model.state_dict().items():
        state[name] = value.full_tensor() if isinstance(value, DTensor) else value
    device = next(iter(state.values())).device
    with torch.device("meta"):
        plain = spec.model_cls(model.args)
    plain.to_empty(device=device)
    plain.load_state_dict(state, strict=True, assign=True)
    if hasattr(plain, "tie_weights"):  # assign=True replaced the parameters: share the head again
        plain.tie_weights()
    plain.init_buffers(device)  # non-persistent buffers (RoPE frequencies) are in no state dict: to_empty left garbage
    return plain.eval()


# ------------------------------------------------------------------------------------------------ the hook

class GenerationEval:
    """A trainer step hook: `eval_accuracy` on the generation prompts every `freq` steps and at the last step."""

    def __init__(self, trainer: Any, path: str, *, freq: int, max_new_tokens: int, max_prompts: int = 0,
                 scorer: Callable[[str, dict[str, Any]], float] | None = None) -> None:
        if trainer.tokenizer is None:
            raise SystemExit("evaluation.generation_path needs a tokenizer (tokenizer.path or model.hf_path)")
        cfg = trainer.cfg
        if cfg.model.head != "lm":
            raise SystemExit(f"evaluation.generation_path needs model.head = 'lm' (it is {cfg.model.head!r})")
        if (trainer.dist.world_size > 1 or cfg.compile.enabled) and (cfg.model.backend != "native" or cfg.lora.rank > 0):
            raise SystemExit(
                "evaluation.generation_path on several ranks (or with compile.enabled) gathers the weights into a "
                "plain native model: it "
                "needs model.backend = 'native' and no LoRA (lora.rank = 0); evaluate the exported model instead"
            )
        self.trainer = trainer
        self.freq = freq
        self.max_new_tokens = max_new_tokens
        self.samples = read_generation_prompts(path, limit=max_prompts)
        tok = trainer.tokenizer
        self.prompts = [tok.tokenize_messages(s["messages"], add_generation_prompt=True)[0] for s in self.samples]
        self.stop = tok.stop_ids()
        self.scorer = scorer or math_answer_reward

    def evaluate(self) -> dict[str, float]:
        t = self.trainer
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        # Compiled blocks (fullgraph, training shapes) would recompile or break on every decode length: use a plain copy.
        plain = world == 1 and not t.cfg.compile.enabled
        model = t.model if plain else full_weight_copy(t.model)
        mine = list(range(rank, len(self.prompts), world))
        t0 = time.perf_counter()
        outputs = greedy_completions(model, [self.prompts[i] for i in mine], max_new_tokens=self.max_new_tokens,
                                     stop=self.stop)
        correct = new_tokens = 0.0
        for i, ids in zip(mine, outputs):
            text = t.tokenizer.decode(ids, skip_special_tokens=True)
            correct += float(self.scorer(text, self.samples[i]) == 1.0)
            new_tokens += len(ids)
        totals = torch.tensor([correct, new_tokens], dtype=torch.float64, device=t.device)
        if not plain:
            del model
        if world > 1:
            dist.all_reduce(totals)
        n = len(self.prompts)
        return {"eval_accuracy": float(totals[0]) / n, "eval_prompts": n,
                "eval_mean_new_tokens": float(totals[1]) / n, "eval_generation_s": time.perf_counter() - t0}

    def __call__(self) -> None:
        t = self.trainer
        if not evaluation_due(t.step, t.cfg.training.steps, self.freq):
            return
        metrics = self.evaluate()
        t.metrics.log(t.step, metrics)
        if t.dist.is_main:
            logger.info("step %d: eval_accuracy %.3f on %d prompts", t.step, metrics["eval_accuracy"], len(self.prompts))


def generation_eval_from_config(trainer: Any) -> GenerationEval | None:
    """The `evaluation.generation_*` hook of a trainer's config, or None when generation_path is empty."""
    e = trainer.cfg.evaluation
    if not e.generation_path:
        return None
    return GenerationEval(trainer, e.generation_path, freq=e.generation_freq, max_new_tokens=e.max_new_tokens,
                          max_prompts=e.max_prompts)
