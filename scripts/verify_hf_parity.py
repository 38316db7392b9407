#!/usr/bin/env python
"""Compare posttrain's logits with transformers' on the same HF checkpoint.

    python scripts/verify_hf_parity.py --hf-dir /path/to/Qwen3-0.6B --dtype bfloat16 --device cuda
    python scripts/verify_hf_parity.py --model-type llama --random     # a random tiny model, built first

Two checks: a batch of random ids (positions 0..S-1), and one packed row of three documents with restarting
position ids and document ids (posttrain) against each document run alone (transformers). Prints the max and
mean absolute logit difference and exits 1 when a max exceeds --tol + --rtol * max|logit|. fp32 is the real
parity check (expect ~1e-6 relative); bf16/fp16 only bound rounding noise, which grows with the logits.

Random tiny configs use awkward shapes on purpose (head_dim != hidden / heads, GQA, untied embeddings, a
vocabulary that is not a multiple of 64, llama3 RoPE scaling); add a family by adding a builder to
RANDOM_CONFIG_BUILDERS.

Per layer, the hidden states are compared too (transformers' ``output_hidden_states`` against forward hooks on
posttrain's blocks): the input of the first block ("embeddings"), each block's output, then the final norm.
The first entry above tolerance is printed as the first diverging layer, so a port is finished by fixing that
layer and running again (see README, "Adding a model").
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# (absolute, relative to the largest |logit|) tolerance on the max abs difference, per dtype
DEFAULT_TOLERANCE = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (0.0, 5e-2), torch.float16: (0.0, 1e-2)}


def random_llama_config() -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=1000,  # not a multiple of 64
        hidden_size=96,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA
        head_dim=32,  # != 96 / 4
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        rope_scaling={  # original context shorter than the test sequences, so the scaling matters
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        attention_bias=True,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )


def random_qwen3_config() -> Any:
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,  # != 64 / 4
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        tie_word_embeddings=False,
        use_sliding_window=False,
        bos_token_id=1,
        eos_token_id=2,
    )


def random_gemma3_config() -> Any:
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        vocab_size=1000,
        hidden_size=80,
        intermediate_size=144,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,  # != 80 / 4
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        rope_parameters={  # global layers: linear scaling; sliding layers: their own base
            "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 100000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
        sliding_window=7,  # shorter than every test document
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"],
        query_pre_attn_scalar=20,  # != head_dim
        tie_word_embeddings=True,
        bos_token_id=2,
        eos_token_id=1,
        pad_token_id=0,
    )


def random_qwen3_moe_config() -> Any:
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=96,  # the dense layer (mlp_only_layers)
        moe_intermediate_size=40,
        num_experts=6,
        num_experts_per_tok=3,
        norm_topk_prob=True,
        num_hidden_layers=3,
        mlp_only_layers=[1],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        tie_word_embeddings=False,
        use_sliding_window=False,
        bos_token_id=1,
        eos_token_id=2,
    )


def random_gpt_oss_config() -> Any:
    from transformers import GptOssConfig

    return GptOssConfig(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=40,  # per expert
        num_local_experts=6,
        num_experts_per_tok=3,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
        sliding_window=7,  # shorter than every test document
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={  # original context shorter than the test sequences, so YaRN matters
            "rope_type": "yarn", "factor": 8.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
            "original_max_position_embeddings": 16, "rope_theta": 150000.0,
        },
        max_position_embeddings=128,  # = factor * original
        swiglu_limit=1.5,  # low enough that the clamps are active on random weights
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )


def honour_gpt_oss_swiglu_config(model: torch.nn.Module) -> list[str]:
    """Make a transformers GPT-OSS use its config's ``swiglu_alpha`` / ``swiglu_limit``; returns what it changed.

    transformers 5.17 (the GPU image's) hard-codes ``alpha = 1.702`` and ``limit = 7.0`` in ``GptOssExperts``
    and ignores the config (5.19 reads it). OpenAI's checkpoints use exactly those values, so they are
    unaffected, but a config with another limit (the random test config's 1.5, which makes the clamps matter)
    runs other math there than the config says; posttrain follows the config.
    """
    config = getattr(model, "config", None)
    changed = []
    for name, module in model.named_modules():
        for attr, key in (("alpha", "swiglu_alpha"), ("limit", "swiglu_limit")):
            want = getattr(config, key, None)
            if type(module).__name__ == "GptOssExperts" and want is not None and getattr(module, attr) != want:
                changed.append(f"{name}.{attr} {getattr(module, attr)} -> {want}")
                setattr(module, attr, want)
    return changed


RANDOM_CONFIG_BUILDERS: dict[str, Callable[[], Any]] = {
    "llama": random_llama_config,
    "qwen3": random_qwen3_config,
    "gemma3_text": random_gemma3_config,
    "qwen3_moe": random_qwen3_moe_config,
    "gpt_oss": random_gpt_oss_config,
}


@torch.no_grad()
def make_random_hf_model(model_type: str, out_dir: str | Path, *, seed: int = 0) -> Path:
    """Save a randomly initialised tiny transformers model of ``model_type`` to ``out_dir``.

    Every parameter is randomised (norm weights around 1, biases non-zero), so a swapped or missing tensor
    shows up in the logits.
    """
    from transformers import AutoModelForCausalLM

    if model_type not in RANDOM_CONFIG_BUILDERS:
        raise SystemExit(f"no random config for {model_type!r}; choose one of {sorted(RANDOM_CONFIG_BUILDERS)}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(RANDOM_CONFIG_BUILDERS[model_type]())
    for name, param in model.named_parameters():
        if "norm" in name:
            param.copy_(1.0 + 0.2 * torch.randn_like(param))
        elif name.endswith("bias"):
            param.normal_(0.0, 0.1)
        elif "embed_tokens" in name:
            param.normal_(0.0, 1.0)
        else:
            param.normal_(0.0, param.shape[-1] ** -0.5)
    out = Path(out_dir)
    model.save_pretrained(str(out))
    return out


@dataclass
class LayerDiff:
    name: str  # "embeddings", "layer 3", "final norm"
    max_abs: float
    mean_abs: float
    ref_max_abs: float


def _first_tensor(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def compare_hidden_states(ref: torch.nn.Module, ours: torch.nn.Module, ids: torch.Tensor) -> list[LayerDiff]:
    """Hidden states of both models on ``ids``, entry by entry: the first block's input, every block's output,
    the final norm's output. transformers' ``hidden_states`` give the first n entries (its last one is already
    normed), hooks on its last layer and final norm the rest; posttrain's come from hooks on its blocks."""
    decoder = ref.get_decoder() if hasattr(ref, "get_decoder") else ref.model
    ref_layers, our_layers = list(decoder.layers), list(ours.layers.values())
    if len(ref_layers) != len(our_layers):
        raise AssertionError(f"layer count differs: transformers {len(ref_layers)}, posttrain {len(our_layers)}")
    ref_tail: list[torch.Tensor] = []
    mine: list[torch.Tensor] = []
    hooks = [
        ref_layers[-1].register_forward_hook(lambda m, a, o: ref_tail.append(_first_tensor(o))),
        decoder.norm.register_forward_hook(lambda m, a, o: ref_tail.append(_first_tensor(o))),
        our_layers[0].register_forward_pre_hook(lambda m, a: mine.append(a[0])),
        *[layer.register_forward_hook(lambda m, a, o: mine.append(_first_tensor(o))) for layer in our_layers],
        ours.norm.register_forward_hook(lambda m, a, o: mine.append(_first_tensor(o))),
    ]
    try:
        hidden = ref(input_ids=ids, use_cache=False, output_hidden_states=True).hidden_states
        ours(ids)
    finally:
        for hook in hooks:
            hook.remove()
    reference = [*hidden[: len(ref_layers)], *ref_tail]
    names = ["embeddings", *[f"layer {i}" for i in range(len(ref_layers))], "final norm"]
    diffs = []
    for name, a, b in zip(names, reference, mine):
        d = (a.float() - b.float()).abs()
        diffs.append(LayerDiff(name, d.max().item(), d.mean().item(), a.float().abs().max().item()))
    return diffs


class ReferenceRouting:
    """Makes posttrain's MoE layers route every token to the experts the transformers reference chose.

    In bf16 a router logit that nearly ties with another can swap order after one rounding that differs (a
    different attention kernel, a grouped matmul): the token then runs other experts, a large local difference
    that says nothing about the port and grows through later layers. Following the reference's routing makes
    the logits comparison measure the math alone; the decisions posttrain would have taken itself are counted
    (``flips``) so that routing is still checked: a flip is a token whose own top-k set differs from the
    reference's at one layer, given the same inputs so far. ``margins`` holds, per flip, the reference's gap
    between its k-th and (k+1)-th router logit relative to its largest |router logit| (the scale of the rounding
    there): a flip from rounding has one of a few bf16 steps (2^-8 each), a wrong router a large one.

    Hooks: each reference router's input is recorded as it runs (its top-k recomputed from ``router_logits =
    linear(x)``: the top-k of the logits, which is the top-k of their softmax too); each posttrain router's
    logits outside the recorded set are replaced with -inf. Both routings depend only on the top-k logits
    (GPT-OSS: softmax over the k; Qwen3-MoE with ``norm_topk_prob``: the renormalised top-k probabilities), so
    the masked logits route exactly as the reference. The reference must run first on the same tokens in the
    same order (rows are matched first in, first out).
    """

    def __init__(self, ref: torch.nn.Module, ours: torch.nn.Module) -> None:
        if getattr(ours.args, "norm_topk_prob", True) is False:
            raise ValueError("following the reference's routing needs norm_topk_prob (the top-k weights then "
                             "depend on the top-k logits alone)")
        decoder = ref.get_decoder() if hasattr(ref, "get_decoder") else ref.model
        ref_routers = [getattr(layer.mlp, "router", None) or getattr(layer.mlp, "gate", None)
                       for layer in decoder.layers]
        ref_routers = [r if hasattr(r, "weight") and r.weight.dim() == 2 else None for r in ref_routers]
        our_routers = [block.feed_forward.router if isinstance(block.feed_forward, ours.moe_layer_type) else None
                       for block in ours.layers.values()]
        if [r is None for r in ref_routers] != [r is None for r in our_routers]:
            raise AssertionError("MoE layers differ between transformers and posttrain")
        self.top_k = ours.args.n_experts_per_tok
        self.pending: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.flips = 0
        self.decisions = 0
        self.layer_flips: dict[int, int] = {}
        self.margins: list[float] = []
        self._hooks = []
        for i, (r, o) in enumerate(zip(ref_routers, our_routers)):
            if r is not None:
                self.pending[i] = []
                self._hooks.append(r.register_forward_pre_hook(self._recorder(i)))
                self._hooks.append(o.register_forward_hook(self._follower(i)))

    def _recorder(self, layer: int):
        def record(module: torch.nn.Module, args: tuple) -> None:
            x = args[0].reshape(-1, module.weight.shape[1])
            logits = torch.nn.functional.linear(x, module.weight, getattr(module, "bias", None)).float()
            top = torch.topk(logits, self.top_k + 1, dim=-1).values[:, -2:]  # the k-th and (k+1)-th
            margin = (top[:, 0] - top[:, 1]) / logits.abs().amax(-1).clamp_min(1e-6)
            self.pending[layer].append((torch.topk(logits, self.top_k, dim=-1).indices, margin))

        return record

    def _follower(self, layer: int):
        def follow(module: torch.nn.Module, args: tuple, logits: torch.Tensor) -> torch.Tensor:
            queue = self.pending[layer]
            if not queue:
                raise AssertionError(f"layer {layer}: posttrain routed tokens the reference has not run")
            chosen = torch.cat([c for c, _ in queue])
            margin = torch.cat([m for _, m in queue])
            n = logits.shape[0]
            if chosen.shape[0] < n:
                raise AssertionError(f"layer {layer}: {n} tokens to route, the reference ran {chosen.shape[0]}")
            rest = [(chosen[n:], margin[n:])] if chosen.shape[0] > n else []
            self.pending[layer] = rest
            chosen, margin = chosen[:n], margin[:n]
            own = torch.topk(logits, self.top_k, dim=-1).indices
            flipped = (own.sort(-1).values != chosen.sort(-1).values).any(-1)
            self.flips += int(flipped.sum())
            self.layer_flips[layer] = self.layer_flips.get(layer, 0) + int(flipped.sum())
            self.decisions += n
            self.margins += margin[flipped].tolist()
            return torch.full_like(logits, float("-inf")).scatter(-1, chosen, logits.gather(-1, chosen))

        return follow

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        left = {layer: sum(c.shape[0] for c, _ in q) for layer, q in self.pending.items() if q}
        if left:
            raise AssertionError(f"reference routing recorded but never followed: {left}")


@dataclass
class ParityReport:
    max_abs: float
    mean_abs: float
    packed_max_abs: float
    packed_mean_abs: float
    ref_max_abs: float  # largest |logit| of the reference, for a relative error
    layers: list[LayerDiff] = field(default_factory=list)  # per-layer hidden states, in forward order
    # with follow_reference_routing: (token, MoE layer) routing decisions, those where posttrain's own top-k
    # differed from the reference's, and the reference's relative top-k margin at each of those
    routing_decisions: int = 0
    routing_flips: int = 0
    flip_margins: list[float] = field(default_factory=list)
    flips_per_layer: dict[int, int] = field(default_factory=dict)  # by layer index (MoE layers only)

    def first_divergence(self, tol: float, rtol: float) -> LayerDiff | None:
        """The first hidden state whose max abs diff exceeds ``tol + rtol * max|reference|``."""
        return next((d for d in self.layers if d.max_abs > tol + rtol * d.ref_max_abs), None)

    @property
    def rel(self) -> float:
        return max(self.max_abs, self.packed_max_abs) / max(self.ref_max_abs, 1e-12)


def _split_lengths(seq_len: int) -> list[int]:
    first, second = seq_len // 2, seq_len // 3
    return [first, second, seq_len - first - second]


@torch.no_grad()
def compare_logits(
    hf_dir: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    seq_len: int = 64,
    batch: int = 2,
    seed: int = 0,
    attn_backend: str = "sdpa",
    ours: torch.nn.Module | None = None,
    reference_kwargs: dict[str, Any] | None = None,
    follow_reference_routing: bool = False,
) -> ParityReport:
    """``ours``: an already loaded posttrain model to check (default: ``load_hf(hf_dir)``);
    ``reference_kwargs``: extra ``from_pretrained`` arguments of the transformers reference (e.g.
    ``experts_implementation="eager"``); ``follow_reference_routing``: MoE models route as the reference did
    (``ReferenceRouting``), the report counts the decisions they would have taken otherwise."""
    from transformers import AutoModelForCausalLM

    from posttrain.models import load_hf

    ref = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dtype, **(reference_kwargs or {}))
    honour_gpt_oss_swiglu_config(ref)
    ref = ref.to(device).eval()
    if ours is None:
        ours = load_hf(hf_dir, dtype=dtype, device=device, attn_backend=attn_backend)
    ours = ours.eval()
    vocab = ref.config.vocab_size
    if ours.args.vocab_size != vocab:
        raise AssertionError(f"vocab size differs: transformers {vocab}, posttrain {ours.args.vocab_size}")
    routing = ReferenceRouting(ref, ours) if follow_reference_routing else None
    try:
        report = _compare(ref, ours, vocab, seq_len=seq_len, batch=batch, seed=seed, device=device)
    finally:
        if routing is not None:
            routing.remove()
    if routing is not None:
        report.routing_decisions, report.routing_flips = routing.decisions, routing.flips
        report.flip_margins, report.flips_per_layer = routing.margins, dict(routing.layer_flips)
    return report


def _compare(
    ref: torch.nn.Module, ours: torch.nn.Module, vocab: int, *, seq_len: int, batch: int, seed: int, device: str
) -> ParityReport:
    """The logits of a random batch and of a packed row (reference: each document alone), then the hidden
    states; the reference always runs before posttrain on the same tokens (ReferenceRouting relies on it)."""

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq_len), generator=gen).to(device)
    ref_logits = ref(input_ids=ids, use_cache=False).logits.float()
    our_logits = ours(ids).float()
    diff = (ref_logits - our_logits).abs()

    lengths = _split_lengths(seq_len)
    packed = torch.randint(0, vocab, (1, seq_len), generator=gen).to(device)
    position_ids = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0).to(device)
    document_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]).unsqueeze(0).to(device)
    ref_packed = torch.cat(
        [ref(input_ids=doc, use_cache=False).logits.float() for doc in packed.split(lengths, dim=1)], dim=1
    )
    our_packed = ours(packed, position_ids=position_ids, document_ids=document_ids).float()
    packed_diff = (ref_packed - our_packed).abs()

    return ParityReport(
        max_abs=diff.max().item(),
        mean_abs=diff.mean().item(),
        packed_max_abs=packed_diff.max().item(),
        packed_mean_abs=packed_diff.mean().item(),
        ref_max_abs=max(ref_logits.abs().max().item(), ref_packed.abs().max().item()),
        layers=compare_hidden_states(ref, ours, ids),
    )


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf-dir", help="HF checkpoint folder (or Hub id)")
    source.add_argument("--model-type", choices=sorted(RANDOM_CONFIG_BUILDERS), help="with --random")
    parser.add_argument("--random", action="store_true", help="build a random tiny model of --model-type first")
    parser.add_argument("--out-dir", help="where --random saves its model (default: a temporary folder)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--attn-backend", default="sdpa", choices=["sdpa", "flex"])
    parser.add_argument("--tol", type=float, default=None, help="absolute part of the allowed max abs diff")
    parser.add_argument("--rtol", type=float, default=None, help="part of the allowed max abs diff per max |logit|")
    parser.add_argument("--follow-reference-routing", action="store_true",
                        help="MoE: route as transformers did and count the decisions posttrain takes otherwise")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.model_type and not args.random:
        parser.error("--model-type needs --random (or use --hf-dir)")
    if args.seq_len < 3:
        parser.error("--seq-len must be at least 3 (the packed check uses three documents)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    dtype = getattr(torch, args.dtype)
    default_tol, default_rtol = DEFAULT_TOLERANCE[dtype]
    tol = args.tol if args.tol is not None else default_tol
    rtol = args.rtol if args.rtol is not None else default_rtol
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = args.hf_dir
        if args.random:
            hf_dir = make_random_hf_model(args.model_type, args.out_dir or tmp, seed=args.seed)
        report = compare_logits(
            hf_dir, dtype=dtype, device=args.device, seq_len=args.seq_len, batch=args.batch, seed=args.seed,
            attn_backend=args.attn_backend, follow_reference_routing=args.follow_reference_routing,
        )
    print(f"logits      max abs diff {report.max_abs:.3e}  mean abs diff {report.mean_abs:.3e}")
    print(f"packed row  max abs diff {report.packed_max_abs:.3e}  mean abs diff {report.packed_mean_abs:.3e}")
    allowed = tol + rtol * report.ref_max_abs
    print(f"max |logit| {report.ref_max_abs:.3e}; relative (max diff / max |logit|) {report.rel:.3e}")
    print(f"allowed max abs diff {allowed:.3e} (tol {tol:.1e} + rtol {rtol:.1e} * max |logit|)")
    if report.routing_decisions:
        margins = f"; largest reference margin {max(report.flip_margins):.1e}" if report.flip_margins else ""
        per_layer = ", ".join(f"layer {i}: {n}" for i, n in sorted(report.flips_per_layer.items()))
        print(f"routing     {report.routing_flips} of {report.routing_decisions} decisions differ "
              f"({per_layer}){margins}")
    print("hidden states (same tolerance, relative to each entry's max |reference|):")
    for d in report.layers:
        print(f"  {d.name:<12} max abs diff {d.max_abs:.3e}  mean abs diff {d.mean_abs:.3e}  "
              f"max |ref| {d.ref_max_abs:.3e}")
    first = report.first_divergence(tol, rtol)
    if first is not None:
        print(f"first diverging layer: {first.name} (fix it there; everything before it matches)")
    if max(report.max_abs, report.packed_max_abs) > allowed:
        print("FAIL: above tolerance")
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
