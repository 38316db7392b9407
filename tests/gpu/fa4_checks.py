"""FlashAttention-4 checks, run in a process of their own (switching SDPA's flash kernels to FA4 cannot be undone,
and the tier's other tests share their worker process): ``python fa4_checks.py OUT.json``.

1. The kernel: causal GQA attention, forward and the three input gradients, from bf16 inputs, against the fp32
   math kernel on the same inputs; torch's own pick (cuDNN or FA2) on the same inputs first, as the yardstick.
2. The model: a Llama-shaped model (head size 64 and 128) with ``sdpa_kernel="fa4"``, eager and with compiled
   blocks, against the same weights with torch's own SDPA pick, under bf16 autocast: loss and gradients.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from posttrain.models import build_model
from posttrain.models.common.flash_attention_4 import CALLS, activate_fa4
from posttrain.parallelisms.compile import apply_compile

SHAPES = ((2, 8, 2, 1000, 64), (1, 16, 4, 2048, 128))  # batch, heads, kv heads, positions, head size


def _attention_outputs(q, k, v, backend: SDPBackend | None):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    if backend is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    else:
        with sdpa_kernel([backend]):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    out.backward(torch.ones_like(out) / out.numel() ** 0.5)
    return [out.float(), q.grad.float(), k.grad.float(), v.grad.float()]


def _errors(got, want) -> list[float]:
    return [((g - w).abs().max() / w.abs().max()).item() for g, w in zip(got, want)]


def kernel_inputs(shape, device):
    b, h, kvh, s, d = shape
    g = torch.Generator(device=device).manual_seed(0)
    return [torch.randn(b, n, s, d, device=device, generator=g, dtype=torch.bfloat16) for n in (h, kvh, kvh)]


def model_step(model, ids):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(ids)
    loss = F.cross_entropy(logits.float().flatten(0, 1), ids.roll(-1, 1).flatten())
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


def main(out_path: str) -> None:
    device = torch.device("cuda")
    result: dict = {"kernel": {}, "model": {}}
    references = {}
    for shape in SHAPES:  # before FA4 is switched on: torch's own pick and the fp32 reference
        q, k, v = kernel_inputs(shape, device)
        fp32 = _attention_outputs(q.float(), k.float(), v.float(), SDPBackend.MATH)
        references[shape] = (fp32, _errors(_attention_outputs(q, k, v, None), fp32))
    models = {}
    for head_dim in (64, 128):
        overrides = dict(dim=8 * head_dim, n_heads=8, n_kv_heads=2, head_dim=head_dim, n_layers=2, ffn_dim=1024,
                         vocab_size=2048, attn_backend="sdpa")
        torch.manual_seed(0)
        base = build_model("llama3", "debug", device=device, **overrides)
        ids = torch.randint(0, 2048, (2, 1024), device=device, generator=torch.Generator(device).manual_seed(1))
        models[head_dim] = (overrides, base.state_dict(), ids, model_step(base, ids))

    activate_fa4()
    result["active"] = torch.nn.attention.current_flash_attention_impl()
    for shape in SHAPES:
        fp32, auto_err = references[shape]
        q, k, v = kernel_inputs(shape, device)
        fa4_err = _errors(_attention_outputs(q, k, v, SDPBackend.FLASH_ATTENTION), fp32)
        result["kernel"][str(shape)] = {"auto": auto_err, "fa4": fa4_err}

    for head_dim, (overrides, state, ids, (loss, grads)) in models.items():
        row = {}
        for compiled in (False, True):
            # built on the device (buffers such as RoPE's inv_freq are not in a state dict), then the same weights
            model = build_model("llama3", "debug", device=device, **{**overrides, "sdpa_kernel": "fa4"})
            model.load_state_dict(state)
            if compiled:
                torch._dynamo.reset()
                apply_compile(model, device_type="cuda")
            fa4_loss, fa4_grads = model_step(model, ids)
            rel = {n: ((fa4_grads[n] - g).abs().max() / g.abs().max().clamp_min(1e-12)).item() for n, g in grads.items()}
            worst = max(rel, key=rel.get)
            row["compiled" if compiled else "eager"] = {"loss": fa4_loss, "loss_auto": loss, "grad_rel": rel[worst],
                                                        "worst": worst}
        result["model"][str(head_dim)] = row
    result["calls"] = dict(CALLS)  # every FA4 forward and backward went through this process's adapters
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
