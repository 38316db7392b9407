"""The sdpa and flex attention backends agree, and packed documents do not see each other."""

from __future__ import annotations

import pytest
import torch

from posttrain.models import build_model
from posttrain.models.common.attention import (
    FlexBackend,
    SDPABackend,
    document_ids_from_position_ids,
    sliding_window_mask_mod,
)

LENGTHS = [7, 12, 5]  # three documents packed into one row of 24


def _packed_row(vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, vocab, (1, sum(LENGTHS)))
    position_ids = torch.cat([torch.arange(n) for n in LENGTHS]).unsqueeze(0)
    document_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(LENGTHS)]).unsqueeze(0)
    return ids, position_ids, document_ids


def _qkv(batch: int = 2, seq_len: int = 24) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.randn(batch, 4, seq_len, 16), torch.randn(batch, 2, seq_len, 16), torch.randn(batch, 2, seq_len, 16)


@pytest.mark.parametrize("extra", [None, sliding_window_mask_mod(4)], ids=["causal_doc", "sliding_window"])
def test_sdpa_and_flex_give_the_same_attention(extra) -> None:
    torch.manual_seed(0)
    q, k, v = _qkv()
    document_ids = torch.tensor([[0] * 10 + [1] * 14, [0] * 3 + [1] * 3 + [2] * 18])
    outs = []
    for backend in (SDPABackend(), FlexBackend()):
        mask = backend.build_mask(document_ids, batch=2, seq_len=24, device=q.device, extra_mask_mod=extra)
        outs.append(backend(q, k, v, mask))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def test_sdpa_causal_fast_path_equals_dense_single_document_mask() -> None:
    q, k, v = _qkv()
    backend = SDPABackend()
    assert backend.build_mask(None, batch=2, seq_len=24, device=q.device) is None
    dense = backend.build_mask(torch.zeros(2, 24, dtype=torch.long), batch=2, seq_len=24, device=q.device)
    torch.testing.assert_close(backend(q, k, v, None), backend(q, k, v, dense), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("attn_backend", ["sdpa", "flex"])
@pytest.mark.parametrize("family", ["llama3", "qwen3"])
def test_packed_documents_match_running_each_alone(family: str, attn_backend: str) -> None:
    torch.manual_seed(0)
    model = build_model(family, "debug", "cpu", attn_backend=attn_backend).eval()
    ids, position_ids, document_ids = _packed_row(model.args.vocab_size)
    with torch.no_grad():
        packed = model(ids, position_ids=position_ids, document_ids=document_ids)
        alone = torch.cat([model(doc) for doc in ids.split(LENGTHS, dim=1)], dim=1)
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)


def test_packing_without_document_ids_leaks_across_documents() -> None:
    """Guards the test above: restarting positions alone do not isolate documents."""
    torch.manual_seed(0)
    model = build_model("llama3", "debug", "cpu").eval()
    ids, position_ids, document_ids = _packed_row(model.args.vocab_size)
    with torch.no_grad():
        leaky = model(ids, position_ids=position_ids)
        isolated = model(ids, position_ids=position_ids, document_ids=document_ids)
    first = LENGTHS[0]
    torch.testing.assert_close(leaky[:, :first], isolated[:, :first])
    assert not torch.allclose(leaky[:, first:], isolated[:, first:])


def test_mask_is_built_once_per_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    model = build_model("qwen3", "debug", "cpu")
    calls = []
    original = model.attn_backend.build_mask
    monkeypatch.setattr(model.attn_backend, "build_mask", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    ids, position_ids, document_ids = _packed_row(model.args.vocab_size)
    with torch.no_grad():
        model(ids, position_ids=position_ids, document_ids=document_ids)
    assert len(calls) == 1


def test_document_ids_from_restarting_position_ids() -> None:
    _, position_ids, document_ids = _packed_row(10)
    assert torch.equal(document_ids_from_position_ids(position_ids), document_ids)


def test_output_fn_receives_hidden_states_and_padded_head() -> None:
    model = build_model("llama3", "debug", "cpu", vocab_size=1000)
    ids = torch.randint(0, 1000, (2, 8))
    hidden, weight = model(ids, output_fn=lambda h, w: (h, w))
    assert hidden.shape == (2, 8, model.args.dim) and weight.shape == (1024, model.args.dim)
    torch.testing.assert_close((hidden @ weight.T)[..., :1000], model(ids))


def test_pinned_sdpa_kernel_gives_the_same_attention_and_bad_names_are_refused() -> None:
    """model.sdpa_kernel pins SDPA's kernel (on the CPU only 'math' differs from torch's own choice); the model
    args carry it to every layer, and an unknown name is a one-line ValueError naming the choices."""
    q, k, v = _qkv()
    mask = SDPABackend().build_mask(None, batch=2, seq_len=24, device=torch.device("cpu"))
    torch.testing.assert_close(SDPABackend("math")(q, k, v, mask), SDPABackend("auto")(q, k, v, mask))
    model = build_model("llama3", "debug", device="cpu", attn_backend="sdpa", sdpa_kernel="math")
    assert model.attn_backend.kernel is torch.nn.attention.SDPBackend.MATH
    with pytest.raises(ValueError, match="unknown sdpa_kernel 'fa3'.*cudnn"):
        SDPABackend("fa3")
    with pytest.raises(ValueError, match="sdpa_kernel"):
        build_model("llama3", "debug", device="cpu", attn_backend="sdpa", sdpa_kernel="fa3")
