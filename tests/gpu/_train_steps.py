"""A few optimizer steps on one packed batch, as the trainer takes them: chunked cross-entropy inside the forward,
a token mean, gradient clipping, the project's AdamW (fused on CUDA)."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from posttrain.config.sections import OptimizerSection
from posttrain.losses import chunked_cross_entropy
from posttrain.models.sharded_load import canonical_name
from posttrain.optim import build_optimizer

DOCUMENTS = (25, 15)  # row 0 packs two documents; row 1 is one document of their total length


@dataclass
class Batch:
    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    document_ids: torch.Tensor

    def to(self, device: torch.device) -> Batch:
        return Batch(*(t.to(device) for t in (self.input_ids, self.labels, self.position_ids, self.document_ids)))


def packed_batch(vocab: int, seed: int = 0) -> Batch:
    seq = sum(DOCUMENTS)
    ids = torch.randint(0, vocab, (2, seq), generator=torch.Generator().manual_seed(seed))
    position_ids = torch.stack([torch.cat([torch.arange(n) for n in DOCUMENTS]), torch.arange(seq)])
    document_ids = torch.stack([torch.cat([torch.full((n,), i) for i, n in enumerate(DOCUMENTS)]),
                                torch.zeros(seq, dtype=torch.long)])
    labels = ids.roll(-1, dims=1)
    labels[0, DOCUMENTS[0] - 1] = -100  # no target across a document boundary
    labels[:, -1] = -100
    labels[1, :5] = -100  # an untrained prompt
    return Batch(ids, labels, position_ids, document_ids)


def train_steps(
    model: nn.Module, batch: Batch, *, steps: int = 3, lr: float = 1e-3, autocast_bf16: bool = False
) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Losses of ``steps`` optimizer steps, and the first step's gradients (by canonical parameter name: no
    compile or checkpointing wrappers; on the CPU)."""
    device = next(model.parameters()).device
    vocab = model.args.vocab_size
    optimizer = build_optimizer(model, OptimizerSection(lr=lr, weight_decay=0.01), device)
    params = [p for p in model.parameters() if p.requires_grad]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if autocast_bf16 else nullcontext()
    losses, first_grads = [], {}
    for step in range(steps):
        with autocast:
            loss_sum, n_tokens = model(
                batch.input_ids, position_ids=batch.position_ids, document_ids=batch.document_ids,
                output_fn=lambda h, w: chunked_cross_entropy(h, w, batch.labels, vocab_size=vocab, chunk_size=37),
            )
        loss = loss_sum / n_tokens
        loss.backward()
        if step == 0:
            first_grads = {canonical_name(n): p.grad.detach().float().cpu().clone()  # clipping works in place
                           for n, p in model.named_parameters() if p.requires_grad}
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, first_grads


def max_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, str]:
    """The largest per-tensor max |a - b| / max |b| over matching names, and that tensor's name."""
    worst = (0.0, "")
    for name, want in b.items():
        rel = ((a[name] - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()
        worst = max(worst, (rel, name))
    return worst
