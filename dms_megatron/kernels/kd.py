"""Per-token KL distillation over the vocabulary in three Triton kernels (opt-in: ``dms.kd_backend=triton``).

The math and the contract are ``core.losses.token_kl`` (fp32 statistics, teacher without gradient,
vocabulary optionally sharded over a process group). The torch version walks the vocabulary in chunks
with ~10 elementwise ops per chunk, each writing an ``[N, chunk]`` fp32 temporary; here each row is one
program that streams its logits:

* ``_lse_kernel``: both rows' logsumexp of ``z / tau`` in one read of the student and teacher logits
  (online max / sum); shards are combined by ``core.losses.allreduce_logsumexp``;
* ``_kl_kernel``: the row's KL given the two normalisers (a second read);
* ``_grad_kernel``: the student gradient, written in the logits' dtype (a third read, one write).

On an H100 (2026-12-07) 20x faster than the torch path at both measured shapes: ``dms.kd_backend=auto``
(the default) picks it for CUDA logits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dms_megatron.core.losses import allreduce_logsumexp
from dms_megatron.kernels.triton_device import require_triton_device

_BLOCK = 2048


@triton.jit
def _lse_kernel(ZS, ZT, LSE_S, LSE_T, V, stride, inv_tau, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    m_s = tl.full((), float("-inf"), tl.float32)
    m_t = tl.full((), float("-inf"), tl.float32)
    d_s = tl.zeros((), tl.float32)
    d_t = tl.zeros((), tl.float32)
    for start in range(0, V, BLOCK):
        cols = start + offs
        ok = cols < V
        s = tl.load(ZS + row * stride + cols, mask=ok, other=float("-inf")).to(tl.float32) * inv_tau
        t = tl.load(ZT + row * stride + cols, mask=ok, other=float("-inf")).to(tl.float32) * inv_tau
        new_s = tl.maximum(m_s, tl.max(s, axis=0))
        new_t = tl.maximum(m_t, tl.max(t, axis=0))
        d_s = d_s * tl.exp(m_s - new_s) + tl.sum(tl.exp(s - new_s), axis=0)
        d_t = d_t * tl.exp(m_t - new_t) + tl.sum(tl.exp(t - new_t), axis=0)
        m_s, m_t = new_s, new_t
    tl.store(LSE_S + row, m_s + tl.log(d_s))
    tl.store(LSE_T + row, m_t + tl.log(d_t))


@triton.jit
def _kl_kernel(ZS, ZT, LSE_S, LSE_T, KL, V, stride, inv_tau, REVERSE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    lse_s = tl.load(LSE_S + row)
    lse_t = tl.load(LSE_T + row)
    acc = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, V, BLOCK):
        cols = start + offs
        ok = cols < V
        ls = tl.load(ZS + row * stride + cols, mask=ok, other=0.0).to(tl.float32) * inv_tau - lse_s
        lt = tl.load(ZT + row * stride + cols, mask=ok, other=0.0).to(tl.float32) * inv_tau - lse_t
        term = tl.exp(lt) * (lt - ls) if REVERSE else tl.exp(ls) * (ls - lt)  # KL(T || S) / KL(S || T)
        acc += tl.where(ok, term, 0.0)
    tl.store(KL + row, tl.sum(acc, axis=0))


@triton.jit
def _grad_kernel(ZS, ZT, LSE_S, LSE_T, KL, W, G, V, stride, g_stride, inv_tau,
                 REVERSE: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    lse_s = tl.load(LSE_S + row)
    lse_t = tl.load(LSE_T + row)
    kl = tl.load(KL + row)
    w = tl.load(W + row) * inv_tau
    for start in range(0, V, BLOCK):
        cols = start + offs
        ok = cols < V
        ls = tl.load(ZS + row * stride + cols, mask=ok, other=0.0).to(tl.float32) * inv_tau - lse_s
        lt = tl.load(ZT + row * stride + cols, mask=ok, other=0.0).to(tl.float32) * inv_tau - lse_t
        ps = tl.exp(ls)
        g = ps - tl.exp(lt) if REVERSE else ps * (ls - lt - kl)
        tl.store(G + row * g_stride + cols, (g * w).to(G.dtype.element_ty), mask=ok)


class _FusedTokenKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, zs, zt, tau, reverse, group):  # type: ignore[override]
        N, V = zs.shape
        inv_tau = 1.0 / tau
        lse_s = torch.empty(N, dtype=torch.float32, device=zs.device)
        lse_t = torch.empty_like(lse_s)
        kl = torch.empty_like(lse_s)
        if N:
            _lse_kernel[(N,)](zs, zt, lse_s, lse_t, V, zs.stride(0), inv_tau, BLOCK=_BLOCK)
            lse_s, lse_t = allreduce_logsumexp(lse_s, group), allreduce_logsumexp(lse_t, group)
            _kl_kernel[(N,)](
                zs, zt, lse_s, lse_t, kl, V, zs.stride(0), inv_tau, REVERSE=reverse, BLOCK=_BLOCK
            )
        if group is not None:
            torch.distributed.all_reduce(kl, group=group)
        ctx.save_for_backward(zs, zt, lse_s, lse_t, kl)
        ctx.tau, ctx.reverse = tau, reverse
        return kl

    @staticmethod
    def backward(ctx, grad_kl):  # type: ignore[override]
        zs, zt, lse_s, lse_t, kl = ctx.saved_tensors
        N, V = zs.shape
        grad = torch.empty_like(zs)
        w = grad_kl.float().contiguous()
        if N:
            _grad_kernel[(N,)](zs, zt, lse_s, lse_t, kl, w, grad, V, zs.stride(0), grad.stride(0),
                               1.0 / ctx.tau, REVERSE=ctx.reverse, BLOCK=_BLOCK)  # fmt: skip
        return grad, None, None, None, None


def token_kl_triton(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    reverse: bool = False,
    temperature: float = 1.0,
    group=None,
) -> torch.Tensor:
    """Per-token KL ``[...]`` (fp32) of logits ``[..., V]`` (fp32 / bf16 / fp16): KL(S || T), or
    KL(T || S) with ``reverse``; ``group``: the ranks holding the vocabulary's shards."""
    require_triton_device(student_logits, "token_kl_triton")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits differ in shape: {tuple(student_logits.shape)} vs "
            f"{tuple(teacher_logits.shape)}"
        )
    if student_logits.dtype == torch.float64:
        raise ValueError("token_kl_triton computes in fp32; fp64 logits take core.losses.token_kl")
    lead, V = student_logits.shape[:-1], student_logits.shape[-1]
    zs = student_logits.reshape(-1, V).contiguous()
    zt = teacher_logits.detach().reshape(-1, V).contiguous()
    if group is not None and torch.distributed.get_world_size(group) == 1:
        group = None
    return _FusedTokenKL.apply(zs, zt, float(temperature), bool(reverse), group).view(lead)


__all__ = ["token_kl_triton"]
