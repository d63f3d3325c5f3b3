"""The fused Triton DMS attention on a GPU: equal to the float64 reference over randomized shapes,
windows, document layouts and seeds (fp32 tight, bf16 within bf16 tolerance), at the GPU tilings; two
runs bitwise identical; and close to the FlexAttention backend at a 32B-at-TP=8 shape."""

from __future__ import annotations

import random

import pytest
import torch

from dms_megatron.kernels import dms_attention


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error, measured against at least an RMS of 1e-2: a gradient that is zero in exact
    arithmetic (dQ, dK with one key per query: the softmax is constant) leaves only rounding."""
    floor = 1e-2 * b.numel() ** 0.5
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=floor))


def _case(seed: int) -> dict:
    rng = random.Random(seed)
    T = rng.choice([1, 63, 200, 777, 1500])
    return {
        "B": rng.choice([1, 2]),
        "Hkv": rng.choice([1, 2]),
        "g": rng.choice([1, 4, 5]),
        "T": T,
        "D": rng.choice([64, 128]),
        "window": rng.choice([0, 1, 64, 256, T + 1]),
        "docs": rng.random() < 0.4,
        "bias": rng.random() < 0.85,
    }


def _run(case: dict, dtype: torch.dtype, backend: str, seed: int):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    B, Hkv, T, D = case["B"], case["Hkv"], case["T"], case["D"]
    Hq = Hkv * case["g"]

    def mk(*s):
        return torch.randn(*s, device="cuda", generator=gen, dtype=torch.float64)

    q, k, v, gout = mk(B, Hq, T, D), mk(B, Hkv, T, D), mk(B, Hkv, T, D), mk(B, Hq, T, D)
    relaxed = mk(B, Hkv, T) * 3 if case["bias"] else None
    doc_ids = None
    if case["docs"]:
        doc_ids = torch.cumsum((torch.rand(B, T, device="cuda", generator=gen) < 0.01).long(), dim=1)
    leaves = [q.to(dtype), k.to(dtype), v.to(dtype)] + ([relaxed.float()] if relaxed is not None else [])
    if backend == "reference":
        leaves = [x.double() for x in leaves]
    leaves = [x.clone().requires_grad_() for x in leaves]
    rel = leaves[3] if relaxed is not None else None
    out = dms_attention(*leaves[:3], rel, case["window"], doc_ids=doc_ids, backend=backend)
    grads = torch.autograd.grad(out, leaves, gout.to(out.dtype))
    return [out.detach(), *grads]


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 2e-3), (torch.bfloat16, 3e-2)])
def test_triton_equals_the_float64_reference(seed, dtype, tol):
    case = _case(seed)
    fast = _run(case, dtype, "triton", seed)
    ref = _run(case, dtype, "reference", seed)
    names = ["out", "dq", "dk", "dv", "devict_logits"][: len(fast)]
    errs = {n: _rel(a, b) for n, a, b in zip(names, fast, ref, strict=True)}
    print(case, dtype, {n: f"{e:.1e}" for n, e in errs.items()})
    assert all(e < tol for e in errs.values()), (case, errs)


def test_two_runs_are_bitwise_identical():
    case = {"B": 1, "Hkv": 1, "g": 5, "T": 4096, "D": 128, "window": 256, "docs": True, "bias": True}
    first = _run(case, torch.bfloat16, "triton", 7)
    again = _run(case, torch.bfloat16, "triton", 7)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


def test_triton_close_to_flex_at_the_32b_tp8_shape():
    case = {"B": 1, "Hkv": 1, "g": 5, "T": 8192, "D": 128, "window": 256, "docs": False, "bias": True}
    fast = _run(case, torch.bfloat16, "triton", 3)
    flex = _run(case, torch.bfloat16, "flex", 3)
    errs = [_rel(a, b) for a, b in zip(fast, flex, strict=True)]
    assert max(errs) < 3e-2, errs
