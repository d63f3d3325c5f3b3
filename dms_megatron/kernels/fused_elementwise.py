"""One-kernel RMSNorm and rotary embedding (Triton) for the decode step, and the rotary for training,
each rounding as the torch composition it replaces does, op by op, so 16-bit results equal it:

* ``rms_norm(x, w, eps)``: ``(x.float() * rsqrt(mean(x.float()^2) + eps)).to(x.dtype) * w`` (the
  Llama / Qwen RMSNorm of transformers: normalised in fp32, cast back, then scaled) in one launch
  instead of ~7 kernels;
* ``rotary(q, k, cos, sin)``: the rotate-half RoPE ``x * cos + cat(-x2, x1) * sin`` of q ``[T, Hq, D]``
  and k ``[T, Hkv, D]`` together, one launch instead of ~10;
* ``silu_mul(gate, up)``: the gated MLP's ``silu(gate) * up``, one launch instead of two;
* ``rotary_with_grad``: ``rotary`` with its backward (one launch each way), for training: megatron's
  unfused RoPE, which the DMS attention of packed sequences uses, is ~12 kernels per q or k forward.

The rotary kernel launches with ``enable_fp_fusion=False``: Triton's default lets the compiler contract
a product and a sum into one FMA, which skips a rounding torch does. With it the bf16 GPU test failed on
an H100 (not bit-equal to torch); with fusion off it passes bit-equal (H100, 2026-12-07).

On CPU they run only under ``TRITON_INTERPRET=1`` (tests; the interpreter rounds fp32 -> bf16 toward
zero, so only fp16 and fp32 compare there); the inference model uses them on the
``fused`` decode path (``CompressedKV(backend="fused")``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dms_megatron.kernels.triton_device import require_triton_device


@triton.jit
def _rms_norm_kernel(X, W, Y, n_cols, sx, sy, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    x = tl.load(X + row * sx + cols, mask=ok, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    xn = (x * rstd).to(X.dtype.element_ty).to(tl.float32)  # cast back to the input dtype, as HF does
    w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(Y + row * sy + cols, (xn * w).to(Y.dtype.element_ty), mask=ok)


@triton.jit
def _rotary_kernel(Q, K, QO, KO, COS, SIN, sqt, sqh, skt, skh, sqot, sqoh, skot, skoh, sct,
                   HQ: tl.constexpr, HALF: tl.constexpr, ROUND: tl.constexpr):  # fmt: skip
    t = tl.program_id(0)
    h = tl.program_id(1)
    lo = tl.arange(0, HALF)
    is_q = h < HQ
    src = tl.where(is_q, Q + t * sqt + h * sqh, K + t * skt + (h - HQ) * skh)
    dst = tl.where(is_q, QO + t * sqot + h * sqoh, KO + t * skot + (h - HQ) * skoh)
    x1 = tl.load(src + lo).to(tl.float32)
    x2 = tl.load(src + HALF + lo).to(tl.float32)
    c1 = tl.load(COS + t * sct + lo).to(tl.float32)
    c2 = tl.load(COS + t * sct + HALF + lo).to(tl.float32)
    s1 = tl.load(SIN + t * sct + lo).to(tl.float32)
    s2 = tl.load(SIN + t * sct + HALF + lo).to(tl.float32)
    a1, b1 = x1 * c1, -x2 * s1
    a2, b2 = x2 * c2, x1 * s2
    if ROUND:  # 16-bit: each product rounded before the sum, as the torch ops are
        a1, b1 = a1.to(Q.dtype.element_ty).to(tl.float32), b1.to(Q.dtype.element_ty).to(tl.float32)
        a2, b2 = a2.to(Q.dtype.element_ty).to(tl.float32), b2.to(Q.dtype.element_ty).to(tl.float32)
    tl.store(dst + lo, (a1 + b1).to(QO.dtype.element_ty))
    tl.store(dst + HALF + lo, (a2 + b2).to(QO.dtype.element_ty))


@triton.jit
def _silu_mul_kernel(G, U, Y, n, sg, su, sy, BLOCK: tl.constexpr, ROUND: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    g = tl.load(G + row * sg + offs, mask=ok, other=0.0).to(tl.float32)
    s = g / (1.0 + tl.exp(-g))
    if ROUND:  # 16-bit: silu's result rounded before the product, as torch's two ops do
        s = s.to(G.dtype.element_ty).to(tl.float32)
    u = tl.load(U + row * su + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(Y + row * sy + offs, (s * u).to(Y.dtype.element_ty), mask=ok)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of ``x`` (any leading shape), output in ``x.dtype`` promoted with
    ``weight.dtype``; see the module docstring."""
    require_triton_device(x, "rms_norm")
    d = x.shape[-1]
    rows = x.reshape(-1, d)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    if rows.shape[0]:
        _rms_norm_kernel[(rows.shape[0],)](
            rows, weight.contiguous(), out, d, rows.stride(0), out.stride(0), float(eps),
            BLOCK=triton.next_power_of_2(d),
        )  # fmt: skip
    return out.view(*x.shape[:-1], d)


def rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half RoPE of ``q [T, Hq, D]`` and ``k [T, Hkv, D]`` (same dtype) with ``cos, sin [T, D]``
    of the tokens' positions, in one launch; see the module docstring."""
    require_triton_device(q, "rotary")
    T, HQ, D = q.shape
    if k.dtype != q.dtype or k.shape[0] != T or k.shape[2] != D or D % 2 or D & (D - 1):
        raise ValueError(f"rotary needs q, k of one dtype and a power-of-two head dim: {q.shape}, {k.shape}")
    q, k = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k))  # any other strides are read
    cos, sin = cos.to(q.dtype).contiguous(), sin.to(q.dtype).contiguous()
    qo = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    ko = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if T:
        _rotary_kernel[(T, HQ + k.shape[1])](
            q, k, qo, ko, cos, sin, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            qo.stride(0), qo.stride(1), ko.stride(0), ko.stride(1), cos.stride(0),
            HQ=HQ, HALF=D // 2, ROUND=q.dtype != torch.float32,
            enable_fp_fusion=False,  # no mul + add -> FMA contraction: each product rounded, as torch does
        )  # fmt: skip
    return qo, ko


class _RotaryQK(torch.autograd.Function):
    """``rotary`` with a gradient. The rotate-half RoPE's transpose is the same rotation with the sine
    table negated and its halves swapped (``sin_back``): the backward is one launch too, and rounds as
    autograd through the torch composition does (each product, then the sum)."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, sin_back):  # type: ignore[override]
        ctx.save_for_backward(cos, sin_back)
        return rotary(q, k, cos, sin)

    @staticmethod
    def backward(ctx, dq, dk):  # type: ignore[override]
        cos, sin_back = ctx.saved_tensors
        dq, dk = rotary(dq, dk, cos, sin_back)
        return dq, dk, None, None, None


def rotary_tables(
    freqs: torch.Tensor, dtype: torch.dtype, mscale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(cos, sin, sin_back)`` ``[T, D]`` for ``rotary_with_grad`` from per-token RoPE angles ``freqs``
    (``[T, ..., D]``, megatron's layout), rounded as megatron's unfused RoPE rounds them:
    ``(cos(freqs) * mscale).to(dtype)``; ``sin_back`` = ``cat(-sin2, -sin1)``, the backward's table."""
    f = freqs.reshape(freqs.shape[0], freqs.shape[-1])
    cos = (torch.cos(f) * mscale).to(dtype)
    sin = (torch.sin(f) * mscale).to(dtype)
    half = sin.shape[-1] // 2
    return cos, sin, torch.cat((-sin[:, half:], -sin[:, :half]), dim=-1)


def rotary_with_grad(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sin_back: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``rotary(q, k, cos, sin)`` that autograd differentiates in one launch (tables: ``rotary_tables``)."""
    return _RotaryQK.apply(q, k, cos, sin, sin_back)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of ``[T, N]`` inputs (same shape and dtype; rows may be strided, e.g. the
    halves of one merged projection) in one launch; see the module docstring."""
    require_triton_device(gate, "silu_mul")
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.dim() != 2:
        raise ValueError(f"silu_mul needs 2-D gate and up of one shape and dtype: {gate.shape}, {up.shape}")
    gate, up = (x if x.stride(-1) == 1 else x.contiguous() for x in (gate, up))
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    T, n = gate.shape
    if T and n:
        _silu_mul_kernel[(T, triton.cdiv(n, 1024))](
            gate, up, out, n, gate.stride(0), up.stride(0), out.stride(0),
            BLOCK=1024, ROUND=gate.dtype != torch.float32,
        )  # fmt: skip
    return out
