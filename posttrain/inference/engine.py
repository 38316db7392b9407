"""The engine protocol: what evaluation and the RL controller ask of a generation engine, whatever runs underneath.

An engine turns prompt token ids into completions (token ids, the log-prob of each sampled token, why it
stopped) under one ``SamplingParams``, and takes new weights by Hugging Face checkpoint name. Engines:
``native.NativeEngine`` (posttrain's own models with a KV cache) and ``vllm_engine.VLLMEngine``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:  # annotations only: the math-answer rule (a Ray reward task) imports this package without torch
    import torch


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. ``temperature`` 0 is greedy; ``top_k`` 0 and ``top_p`` 1 turn those filters off.
    Generation ends at a token of ``stop_token_ids`` (included in the output) or after ``max_new_tokens``;
    the engines add no stop token of their own (pass the tokenizer's EOS / end-of-turn ids here)."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None  # generator seed for this call (reproducible sampling)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))


@dataclass
class Completion:
    """One generated continuation. ``log_probs[i]`` is ``log_softmax(logits / temperature)`` at
    ``token_ids[i]`` (temperature 0: of the raw logits), NOT renormalised by top-p / top-k."""

    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)  # the stop token is included when hit
    log_probs: list[float] = field(default_factory=list)
    finish_reason: str = "length"  # "stop" or "length"


@runtime_checkable
class GenerationEngine(Protocol):
    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingParams) -> list[Completion]:
        """One completion per prompt, in the prompts' order."""
        ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy in tensors named as in an HF checkpoint (what ``save_hf`` writes). May be called several times
        per sync (one call per bucket); tensors on the CPU or the engine's device."""
        ...

    def close(self) -> None: ...
