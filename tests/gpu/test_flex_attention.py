"""FlexAttention DMS backend == the core reference (fp32, outputs and all four gradients), and no
dynamo recompilation across steps / layers / new bias tensors."""

from __future__ import annotations

import pytest
import torch

from dms_megatron.core import dms_attention_reference
from dms_megatron.kernels import dms_attention


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


@pytest.mark.parametrize(
    ("B", "Hq", "Hkv", "T", "window", "docs"),
    [(2, 5, 1, 1000, 64, False), (1, 8, 2, 2048, 256, False), (2, 4, 2, 777, 32, True)],
)
def test_flex_matches_reference_fp32(B, Hq, Hkv, T, window, docs):
    gen = torch.Generator(device="cuda").manual_seed(B * 1000 + T)
    mk = lambda *s: torch.randn(*s, device="cuda", generator=gen)  # noqa: E731
    q, k, v = mk(B, Hq, T, 64), mk(B, Hkv, T, 64), mk(B, Hkv, T, 64)
    relaxed = mk(B, Hkv, T) * 3
    doc_ids = None
    if docs:
        doc_ids = torch.cumsum((torch.rand(B, T, device="cuda", generator=gen) < 0.01).long(), dim=1)
    grads = {}
    for backend in ("flex", "reference"):
        inputs = [t.clone().requires_grad_() for t in (q, k, v, relaxed)]
        out = dms_attention(*inputs, window=window, doc_ids=doc_ids, backend=backend)
        gout = torch.randn(out.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(5))
        out.backward(gout)
        grads[backend] = [out.detach(), *(t.grad for t in inputs)]
    names = ["out", "dq", "dk", "dv", "devict_logits"]
    errs = {n: _rel(f, r) for n, f, r in zip(names, grads["flex"], grads["reference"], strict=True)}
    print("relative errors flex vs reference:", {n: f"{e:.2e}" for n, e in errs.items()})
    assert all(e < 1e-4 for e in errs.values()), errs


def test_flex_does_not_recompile_across_layers_and_steps():
    from torch._dynamo.utils import counters

    B, Hq, Hkv, T = 1, 4, 1, 512
    q, k, v = (torch.randn(B, h, T, 64, device="cuda", requires_grad=True) for h in (Hq, Hkv, Hkv))

    def step():
        relaxed = torch.randn(B, Hkv, T, device="cuda", requires_grad=True)  # a new bias every call
        dms_attention(q, k, v, relaxed, window=64, backend="flex").sum().backward()

    step()
    step()
    before = dict(counters["stats"])
    for _ in range(6):
        step()
    assert dict(counters["stats"]) == before, (before, dict(counters["stats"]))


def test_flex_bf16_close_to_fp32_reference():
    B, Hq, Hkv, T = 1, 5, 1, 4096
    q, k, v = (torch.randn(B, h, T, 128, device="cuda") for h in (Hq, Hkv, Hkv))
    relaxed = torch.randn(B, Hkv, T, device="cuda") * 3
    ref = dms_attention_reference(q, k, v, relaxed, window=256)
    out = dms_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), relaxed, window=256, backend="flex")
    assert out.dtype == torch.bfloat16
    assert _rel(out, ref) < 1e-2


def test_flex_layer_does_not_synchronise_after_the_first_call():
    """Each layer's call used to copy the window to the GPU (one stream sync per layer per micro-batch):
    after a warm-up call, forward and backward run with CUDA's sync debug mode set to error."""
    gen = torch.Generator(device="cuda").manual_seed(11)
    mk = lambda *s: torch.randn(*s, device="cuda", generator=gen, requires_grad=True)  # noqa: E731
    B, Hq, Hkv, T = 1, 4, 2, 512
    doc_ids = (torch.arange(T, device="cuda") >= 200).long()[None]
    for checked in (False, True):
        q, k, v, relaxed = mk(B, Hq, T, 64), mk(B, Hkv, T, 64), mk(B, Hkv, T, 64), mk(B, Hkv, T)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error" if checked else "default")
        try:
            out = dms_attention(q, k, v, relaxed, window=64, doc_ids=doc_ids, backend="flex")
            out.sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert relaxed.grad is not None and bool(torch.isfinite(relaxed.grad).all())
