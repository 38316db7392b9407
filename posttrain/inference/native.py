"""The native generation engine: posttrain's own model, a preallocated KV cache, batched decoding.

``generate`` sorts the prompts by length (less padding), then per chunk of ``max_batch_size`` prompts:

1. prefill: the right-padded prompts in one forward from slot 0 (the training forward, writing the cache);
   the logits of each row's last prompt token pick its first new token;
2. decode: one token per row per step, each at its own position; a row ends at a stop token or at its
   length budget (``min(max_new_tokens, max_seq_len - prompt length)``); finished rows are dropped from the
   batch (and the cache) whenever at most half of the rows are still running.

Sampling is temperature -> top-k -> top-p -> multinomial with a ``torch.Generator`` seeded from
``SamplingParams.seed`` (one generator per ``generate`` call, on the engine's device); temperature 0 is
argmax. The reported log-prob is ``log_softmax(logits / T)`` at the sampled token, before the top-k / top-p
filters (raw ``log_softmax(logits)`` when greedy), in fp32: what the trainer's ``token_log_probs`` computes.

Works on CPU and CUDA. CUDA graphs are NOT used: every decode step runs eagerly (the attended cache length
grows with the step, so shapes change); a captured static-shape decode step is the next speed-up.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from posttrain.inference.engine import Completion, SamplingParams
from posttrain.inference.sampling import sample_next_tokens
from posttrain.models.common.kv_cache import KVCache
from posttrain.models.common.lora import base_param_name, is_adapter_param
from posttrain.models.common.stacked_names import split_row_index
from posttrain.models.hf import load_hf
from posttrain.models.registry import ModelSpec, get_model_spec_for

# checkpoint keys that are derived buffers, not weights
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _last_position_logits(rows: torch.Tensor, cols: torch.Tensor, vocab_size: int):
    """An ``output_fn``: logits [B, V] of one position per row (``cols[b]``), without the [B, S, V] tensor."""

    def output_fn(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden[rows, cols], weight[:vocab_size])

    return output_fn


class NativeEngine:
    """``GenerationEngine`` over a posttrain ``Transformer`` of any family (already on its device and dtype).

    ``max_seq_len`` caps prompt + completion (default: the model's ``args.max_seq_len``). The model is used
    in place: ``update_weights`` writes into its parameters.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        max_batch_size: int = 64,
        max_seq_len: int | None = None,
        spec: ModelSpec | None = None,
    ) -> None:
        model = getattr(model, "_orig_mod", model)
        if not hasattr(model, "args") or not hasattr(model, "layers"):
            raise TypeError(f"NativeEngine needs a native posttrain model, got {type(model).__name__}")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model = model.eval()
        self.spec = spec or get_model_spec_for(model)
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len or model.args.max_seq_len
        self.vocab_size = model.args.vocab_size
        self.device = model.tok_embeddings.weight.device

    @classmethod
    def from_hf(
        cls, path: str | os.PathLike[str], *, device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32, **kw: Any,
    ) -> NativeEngine:
        """Load an HF checkpoint folder (``posttrain.models.load_hf``) and wrap it; ``kw`` go to the engine."""
        return cls(load_hf(path, dtype=dtype, device=device), **kw)

    # ------------------------------------------------------------------------------------------ generate

    @torch.inference_mode()
    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingParams) -> list[Completion]:
        prompts = [list(map(int, p)) for p in prompt_token_ids]
        for i, prompt in enumerate(prompts):
            if not prompt:
                raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
            if len(prompt) >= self.max_seq_len and sampling.max_new_tokens > 0:
                raise ValueError(
                    f"prompt {i} has {len(prompt)} tokens, leaving no room to generate within max_seq_len "
                    f"{self.max_seq_len}; shorten the prompt or raise the engine's max_seq_len"
                )
        generator = None
        if sampling.seed is not None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(sampling.seed)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        results: list[Completion | None] = [None] * len(prompts)
        for start in range(0, len(order), self.max_batch_size):
            chunk = order[start : start + self.max_batch_size]
            for i, completion in zip(chunk, self._generate_batch([prompts[i] for i in chunk], sampling, generator)):
                results[i] = completion
        return results  # type: ignore[return-value]

    def _generate_batch(
        self, prompts: list[list[int]], sampling: SamplingParams, generator: torch.Generator | None
    ) -> list[Completion]:
        completions = [Completion(prompt_ids=p) for p in prompts]
        budgets = [min(sampling.max_new_tokens, self.max_seq_len - len(p)) for p in prompts]
        if max(budgets) <= 0:
            return completions
        stop = set(sampling.stop_token_ids)
        device = self.device
        lengths = [len(p) for p in prompts]
        batch, longest = len(prompts), max(lengths)
        cache_len = max(longest, max(n + b for n, b in zip(lengths, budgets)))
        ids = torch.zeros(batch, longest, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, : len(prompt)] = torch.tensor(prompt)
        cache = KVCache.for_model(self.model, batch=batch, max_len=cache_len)
        rows = torch.arange(batch, device=device)
        last = torch.tensor(lengths, device=device) - 1
        logits = self.model(
            ids.to(device), kv_cache=cache, output_fn=_last_position_logits(rows, last, self.vocab_size)
        )
        running = list(range(batch))  # completion index of each cache row
        positions = list(lengths)  # where each cache row's newest token goes
        done = [False] * batch  # per completion
        while True:
            next_ids, next_logp = sample_next_tokens(logits, sampling, generator)
            id_list, logp_list = next_ids.tolist(), next_logp.tolist()
            alive = []
            for row, i in enumerate(running):
                if done[i]:
                    continue  # finished earlier, still in the batch
                c = completions[i]
                c.token_ids.append(id_list[row])
                c.log_probs.append(logp_list[row])
                if id_list[row] in stop:
                    c.finish_reason, done[i] = "stop", True
                elif len(c.token_ids) >= budgets[i]:
                    c.finish_reason, done[i] = "length", True
                else:
                    alive.append(row)
            if not alive:
                return completions
            if len(alive) <= len(running) // 2:  # drop finished rows; each halving copies the cache once
                keep = torch.tensor(alive, device=device)
                cache.select_rows(keep)
                next_ids = next_ids.index_select(0, keep)
                running = [running[r] for r in alive]
                positions = [positions[r] for r in alive]
                alive = list(range(len(alive)))
            alive_set = set(alive)
            # finished rows still in the batch re-feed at their last position: in bounds, their output unused
            feed_positions = torch.tensor(positions, device=device)[:, None]
            logits = self.model(next_ids[:, None], position_ids=feed_positions, kv_cache=cache)[:, -1]
            positions = [p + 1 if r in alive_set else p for r, p in enumerate(positions)]

    # ------------------------------------------------------------------------------------------ weights

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors into the model (vocabulary padding zero-filled, a tied head skipped, one
        expert row at a time for per-expert checkpoint names). Unknown names raise ``KeyError``."""
        params = {
            base_param_name(n): p
            for n, p in self.model.named_parameters()
            if not is_adapter_param(n)
        }
        tied = bool(getattr(self.model.args, "tie_embeddings", False))
        unknown = []
        for hf_name, tensor in named_tensors:
            if hf_name.endswith(_IGNORED_SUFFIXES):
                continue
            name, row = split_row_index(self.spec.from_hf_name(hf_name) or "")
            if name == "output.weight" and tied:
                continue  # the embedding is the head
            if not name or name not in params or (row is not None and row >= params[name].shape[0]):
                unknown.append(hf_name)
                continue
            target = params[name] if row is None else params[name][row]
            _copy_weight(target, tensor, hf_name)
        if unknown:
            raise KeyError(f"update_weights: names the {self.spec.name} model does not have: {unknown[:20]}")

    def close(self) -> None:
        """Drop the model (and with it the device memory it holds)."""
        self.model = None  # type: ignore[assignment]
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _copy_weight(param: torch.Tensor, tensor: torch.Tensor, hf_name: str) -> None:
    """``param.copy_(tensor)`` (any device / dtype); a vocabulary-padded parameter takes the first rows and
    keeps zeros below (as ``load_hf`` leaves them)."""
    if param.shape == tensor.shape:
        param.copy_(tensor)
        return
    if param.dim() == tensor.dim() and param.shape[1:] == tensor.shape[1:] and param.shape[0] > tensor.shape[0]:
        param[: tensor.shape[0]].copy_(tensor)
        param[tensor.shape[0] :].zero_()
        return
    raise ValueError(f"update_weights: {hf_name} has shape {tuple(tensor.shape)}, the model {tuple(param.shape)}")
