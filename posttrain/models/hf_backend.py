"""The Hugging Face fallback backend: any ``transformers.AutoModelForCausalLM`` behind posttrain's model contract.

``HFCausalLM`` wraps a transformers causal LM so the trainer, losses, FSDP, checkpoints and export treat it like
a native ``Transformer``:

- ``forward(input_ids, position_ids=None, document_ids=None, output_fn=None)`` runs the HF base model (the
  decoder without its head) and returns ``output_fn(last_hidden_state, lm_head.weight)`` (the chunked loss;
  full logits never exist) or the logits;
- ``.args`` (``HFBackendArgs``) holds the sizes the trainer and metrics read, taken from the HF config;
- ``.layers`` is the decoder's layer list (what activation checkpointing, compile and FSDP wrap);
- its state-dict names are the HF names (the wrapper registers the HF model's children as its own).

Packed rows: posttrain restarts position ids at every document, and transformers (5.x ``masking_utils``)
turns restarting position ids into a block-diagonal causal mask for every attention implementation (sdpa,
eager, flex, flash), sliding windows and per-layer attention types included. So ``document_ids`` need not be
passed on; ``supports_packed_documents`` says whether the model's modeling code builds its masks through
``masking_utils`` (otherwise the trainer refuses packing several documents per row).

Models are built with parameters on the meta device and real (CPU) buffers, so RoPE tables survive
``to_empty()`` (the wrapper restores them).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from posttrain.models.serving_files import make_readable, read_generation_config, save_tokenizer, write_serving_config

logger = logging.getLogger("posttrain")

# HF model types whose training FLOPs are the dense-decoder formula (6 N per token + causal attention)
DENSE_DECODER_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "olmo", "olmo2")
# config fields that change the logits after the output projection (the chunked loss would ignore them)
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")
_WRAPPER_PARTS = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


@dataclass
class HFBackendArgs:
    """The sizes posttrain reads from a model, taken from its HF config."""

    model_type: str
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int | None
    tie_embeddings: bool
    max_seq_len: int | None
    sliding_window: int | None
    norm_eps: float | None
    rope_theta: float | None
    rope_scaling: dict | None
    attn_backend: str  # the HF attn_implementation ("sdpa", "eager", ...)
    is_moe: bool

    @property
    def padded_vocab_size(self) -> int:
        return self.vocab_size  # the HF head is used as is: no padding rows


def _first_attr(config: Any, names: tuple[str, ...], default: Any = None) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def args_from_hf_config(config: Any) -> HFBackendArgs:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    dim = int(text.hidden_size)
    n_heads = int(text.num_attention_heads)
    window = getattr(text, "sliding_window", None)
    if getattr(text, "use_sliding_window", True) is False:
        window = None
    rope_params = getattr(text, "rope_parameters", None) or {}
    n_experts = _first_attr(text, ("num_experts", "num_local_experts", "n_routed_experts"), 0) or 0
    return HFBackendArgs(
        model_type=str(text.model_type),
        vocab_size=int(text.vocab_size),
        dim=dim,
        n_layers=int(text.num_hidden_layers),
        n_heads=n_heads,
        n_kv_heads=int(getattr(text, "num_key_value_heads", None) or n_heads),
        head_dim=int(getattr(text, "head_dim", None) or dim // n_heads),
        ffn_dim=getattr(text, "intermediate_size", None),
        tie_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        max_seq_len=getattr(text, "max_position_embeddings", None),
        sliding_window=int(window) if window else None,
        norm_eps=_first_attr(text, ("rms_norm_eps", "layer_norm_eps", "norm_eps")),
        rope_theta=_first_attr(text, ("rope_theta",), rope_params.get("rope_theta") if isinstance(rope_params, dict)
                               else None),
        rope_scaling=getattr(text, "rope_scaling", None),
        attn_backend=str(getattr(config, "_attn_implementation", None) or "sdpa"),
        is_moe=int(n_experts) > 0,
    )


def _strip_wrappers(name: str) -> str:
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


class HFCausalLM(nn.Module):
    """A transformers causal LM with posttrain's forward contract (see the module docstring)."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.__dict__["hf_model"] = hf_model  # not a submodule: its children are registered below instead
        self.base_prefix = getattr(hf_model, "base_model_prefix", "model") or "model"
        head = hf_model.get_output_embeddings()
        if head is None or not hasattr(hf_model, self.base_prefix):
            raise ValueError(f"{type(hf_model).__name__} has no decoder {self.base_prefix!r} plus output head "
                             "(lm_head); the hf backend trains causal LMs only")
        if getattr(head, "bias", None) is not None:
            raise ValueError(f"{type(hf_model).__name__}'s output head has a bias; the chunked loss takes the head "
                             "weight only, so the hf backend does not train it")
        for field_name in _LOGIT_TRANSFORMS:
            value = getattr(hf_model.config, field_name, None)
            if value not in (None, 1, 1.0):
                raise ValueError(f"{hf_model.config.model_type}'s config sets {field_name} = {value}: the logits are "
                                 "transformed after the output projection, which posttrain's chunked loss would skip")
        self.head_name = next((name for name, child in hf_model.named_children() if child is head), None)
        if self.head_name is None:
            raise ValueError(f"{type(hf_model).__name__}'s output head is not one of its direct children; the hf "
                             "backend expects the <decoder> + lm_head layout of transformers causal LMs")
        for name, child in hf_model.named_children():
            if name not in (self.base_prefix, self.head_name) and any(True for _ in child.parameters()):
                raise ValueError(f"{type(hf_model).__name__} has parameters outside its decoder and head "
                                 f"({name}); the hf backend would not train them")
            self.add_module(name, child)
        self.args = args_from_hf_config(hf_model.config)
        # the decoder's own list, not registered again here (its names stay the HF names, once)
        self.__dict__["layer_list"] = _find_layers(getattr(hf_model, self.base_prefix), self.args.n_layers)
        # non-persistent buffers (RoPE inverse frequencies) as built, restored after to_empty()
        self._buffer_values = {n: b.detach().clone() for n, b in self.named_buffers() if b.device.type != "meta"}

    # ------------------------------------------------------------------ structure
    @property
    def layers(self) -> nn.ModuleList:
        """The decoder layers: the units of activation checkpointing, compile and FSDP."""
        return self.layer_list

    @property
    def decoder(self) -> nn.Module:
        return getattr(self, self.base_prefix)

    @property
    def output_weight(self) -> torch.Tensor:
        return getattr(self, self.head_name).weight

    @property
    def supports_packed_documents(self) -> bool:
        """Whether the model builds its attention masks through transformers' masking_utils, which separates
        packed documents by their restarting position ids."""
        module = sys.modules.get(type(self.decoder).__module__)
        return module is not None and any(
            hasattr(module, f) for f in ("create_causal_mask", "create_sliding_window_causal_mask")
        )

    def mfu_unavailable_reason(self, seq_len: int) -> str | None:
        """Why MFU by formula would be wrong for this model at ``seq_len`` (None: the formula applies)."""
        a = self.args
        if a.model_type not in DENSE_DECODER_MODEL_TYPES:
            return (f"model_type {a.model_type!r} is not a known dense decoder "
                    f"({', '.join(DENSE_DECODER_MODEL_TYPES)}), so its FLOPs are not counted")
        if a.is_moe:
            return "a mixture-of-experts model's FLOPs depend on routing"
        if a.sliding_window is not None and a.sliding_window < seq_len:
            return f"sliding-window attention ({a.sliding_window} < seq_len {seq_len}) is not counted by the formula"
        return None

    # ------------------------------------------------------------------ materialization
    def tie_weights(self) -> None:
        if self.args.tie_embeddings:
            getattr(self, self.head_name).weight = self.decoder.get_input_embeddings().weight

    def to_empty(self, *, device: torch.device | str | None, recurse: bool = True) -> HFCausalLM:
        # new Parameter objects per module untie shared weights; empty buffers lose the RoPE tables
        super().to_empty(device=device, recurse=recurse)
        self.tie_weights()
        self.init_buffers(device)
        return self

    def init_buffers(self, buffer_device: torch.device | str | None = None) -> None:
        """Put the buffers back as built (after ``to_empty``), on ``buffer_device``."""
        for name, value in self._buffer_values.items():
            module_name, _, buffer_name = name.rpartition(".")
            module = self.get_submodule(module_name) if module_name else self
            module._buffers[buffer_name] = value.to(buffer_device or value.device)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        output_fn: Callable[[torch.Tensor, torch.Tensor], Any] | None = None,
    ) -> Any:
        """Like ``Transformer.forward``. ``document_ids`` are implied by the position ids, which restart at
        every packed document (transformers builds the block-diagonal mask from them)."""
        bsz, seq_len = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(seq_len, device=input_ids.device).unsqueeze(0).expand(bsz, seq_len)
        out = self.decoder(input_ids=input_ids, position_ids=position_ids, use_cache=False)
        hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
        if output_fn is not None:
            return output_fn(hidden, self.output_weight)
        return getattr(self, self.head_name)(hidden)

    # ------------------------------------------------------------------ export
    @torch.no_grad()
    def save_hf(self, out_dir: str | Path, tokenizer: Any = None) -> Path:
        """``save_pretrained`` of the full state dict (gathered tensor by tensor; call on every rank, rank 0
        writes), plus the tokenizer."""
        writer = not (torch.distributed.is_available() and torch.distributed.is_initialized()) or (
            torch.distributed.get_rank() == 0
        )
        state: dict[str, torch.Tensor] = {}
        tied_head = f"{self.head_name}.weight" if self.args.tie_embeddings else None
        for name, tensor in self.state_dict().items():
            if _strip_wrappers(name) == tied_head:
                continue  # the input embedding, stored once (transformers ties it back)
            full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor  # collective for DTensors
            if writer:
                state[_strip_wrappers(name)] = full.detach().to("cpu").clone()
        out = Path(out_dir)
        if writer:
            out.mkdir(parents=True, exist_ok=True)
            for stale in out.glob("model*.safetensors"):
                stale.unlink()
            (out / "model.safetensors.index.json").unlink(missing_ok=True)
            self.hf_model.save_pretrained(str(out), state_dict=state)
            if tokenizer is not None:
                save_tokenizer(tokenizer, out)
            # save_pretrained wrote the source model's generation config: add the tokenizer's stop ids to it
            write_serving_config(out, tokenizer, read_generation_config(out))
            make_readable(out)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
        return out


def _find_layers(decoder: nn.Module, n_layers: int) -> nn.ModuleList:
    layers = getattr(decoder, "layers", None)
    if isinstance(layers, nn.ModuleList):
        return layers
    for _, module in decoder.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return module
    raise ValueError(f"{type(decoder).__name__} has no list of {n_layers} decoder layers for FSDP to wrap")


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Create every parameter on the meta device (no memory, no init cost) while buffers are computed for
    real: like accelerate's ``init_empty_weights(include_buffers=False)``."""
    original = nn.Module.register_parameter

    def register_parameter(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(
                param.to("meta"), requires_grad=param.requires_grad
            )

    nn.Module.register_parameter = register_parameter
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def load_hf_config(path: str | Path, attn_implementation: str = "sdpa") -> Any:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path))
    config._attn_implementation = attn_implementation
    return config


def build_hf_causal_lm(config: Any, *, on_meta: bool = True, attn_implementation: str = "sdpa") -> HFCausalLM:
    """An ``HFCausalLM`` from an HF config: parameters on meta (then ``to_empty`` + load / init), or a fully
    initialised CPU model with ``on_meta=False``."""
    from transformers import AutoModelForCausalLM

    def build(implementation: str) -> nn.Module:
        with parameters_on_meta() if on_meta else contextlib.nullcontext():
            return AutoModelForCausalLM.from_config(config, attn_implementation=implementation)

    try:
        hf_model = build(attn_implementation)
    except ValueError as err:  # e.g. attention logit softcapping has no sdpa kernel in transformers
        if attn_implementation != "sdpa" or "attention implementation" not in str(err):
            raise
        logger.info("%s has no sdpa attention in transformers: using its eager attention", config.model_type)
        hf_model = build("eager")
    return HFCausalLM(hf_model)


@torch.no_grad()
def load_hf_backend_weights(model: HFCausalLM, folder: str | Path) -> None:
    """Fill a ``to_empty``'d (possibly FSDP-sharded) ``HFCausalLM`` from an HF checkpoint folder.

    When the safetensors names are the model's parameter names (checkpoints saved by transformers 5), each
    rank reads only its own slices. Otherwise (legacy names that transformers converts while loading) every
    rank loads the whole model with ``from_pretrained`` on the CPU and copies its slices.
    """
    from posttrain.models.hf import safetensors_files
    from posttrain.models.sharded_load import canonical_name, fill_local_shards, load_full_state_dict_sharded

    folder = Path(folder)
    where: dict[str, Path] = {}
    try:
        files = safetensors_files(folder)
    except FileNotFoundError:  # *.bin only: from_pretrained reads those
        files = []
    for file in files:
        with safe_open_keys(file) as keys:
            where.update({k: file for k in keys})
    names = [canonical_name(n) for n, _ in model.named_parameters()]
    if all(n in where for n in names):
        def read(name: str, slices: tuple[slice, ...]) -> torch.Tensor:
            from safetensors import safe_open

            with safe_open(str(where[name]), framework="pt", device="cpu") as f:
                return f.get_slice(name)[slices]

        fill_local_shards(model, read)
    else:
        from transformers import AutoModelForCausalLM

        logger.info("checkpoint names differ from the model's (%s ...): loading it whole with from_pretrained",
                    next(n for n in names if n not in where))
        full = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
        load_full_state_dict_sharded(model, dict(full.named_parameters()))
        del full
    model.init_buffers(_param_device(model))


@torch.no_grad()
def init_hf_backend_weights(model: HFCausalLM, seed: int) -> None:
    """Random init with transformers' own initialisation (seeded; the same whatever the sharding): the full
    model is built once on the CPU and each rank copies its slices."""
    from transformers import AutoModelForCausalLM

    from posttrain.models.sharded_load import load_full_state_dict_sharded

    torch.manual_seed(seed)
    full = AutoModelForCausalLM.from_config(model.hf_model.config)
    load_full_state_dict_sharded(model, dict(full.named_parameters()))
    del full
    model.init_buffers(_param_device(model))


@contextlib.contextmanager
def safe_open_keys(file: Path) -> Iterator[list[str]]:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt", device="cpu") as f:
        yield list(f.keys())


def _param_device(model: nn.Module) -> torch.device:
    p = next(model.parameters())
    return (p._local_tensor if hasattr(p, "_local_tensor") else p).device


__all__ = [
    "DENSE_DECODER_MODEL_TYPES",
    "HFBackendArgs",
    "HFCausalLM",
    "args_from_hf_config",
    "build_hf_causal_lm",
    "init_hf_backend_weights",
    "load_hf_backend_weights",
    "load_hf_config",
    "parameters_on_meta",
]
