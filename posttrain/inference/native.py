"""The native generation engine: posttrain's own model, a static slot KV cache, continuous batching.

``generate`` keeps up to ``max_batch_size`` sequences in flight, one per slot of a ``SlotKVCache``:

1. prompt sharing: identical prompts (the G completions of one GRPO prompt) are prefilled once, in a batch
   with the other new prompts (the training forward into a small cache), and their keys / values are copied
   into every slot that samples from them; the prompt's last logits give each slot its own first token;
2. decode: ``decode_step`` advances every slot by one token on the device (no host synchronisation; on CUDA a
   captured graph per batch-size and attended-length bucket, see ``decode_graphs``, each with the faster of two
   attention kernels on its shape, see ``decode_attention_choice``); stop tokens and length budgets
   (``min(max_new_tokens, max_seq_len - prompt length)``) are checked on the device;
3. every ``steps_per_check`` steps the host reads which slots are done (one synchronisation), collects their
   completions and refills the slots from the queue at once (continuous batching); once the queue is empty
   the live slots are packed to the front whenever they fit a smaller bucket.

Sampling is temperature -> top-k -> top-p -> the exponential race (``sampling.sample_next_tokens``); the
reported log-prob is ``log_softmax(logits / T)`` at the sampled token, before the top-k / top-p filters (raw
``log_softmax(logits)`` when greedy), in fp32: what the trainer's ``token_log_probs`` computes. With a seed a
call is reproducible: on the CPU (and on CUDA without graphs) through a ``torch.Generator``, with graphs through
the device's default generator, seeded for the call and restored after it.

The slots are as many as asked for (``max_batch_size``, at most the next power of two above the call's
sequences) or as many as fit the memory the engine may use (``slot_memory``: ``gpu_memory_utilization`` on CUDA,
as vLLM's), whichever is fewer; the rest wait in the queue.

The same code runs on CPU and CUDA; only the graph capture is CUDA's. Families with data-dependent expert
routing (MoE) decode eagerly: their routing waits for the host.
"""

from __future__ import annotations

import logging
import math
import os
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from posttrain.inference.compiled_decode import compile_blocks, decoding_compiled, eager
from posttrain.inference.decode_attention_choice import choose_decode_kernels
from posttrain.inference.decode_graphs import DecodeGraphs
from posttrain.inference.decode_step import SlotState, decode_step
from posttrain.inference.engine import Completion, SamplingParams
from posttrain.inference.sampling import sample_next_tokens
from posttrain.inference.slot_cache import SlotKVCache
from posttrain.inference.slot_memory import device_memory, format_bytes, plan_slots, prefill_bytes, slot_bytes
from posttrain.models.common.decode_attention import check_decode_attention_kind, use_decode_attention
from posttrain.models.common.kv_cache import KVCache
from posttrain.models.common.lora import base_param_name, is_adapter_param
from posttrain.models.common.moe import MoEModelHooks
from posttrain.models.common.stacked_names import split_row_index
from posttrain.models.hf import load_hf
from posttrain.models.registry import ModelSpec, get_model_spec_for

logger = logging.getLogger("posttrain")

# checkpoint keys that are derived buffers, not weights
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
CACHE_LEN_MULTIPLE = 128  # cache lengths are rounded up to this, so that calls of similar lengths share graphs
MIN_SLOT_BUCKET = 4  # the smallest batch a decode step runs at
MIN_LENGTH_BUCKET = 128  # the shortest cache a decode step attends to
MIN_STOP_SLOTS = 8


def _last_position_logits(rows: torch.Tensor, cols: torch.Tensor, vocab_size: int):
    """An ``output_fn``: logits [B, V] of one position per row (``cols[b]``), without the [B, S, V] tensor."""

    def output_fn(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden[rows, cols], weight[:vocab_size])

    return output_fn


def bucket_sizes(limit: int, smallest: int) -> list[int]:
    """Batch sizes a decode step runs at: ``smallest`` times powers of two below ``limit``, and ``limit``."""
    sizes = {limit}
    size = smallest
    while size < limit:
        sizes.add(size)
        size *= 2
    return sorted(sizes)


def length_buckets(limit: int, smallest: int) -> list[int]:
    """Attended cache lengths a decode step runs at: ``smallest`` times 1, 2, 3, 4, 6, 8, 12, ... below
    ``limit``, and ``limit`` (past the second bucket a step reads at most 1.5x the positions it needs; the decode
    attention's time grows with the length)."""
    sizes = {limit}
    power = 1
    while smallest * power < limit:
        sizes.add(smallest * power)
        if power >= 2 and smallest * power * 3 // 2 < limit:
            sizes.add(smallest * power * 3 // 2)
        power *= 2
    return sorted(sizes)


@dataclass
class _PromptKV:
    """A prefilled prompt kept for its completions that did not get a slot in the round it was prefilled."""

    k: dict[str, torch.Tensor]  # per layer [1, Hkv, length, D]
    v: dict[str, torch.Tensor]
    logits: torch.Tensor  # [V]
    length: int

    @classmethod
    def keep(cls, cache: KVCache, row: int, length: int, logits: torch.Tensor) -> _PromptKV:
        return cls({name: t[row : row + 1, :, :length].clone() for name, t in cache.k.items()},
                   {name: t[row : row + 1, :, :length].clone() for name, t in cache.v.items()},
                   logits.clone(), length)


@dataclass
class _Run:
    """What a decode loop of one cache shape holds: the cache, the slot state, and (CUDA) the captured graphs."""

    cache: SlotKVCache
    state: SlotState
    graphs: dict[tuple, DecodeGraphs]


class NativeEngine:
    """``GenerationEngine`` over a posttrain ``Transformer`` of any family (already on its device and dtype).

    ``max_batch_size`` is the number of slots (sequences decoded together); ``max_seq_len`` caps prompt +
    completion (default: the model's ``args.max_seq_len``). ``cuda_graphs`` (default: on for CUDA, off for MoE
    families) captures the decode step; ``steps_per_check`` is how many steps run between two looks at which
    sequences are done; ``max_prefill_tokens`` bounds one prefill forward (rows x longest prompt);
    ``decode_attention`` is the kernel of the decode steps' attention (``posttrain.models.common.decode_attention``:
    "auto" = batched matmuls on CUDA, SDPA elsewhere; "matmul"; "sdpa"). The model is used in place:
    ``update_weights`` writes into its parameters (captured graphs stay valid); ``compile_decode`` compiles its
    blocks in place for the decode steps (``compiled_decode.py``: fused kernels, one compile per bucket).

    The slots are capped to the memory the engine may use (``slot_memory``): on CUDA, as vLLM's
    ``gpu_memory_utilization``, this process may hold that share of the device's total memory (the model
    included; never more than is free), less room for one prefill; ``kv_cache_memory_bytes``, when given, is the
    byte budget of the slots instead, on any device (on the CPU, without it, the slots are not capped). Requests
    beyond the slots wait in the queue, so a cap changes the speed, not the results; not even one slot fitting
    raises ``torch.OutOfMemoryError`` naming the sizes.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        max_batch_size: int = 64,
        max_seq_len: int | None = None,
        spec: ModelSpec | None = None,
        cuda_graphs: bool | None = None,
        steps_per_check: int = 8,
        max_prefill_tokens: int = 32768,
        decode_attention: str = "auto",
        gpu_memory_utilization: float = 0.9,
        kv_cache_memory_bytes: int | None = None,
        compile_decode: bool = False,
    ) -> None:
        model = getattr(model, "_orig_mod", model)
        if not hasattr(model, "args") or not hasattr(model, "layers"):
            raise TypeError(f"NativeEngine needs a native posttrain model, got {type(model).__name__}")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if steps_per_check < 1:
            raise ValueError(f"steps_per_check must be >= 1, got {steps_per_check}")
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        if kv_cache_memory_bytes is not None and kv_cache_memory_bytes < 0:
            raise ValueError(f"kv_cache_memory_bytes must be >= 0, got {kv_cache_memory_bytes}")
        self.model = model.eval()
        self.spec = spec or get_model_spec_for(model)
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len or model.args.max_seq_len
        self.vocab_size = model.args.vocab_size
        self.device = model.tok_embeddings.weight.device
        on_cuda = self.device.type == "cuda"
        if cuda_graphs and not on_cuda:
            raise ValueError(f"cuda_graphs needs a CUDA model; this one is on {self.device}")
        self.cuda_graphs = on_cuda and not isinstance(model, MoEModelHooks) if cuda_graphs is None else cuda_graphs
        self.steps_per_check = steps_per_check
        self.max_prefill_tokens = max_prefill_tokens
        self.decode_attention = check_decode_attention_kind(decode_attention)
        self.gpu_memory_utilization = gpu_memory_utilization
        self.kv_cache_memory_bytes = kv_cache_memory_bytes
        self.compile_decode = compile_decode
        if compile_decode:  # in place: the model's blocks stay compiled (prefill runs them eagerly)
            compile_blocks(model)
        self._run_key: tuple | None = None
        self._run: _Run | None = None
        # per (slots, length) bucket, the decode attention its graphs use (kept across cache shapes: the timing
        # depends on the bucket, not on the cache), and the seconds each kernel took when timed
        self._kernels: dict[tuple[int, int], str] = {}
        self._kernel_seconds: dict[tuple[int, int], dict[str, float]] = {}

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
        with use_decode_attention(self.decode_attention), decoding_compiled(self.compile_decode):
            return self._generate(prompt_token_ids, sampling)

    def _generate(self, prompt_token_ids: list[list[int]], sampling: SamplingParams) -> list[Completion]:
        prompts = [list(map(int, p)) for p in prompt_token_ids]
        for i, prompt in enumerate(prompts):
            if not prompt:
                raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
            if len(prompt) >= self.max_seq_len and sampling.max_new_tokens > 0:
                raise ValueError(
                    f"prompt {i} has {len(prompt)} tokens, leaving no room to generate within max_seq_len "
                    f"{self.max_seq_len}; shorten the prompt or raise the engine's max_seq_len"
                )
        completions = [Completion(prompt_ids=p) for p in prompts]
        budgets = [min(sampling.max_new_tokens, self.max_seq_len - len(p)) for p in prompts]
        by_prompt: dict[tuple[int, ...], list[int]] = {}
        for i, prompt in enumerate(prompts):
            if budgets[i] > 0:
                by_prompt.setdefault(tuple(prompt), []).append(i)
        queue = deque(i for requests in by_prompt.values() for i in requests)  # one prompt's requests adjacent
        if not queue:
            return completions
        needed = max(len(prompts[i]) + budgets[i] for i in queue)
        run = self._prepare(len(queue), needed, sampling)
        seeded = sampling.seed is not None
        if self.cuda_graphs:
            generator = None  # graphs sample with the default generator: seed it for this call only
            with torch.random.fork_rng(devices=[self.device], enabled=seeded):
                if seeded:
                    torch.cuda.manual_seed(sampling.seed)
                self._decode_all(run, queue, prompts, budgets, completions, sampling, generator)
        else:
            generator = torch.Generator(device=self.device).manual_seed(sampling.seed) if seeded else None
            self._decode_all(run, queue, prompts, budgets, completions, sampling, generator)
        return completions

    @torch.inference_mode()
    def prepare(self, n_sequences: int, max_len: int, sampling: SamplingParams) -> None:
        """Allocate the cache and capture the decode graphs that a call of ``n_sequences`` sequences of at most
        ``max_len`` tokens (prompt + completion) under ``sampling`` will use, ahead of that call."""
        with use_decode_attention(self.decode_attention), decoding_compiled(self.compile_decode):
            self._prepare(n_sequences, max_len, sampling)

    def _prepare(self, n_requests: int, needed_len: int, sampling: SamplingParams) -> _Run:
        """The cache and slot state for this call (kept from the last call when the shape is the same), with
        the decode graphs for ``sampling`` captured."""
        requested = min(self.max_batch_size, 1 << max(n_requests - 1, 0).bit_length())
        cache_len = min(self.max_seq_len, math.ceil(needed_len / CACHE_LEN_MULTIPLE) * CACHE_LEN_MULTIPLE)
        n_stop = max(MIN_STOP_SLOTS, len(sampling.stop_token_ids))
        # keyed by the slots asked for, not those that fit: free memory that moves between calls (a colocated
        # trainer) must not reallocate the cache and recapture the graphs every call
        key = (requested, cache_len, n_stop)
        if self._run_key != key:
            self._run = self._run_key = None  # free the old cache (and graphs) before taking a new one
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            slots = self._slots_that_fit(requested, cache_len)
            cache = SlotKVCache.for_model(self.model, batch=slots, max_len=cache_len)
            state = SlotState.empty(slots, cache_len, n_stop, self.device)
            self._run, self._run_key = _Run(cache, state, {}), key
        run = self._run
        slots = run.cache.batch
        run.state.free(torch.arange(slots, device=self.device))
        run.state.stop_ids.fill_(-1)
        if sampling.stop_token_ids:
            stops = torch.tensor(sampling.stop_token_ids, dtype=torch.long)
            run.state.stop_ids[: len(stops)] = stops.to(self.device)
        graph_key = (sampling.temperature, sampling.top_k, sampling.top_p)
        if self.cuda_graphs and graph_key not in run.graphs:
            shapes = [(n, length) for n in bucket_sizes(slots, MIN_SLOT_BUCKET)
                      for length in length_buckets(cache_len, MIN_LENGTH_BUCKET)]
            choose_decode_kernels(self._kernels, self._kernel_seconds, run.cache, self.model.args.n_heads, shapes,
                                  self.decode_attention)

            def step(shape: tuple[int, int]) -> None:
                with use_decode_attention(self._kernels[shape]):
                    decode_step(self.model, run.state, run.cache.rows(*shape), shape[0], sampling, None)

            run.graphs[graph_key] = DecodeGraphs(step, shapes)
            run.state.free(torch.arange(slots, device=self.device))
        return run

    def _slots_that_fit(self, requested: int, cache_len: int) -> int:
        """``requested`` slots, or as many as fit the engine's memory budget (logged when fewer)."""
        args, n_layers = self.model.args, len(self.model.layers)
        dtype = self.model.tok_embeddings.weight.dtype
        plan = plan_slots(
            requested, slot_bytes(args, n_layers=n_layers, cache_len=cache_len, dtype=dtype),
            memory=device_memory(self.device), utilization=self.gpu_memory_utilization,
            kv_cache_memory_bytes=self.kv_cache_memory_bytes,
            prefill_reserve=prefill_bytes(args, n_layers=n_layers, max_prefill_tokens=self.max_prefill_tokens,
                                          cache_len=cache_len, dtype=dtype),
        )
        if plan.capped:
            logger.warning(
                "native engine: %d slots requested, %d fit (%s a slot of %d positions; slots' budget %s: %s); "
                "the other sequences wait for a free slot", plan.requested, plan.slots,
                format_bytes(plan.per_slot.total), cache_len, format_bytes(plan.budget), plan.source)
        return plan.slots

    @property
    def cache_slots(self) -> int | None:
        """The slots of the cache the last call used (None before the first call)."""
        return None if self._run is None else self._run.cache.batch

    def _decode_all(self, run: _Run, queue: deque, prompts: list[list[int]], budgets: list[int],
                    completions: list[Completion], sampling: SamplingParams,
                    generator: torch.Generator | None) -> None:
        """The continuous-batching loop: refill free slots, decode a few steps, collect finished sequences."""
        slots = run.cache.batch
        sizes = bucket_sizes(slots, MIN_SLOT_BUCKET)
        lengths = length_buckets(run.cache.max_len, MIN_LENGTH_BUCKET)
        slot_request = [-1] * slots  # the request each slot decodes, -1 when free
        # per slot, a bound on the position it feeds at the next step (known on the host without asking the
        # device: a slot starts at its prompt length and moves at most one position a step)
        next_position = [0] * slots
        waiting: dict[tuple[int, ...], _PromptKV] = {}
        graphs = run.graphs.get((sampling.temperature, sampling.top_k, sampling.top_p))
        steps = self.steps_per_check
        while True:
            free = [s for s, r in enumerate(slot_request) if r < 0]
            if queue and free:
                started = self._refill(run, free[: len(queue)], queue, prompts, budgets, slot_request, waiting,
                                       sampling, generator)
                for slot, request in started:
                    next_position[slot] = len(prompts[request])
            occupied = [s for s, r in enumerate(slot_request) if r >= 0]
            if not occupied:
                return
            extent = occupied[-1] + 1
            if not queue and _bucket(sizes, len(occupied)) < _bucket(sizes, extent):
                rows = torch.tensor(occupied, device=self.device)
                run.cache.move_rows(rows)
                run.state.move_rows(rows)
                slot_request = [slot_request[s] for s in occupied] + [-1] * (slots - len(occupied))
                next_position = [next_position[s] for s in occupied] + [0] * (slots - len(occupied))
                occupied = list(range(len(occupied)))
                extent = len(occupied)
            n = _bucket(sizes, extent)
            # attend to the positions these steps can reach, not the whole cache
            length = _bucket(lengths, min(max(next_position[s] for s in occupied) + steps, run.cache.max_len))
            cache = run.cache.rows(n, length)
            for _ in range(steps):
                if graphs is not None:
                    graphs.replay((n, length))
                else:
                    decode_step(self.model, run.state, cache, n, sampling, generator)
            for s in occupied:
                next_position[s] += steps
            done = run.state.done[:n].tolist()  # the one host synchronisation of these steps
            finished = [s for s in range(n) if done[s] and slot_request[s] >= 0]
            if finished:
                self._collect(run.state, finished, slot_request, completions, set(sampling.stop_token_ids))

    def _refill(self, run: _Run, slots: list[int], queue: deque, prompts: list[list[int]], budgets: list[int],
                slot_request: list[int], waiting: dict[tuple[int, ...], _PromptKV], sampling: SamplingParams,
                generator: torch.Generator | None) -> list[tuple[int, int]]:
        """Start the next requests of the queue in ``slots``: prefill each new prompt once, copy its keys and
        values into every slot that samples from it, and sample each slot's first token from its logits.
        Returns the (slot, request) pairs started."""
        requests = [queue.popleft() for _ in slots]
        # only the prompt of the queue's next request can still have requests that wait for a slot
        still_waiting = tuple(prompts[queue[0]]) if queue else None
        slots_of: dict[tuple[int, ...], list[int]] = {}
        for j, i in enumerate(requests):
            slots_of.setdefault(tuple(prompts[i]), []).append(j)
        fresh = [key for key in slots_of if key not in waiting]
        logits = torch.empty(len(slots), self.vocab_size, device=self.device, dtype=torch.float32)
        for key, js in slots_of.items():
            kept = waiting.get(key)
            if kept is not None:  # prefilled in an earlier round
                logits[_long(js, self.device)] = kept.logits
                dst = _long([slots[j] for j in js], self.device)
                run.cache.write_prefix(dst, kept.k, kept.v, torch.zeros_like(dst), kept.length)
        for key in [key for key in waiting if key != still_waiting]:
            del waiting[key]
        for chunk in self._prefill_chunks(fresh):
            prefill, last_logits = self._prefill([list(key) for key in chunk])
            dst, src = [], []
            for row, key in enumerate(chunk):
                dst += slots_of[key]
                src += [row] * len(slots_of[key])
                if key == still_waiting:
                    waiting[key] = _PromptKV.keep(prefill, row, len(key), last_logits[row])
            dst_t, src_t = _long(dst, self.device), _long(src, self.device)
            logits[dst_t] = last_logits[src_t]
            run.cache.write_prefix(_long([slots[j] for j in dst], self.device), prefill.k, prefill.v, src_t,
                                   max(len(key) for key in chunk))
            del prefill, last_logits  # one prefill's cache at a time (the slots' memory budget counts one)
        first_ids, first_log_probs = sample_next_tokens(logits, sampling, generator)
        for j, slot in enumerate(slots):
            slot_request[slot] = requests[j]
        run.state.start(_long(slots, self.device), first_ids, first_log_probs,
                        _long([len(prompts[i]) for i in requests], self.device),
                        _long([budgets[i] for i in requests], self.device))
        return list(zip(slots, requests))

    def _prefill_chunks(self, keys: list[tuple[int, ...]]) -> list[list[tuple[int, ...]]]:
        """Prompts grouped for prefill forwards of at most ``max_prefill_tokens`` (rows x longest; one prompt
        per forward at least), shortest first so that the padding stays small."""
        chunks: list[list[tuple[int, ...]]] = []
        for key in sorted(keys, key=len):
            if chunks and (len(chunks[-1]) + 1) * len(key) <= self.max_prefill_tokens:
                chunks[-1].append(key)
            else:
                chunks.append([key])
        return chunks

    def _prefill(self, prompts: list[list[int]]) -> tuple[KVCache, torch.Tensor]:
        """One forward over the right-padded prompts into a fresh cache; the last prompt token's logits [P, V]."""
        lengths = [len(p) for p in prompts]
        longest = max(lengths)
        ids = torch.zeros(len(prompts), longest, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, : len(prompt)] = torch.tensor(prompt)
        cache = KVCache.for_model(self.model, batch=len(prompts), max_len=longest)
        rows = torch.arange(len(prompts), device=self.device)
        last = torch.tensor(lengths, device=self.device) - 1
        with eager(self.compile_decode):
            logits = self.model(ids.to(self.device), kv_cache=cache,
                                output_fn=_last_position_logits(rows, last, self.vocab_size))
        return cache, logits.float()

    def _collect(self, state: SlotState, finished: list[int], slot_request: list[int],
                 completions: list[Completion], stop: set[int]) -> None:
        """Copy the finished slots' tokens and log-probs to their completions (one transfer) and free the slots."""
        rows = torch.tensor(finished, device=self.device)
        counts = state.n_generated.index_select(0, rows).tolist()
        longest = max(counts)
        tokens = state.out_tokens.index_select(0, rows)[:, :longest].tolist()
        log_probs = state.out_log_probs.index_select(0, rows)[:, :longest].tolist()
        for j, slot in enumerate(finished):
            c = completions[slot_request[slot]]
            c.token_ids = tokens[j][: counts[j]]
            c.log_probs = log_probs[j][: counts[j]]
            c.finish_reason = "stop" if c.token_ids[-1] in stop else "length"
            slot_request[slot] = -1
        state.free(rows)

    @property
    def decode_kernels(self) -> dict[tuple[int, int], tuple[str, dict[str, float]]]:
        """Per (slots, length) bucket captured so far: its decode attention and, when chosen by timing ("auto"
        on CUDA), the seconds per call of each kernel. Empty before graphs are captured."""
        return {shape: (kind, self._kernel_seconds.get(shape, {})) for shape, kind in self._kernels.items()}

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
        """Drop the model, the cache and the graphs (and with them the device memory they hold)."""
        self.model = None  # type: ignore[assignment]
        self._run = self._run_key = None
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


def _bucket(sizes: list[int], n: int) -> int:
    """The smallest batch size of ``sizes`` that holds ``n`` slots."""
    return next(size for size in sizes if size >= n)


def _long(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)
