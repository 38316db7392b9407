"""Mixture of experts: a top-k softmax router and experts held as stacked weights, computed grouped.

Tokens are sorted by expert so each expert's rows are contiguous; the experts then run as one grouped matmul
(``torch._grouped_mm``: CUDA sm90+ in bf16) or, elsewhere, as a loop of plain matmuls over the groups (the
reference path; it syncs with the host for the group sizes). Both compute the same thing.

The router adds the Switch-Transformer load-balancing loss ``E * sum_e f_e * P_e`` (f_e: fraction of routed
(token, slot) pairs sent to expert e, summing to top_k; P_e: mean router probability), Hugging Face's
``load_balancing_loss_func`` for one layer (the models average the layers' losses; transformers computes one
loss over all layers' routing at once, which is the same for one layer). Each MoE layer keeps its last
forward's value in ``aux_loss`` (differentiable) and its routed-token counts in ``tokens_per_expert``; the
model averages them (``moe_aux_loss``, ``moe_metrics``) and the SFT loss adds ``router_aux_loss_coef * aux``
to what it backpropagates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# rows per expert group are padded to this multiple for torch._grouped_mm (16-byte aligned bf16 rows)
GROUPED_MM_ALIGN = 8
# Use torch._grouped_mm on the CPU too (where the installed torch has it); for tests of the grouped path.
GROUPED_MM_ON_CPU = False
# Which path the experts take: "auto" (torch._grouped_mm where grouped_mm_supported says so, else the loop),
# "grouped" or "loop" (that one always, on any device: what benchmarks/bench_moe.py compares).
EXPERTS_PATHS = ("auto", "grouped", "loop")
EXPERTS_PATH = "auto"


def grouped_mm_supported(x: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` serves this input: CUDA sm90+ and bf16 (or the CPU when forced)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.device.type == "cpu":
        return GROUPED_MM_ON_CPU
    if x.device.type != "cuda" or x.dtype != torch.bfloat16:
        return False
    return torch.cuda.get_device_capability(x.device) >= (9, 0)


def use_grouped_mm(x: torch.Tensor) -> bool:
    """Whether the experts run ``torch._grouped_mm`` on ``x``: EXPERTS_PATH, and for "auto" the hardware."""
    if EXPERTS_PATH not in EXPERTS_PATHS:
        raise ValueError(f"moe.EXPERTS_PATH is {EXPERTS_PATH!r}; choose one of {list(EXPERTS_PATHS)}")
    if EXPERTS_PATH == "auto":
        return grouped_mm_supported(x)
    if EXPERTS_PATH == "grouped" and not hasattr(torch, "_grouped_mm"):
        raise RuntimeError(f"moe.EXPERTS_PATH is 'grouped' but torch {torch.__version__} has no torch._grouped_mm")
    return EXPERTS_PATH == "grouped"


class ExpertGroups:
    """Rows sorted by expert (``counts[e]`` rows for expert e) and per-group matmuls over them.

    On the grouped path the rows live in a buffer where every group is padded to a multiple of
    GROUPED_MM_ALIGN rows (static size, no host sync) and ``mm`` is one ``torch._grouped_mm``; elsewhere the
    rows stay packed and ``mm`` loops over the groups (one host sync for the sizes). ``pad`` enters the
    working layout, ``unpad`` leaves it.
    """

    def __init__(self, x: torch.Tensor, counts: torch.Tensor) -> None:
        n, n_experts = x.shape[0], counts.shape[0]
        self.grouped = use_grouped_mm(x)
        row_expert = torch.repeat_interleave(torch.arange(n_experts, device=x.device), counts, output_size=n)
        if self.grouped:
            padded_counts = (counts + GROUPED_MM_ALIGN - 1) // GROUPED_MM_ALIGN * GROUPED_MM_ALIGN
            padded_ends = padded_counts.cumsum(0)
            shift = (padded_ends - padded_counts) - (counts.cumsum(0) - counts)  # padded start - start
            self.dest = torch.arange(n, device=x.device) + shift[row_expert]
            # A static size (no host sync) with room for every group's padding. The last group runs to the end:
            # torch._grouped_mm leaves rows past the last offset unwritten, and garbage there reached the
            # bias gradients (index_add over every row) as NaN / wrong values.
            self.rows = -(-(n + n_experts * (GROUPED_MM_ALIGN - 1)) // GROUPED_MM_ALIGN) * GROUPED_MM_ALIGN
            self.offs = padded_ends.to(torch.int32)
            self.offs[-1] = self.rows
            # padding rows take expert 0's bias; they are dropped by unpad
            self.row_expert = row_expert.new_zeros(self.rows).index_put((self.dest,), row_expert)
        else:
            self.sizes = counts.tolist()
            self.row_expert = row_expert

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        if not self.grouped:
            return x
        return x.new_zeros(self.rows, x.shape[1]).index_put((self.dest,), x)

    def unpad(self, y: torch.Tensor) -> torch.Tensor:
        return y[self.dest] if self.grouped else y

    def mm(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Rows of group e times ``weight[e]`` ([E, in, out], any strides)."""
        if self.grouped:
            return torch._grouped_mm(h, weight, offs=self.offs)
        outs = [rows @ weight[e] for e, rows in enumerate(h.split(self.sizes))]
        return torch.cat(outs) if outs else h.new_zeros(0, weight.shape[-1])

    def bias(self, b: torch.Tensor) -> torch.Tensor:
        """Each row's expert bias, from ``b`` [E, out]."""
        return b[self.row_expert]

    def lora(self, h: torch.Tensor, adapter: nn.Module) -> torch.Tensor:
        """Rows of group e times expert e's low-rank update: ``scaling * (h A_e^T) B_e^T`` (an ``ExpertLoRA``:
        A [E, r, in], B [E, out, r]); two grouped matmuls through the rank, never the [E, out, in] product.

        ``torch._grouped_mm`` wants 16-byte strides, so on the grouped path a rank that is not a multiple of
        16 bytes is padded with zero rows of A / columns of B (exact: they add zeros)."""
        a, b = adapter.lora_a.weight, adapter.lora_b.weight
        if self.grouped:
            multiple = max(1, 16 // a.element_size())
            pad = -a.shape[1] % multiple
            if pad:
                a, b = F.pad(a, (0, 0, 0, pad)), F.pad(b, (0, pad))
        return self.mm(self.mm(h, a.transpose(-2, -1)), b.transpose(-2, -1)) * adapter.scaling


class GroupedExperts(nn.Module):
    """``n_experts`` SwiGLU MLPs as stacked weights in HF's per-expert Linear layout:
    w1 (gate) [E, hidden, dim], w3 (up) [E, hidden, dim], w2 (down) [E, dim, hidden].

    With LoRA (target ``experts``), ``lora`` holds two ``ExpertLoRA``: ``gate_up`` (dim -> 2 * hidden: one
    adapter over gate and up together, rows [gate; up], as transformers' fused ``gate_up_proj``) and ``down``.
    """

    def __init__(self, dim: int, hidden_dim: int, n_experts: int) -> None:
        super().__init__()
        self.n_experts = n_experts
        self.hidden_dim = hidden_dim
        self.w1 = nn.Parameter(torch.empty(n_experts, hidden_dim, dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, hidden_dim))
        self.w3 = nn.Parameter(torch.empty(n_experts, hidden_dim, dim))
        self.lora: nn.ModuleDict | None = None  # ExpertLoRA slots, set by posttrain.models.common.lora.apply_lora

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [N, dim] sorted by expert, ``counts[e]`` rows for expert e; returns [N, dim]."""
        groups = ExpertGroups(x, counts)
        h = groups.pad(x)
        gate, up = groups.mm(h, self.w1.transpose(-2, -1)), groups.mm(h, self.w3.transpose(-2, -1))
        if self.lora is not None:
            gate_up = groups.lora(h, self.lora["gate_up"])
            gate, up = gate + gate_up[:, : self.hidden_dim], up + gate_up[:, self.hidden_dim :]
        h = F.silu(gate) * up
        out = groups.mm(h, self.w2.transpose(-2, -1))
        if self.lora is not None:
            out = out + groups.lora(h, self.lora["down"])
        return groups.unpad(out)

    def lora_shapes(self) -> dict[str, tuple[int, int]]:
        """Adapter slots for LoRA on the experts: name -> (in, out)."""
        dim = self.w1.shape[-1]
        return {"gate_up": (dim, 2 * self.hidden_dim), "down": (self.hidden_dim, dim)}

    def lora_update(self, param_name: str, deltas: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The slice of the slots' updates (``deltas[slot]`` [E, out, in]) that merges into ``param_name``."""
        rows = {"w1": slice(0, self.hidden_dim), "w3": slice(self.hidden_dim, 2 * self.hidden_dim)}
        if param_name in rows:
            return deltas["gate_up"][:, rows[param_name]]
        return deltas["down"] if param_name == "w2" else None

    def init_weights(self, init_std: float, out_std: float) -> None:
        nn.init.normal_(self.w1, std=init_std)
        nn.init.normal_(self.w3, std=init_std)
        nn.init.normal_(self.w2, std=out_std)


def sort_by_expert(top_i: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For routed slots ``top_i`` [T, k]: (order of the flattened slots by expert, the token of each sorted
    slot, routed slots per expert [E])."""
    flat = top_i.reshape(-1)
    order = torch.argsort(flat, stable=True)
    # scatter_add, not bincount: bincount's output size depends on the data (a host sync on accelerators)
    counts = torch.zeros(n_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    return order, order // top_i.shape[1], counts


def load_balancing_loss(probs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Switch-Transformer loss ``E * sum_e (count_e / T) * mean_t probs[t, e]`` for one layer; probs [T, E] is
    the full softmax over experts."""
    return probs.shape[1] * (counts.to(probs.dtype) / probs.shape[0] * probs.mean(0)).sum()


class MoE(nn.Module):
    """Top-k routed experts: ``router`` (Linear dim -> n_experts, no bias) and ``experts``."""

    def __init__(self, dim: int, hidden_dim: int, n_experts: int, top_k: int, *, norm_topk_prob: bool) -> None:
        super().__init__()
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k ({top_k}) must be between 1 and n_experts ({n_experts})")
        self.n_experts = n_experts
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob
        self.router = nn.Linear(dim, n_experts, bias=False)
        self.experts = GroupedExperts(dim, hidden_dim, n_experts)
        self.aux_loss: torch.Tensor | None = None
        self.tokens_per_expert: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = self.router(x)
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)
        top_p, top_i = torch.topk(probs, self.top_k, dim=-1)  # [T, k]
        if self.norm_topk_prob:
            top_p = top_p / top_p.sum(dim=-1, keepdim=True)
        top_p = top_p.to(x.dtype)

        order, token_idx, counts = sort_by_expert(top_i, self.n_experts)
        out = self.experts(x[token_idx], counts) * top_p.reshape(-1)[order, None]
        y = torch.zeros_like(x).index_add_(0, token_idx, out.to(x.dtype))

        self.tokens_per_expert = counts.detach()
        self.aux_loss = load_balancing_loss(probs, counts)
        return y.reshape(shape)

    def init_weights(self, init_std: float, out_std: float) -> None:
        nn.init.normal_(self.router.weight, std=init_std)
        self.experts.init_weights(init_std, out_std)


def expert_load_imbalance(counts: torch.Tensor) -> torch.Tensor:
    """max / mean routed tokens per expert (1 = perfectly balanced)."""
    counts = counts.float()
    return counts.max() / counts.mean().clamp_min(1e-9)


__all__ = [
    "EXPERTS_PATHS", "GROUPED_MM_ALIGN", "ExpertGroups", "GroupedExperts", "MoE", "expert_load_imbalance",
    "grouped_mm_supported", "load_balancing_loss", "sort_by_expert", "use_grouped_mm",
]


class MoEModelHooks:
    """What the SFT loss and the trainer's MFU ask of an MoE model, shared by the MoE families. A model lists
    this before `Transformer` in its bases and sets `moe_layer_type` (the module class holding `aux_loss` and
    `tokens_per_expert`); its args carry `router_aux_loss_coef`, `n_experts` and `n_experts_per_tok`."""

    moe_layer_type: type[nn.Module]

    def moe_layers(self) -> list[nn.Module]:
        return [m for m in self.modules() if isinstance(m, self.moe_layer_type)]

    def moe_aux_loss(self) -> torch.Tensor | None:
        """``router_aux_loss_coef`` * the mean over MoE layers of their load-balancing loss in the last
        forward (differentiable); None when the coefficient is 0 or nothing was routed yet."""
        losses = [m.aux_loss for m in self.moe_layers() if m.aux_loss is not None]
        if not losses or self.args.router_aux_loss_coef == 0:
            return None
        return self.args.router_aux_loss_coef * torch.stack(losses).mean()

    @torch.no_grad()
    def moe_metrics(self) -> dict[str, torch.Tensor]:
        """Routing statistics of the last forward: the raw load-balancing loss (mean over layers) and the
        load imbalance (max / mean tokens per expert, mean over layers; 1 = balanced)."""
        layers = [m for m in self.moe_layers() if m.tokens_per_expert is not None]
        if not layers:
            return {}
        return {
            "moe_aux_loss": torch.stack([m.aux_loss.detach().float() for m in layers]).mean(),
            "moe_load_imbalance": torch.stack([expert_load_imbalance(m.tokens_per_expert) for m in layers]).mean(),
        }

    def tokens_per_expert(self) -> dict[str, torch.Tensor]:
        """Routed (token, slot) counts per expert of the last forward, by layer name."""
        return {
            name: m.tokens_per_expert
            for name, m in self.named_modules()
            if isinstance(m, self.moe_layer_type) and m.tokens_per_expert is not None
        }

    def param_active_fraction(self, name: str) -> float:
        """The share of parameter ``name`` one token computes with: top_k / n_experts for expert weights,
        1 otherwise. The trainer's MFU uses it to count active parameters only."""
        if ".experts." in f".{name}":
            return self.args.n_experts_per_tok / self.args.n_experts
        return 1.0

    def active_params_per_token(self) -> int:
        """Parameters one token computes with: attention, router, top_k experts per MoE layer, the output head
        (not an untied input embedding: a lookup is no matmul). What MFU counts; gpt-oss-120b: 5.13B."""
        return sum(
            int(p.shape.numel() * self.param_active_fraction(n))
            for n, p in self.named_parameters()
            if self.args.tie_embeddings or not n.startswith("tok_embeddings.")
        )
