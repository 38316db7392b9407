"""Distillation divergences against direct computations; the chunked loss against the unchunked one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from posttrain.losses.distillation import chunked_distillation_loss, token_divergence


def _kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return (p * (p.log() - q.log())).sum(-1)


@pytest.fixture
def logits() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return torch.randn(5, 9, dtype=torch.float64) * 2, torch.randn(5, 9, dtype=torch.float64) * 2


def test_forward_and_reverse_kl_with_temperature(logits) -> None:
    s, t = logits
    temperature = 2.0
    p, q = F.softmax(t / temperature, -1), F.softmax(s / temperature, -1)
    forward = token_divergence(s, t, kind="forward_kl", temperature=temperature)
    reverse = token_divergence(s, t, kind="reverse_kl", temperature=temperature)
    assert torch.allclose(forward.double(), _kl(p, q) * temperature**2, atol=1e-5)
    assert torch.allclose(reverse.double(), _kl(q, p) * temperature**2, atol=1e-5)


def test_generalized_jsd(logits) -> None:
    s, t = logits
    beta = 0.3
    p, q = F.softmax(t, -1), F.softmax(s, -1)
    m = beta * p + (1 - beta) * q
    expected = beta * _kl(p, m) + (1 - beta) * _kl(q, m)
    assert torch.allclose(token_divergence(s, t, kind="jsd", jsd_beta=beta).double(), expected, atol=1e-5)
    with pytest.raises(ValueError, match="jsd_beta"):
        token_divergence(s, t, kind="jsd", jsd_beta=1.0)


def test_divergences_vanish_when_student_equals_teacher(logits) -> None:
    s, _ = logits
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        assert token_divergence(s, s.clone(), kind=kind).abs().max() < 1e-6


def _direct(student_h, student_w, teacher_h, teacher_w, labels, vocab, kind, temperature):
    keep = labels != -100
    s_logits = (student_h[keep] @ student_w[:vocab].T).float()
    t_logits = (teacher_h[keep] @ teacher_w[:vocab].T).float()
    div = token_divergence(s_logits, t_logits, kind=kind, temperature=temperature).sum()
    ce = F.cross_entropy(s_logits, labels[keep], reduction="sum")
    kl = token_divergence(s_logits, t_logits, kind="forward_kl").sum()
    return div, ce, kl


@pytest.mark.parametrize("kind,temperature", [("forward_kl", 1.0), ("reverse_kl", 2.0), ("jsd", 1.5)])
def test_chunked_loss_matches_direct_computation_with_masked_positions(kind: str, temperature: float) -> None:
    torch.manual_seed(1)
    vocab, dim_s, dim_t = 13, 6, 10  # teacher wider than the student; both heads padded to 16 rows
    student_h = torch.randn(2, 5, dim_s, requires_grad=True)
    student_w = torch.randn(16, dim_s, requires_grad=True)
    teacher_h, teacher_w = torch.randn(2, 5, dim_t), torch.randn(16, dim_t)
    labels = torch.tensor([[1, -100, 3, 12, -100], [-100, -100, 0, 5, 7]])
    div, ce, kl, n = chunked_distillation_loss(
        student_h, student_w, teacher_hidden=teacher_h, teacher_weight=teacher_w, labels=labels,
        vocab_size=vocab, kind=kind, temperature=temperature, chunk_size=2,
    )
    assert n.item() == 6
    sh = student_h.detach().clone().requires_grad_(True)
    sw = student_w.detach().clone().requires_grad_(True)
    e_div, e_ce, e_kl = _direct(sh, sw, teacher_h, teacher_w, labels, vocab, kind, temperature)
    assert torch.allclose(div, e_div, atol=1e-5) and torch.allclose(ce, e_ce, atol=1e-5)
    assert torch.allclose(kl, e_kl, atol=1e-5) and not kl.requires_grad
    (0.3 * ce + 0.7 * div).backward()
    (0.3 * e_ce + 0.7 * e_div).backward()
    assert torch.allclose(student_h.grad, sh.grad, atol=1e-5)
    assert torch.allclose(student_w.grad, sw.grad, atol=1e-5)
    assert student_h.grad[0, 1].abs().sum() == 0  # an unlabelled position gets no gradient
    assert student_w.grad[vocab:].abs().sum() == 0  # padded vocabulary rows are never used


def test_chunked_loss_with_no_trained_position_is_zero() -> None:
    h = torch.randn(1, 3, 4, requires_grad=True)
    div, ce, kl, n = chunked_distillation_loss(
        h, torch.randn(8, 4), teacher_hidden=torch.randn(1, 3, 4), teacher_weight=torch.randn(8, 4),
        labels=torch.full((1, 3), -100), vocab_size=8,
    )
    assert n.item() == 0 and div.item() == 0 and ce.item() == 0 and kl.item() == 0
