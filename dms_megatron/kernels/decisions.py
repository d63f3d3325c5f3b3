"""A layer's training decisions and its shifted log-keep bias in one Triton launch each way.

``fused_decisions(logits, noise, tau, same_next, uniforms=None)`` computes, per element of ``[B, H, T]``,
what ``core.noise.logistic_from_uniform`` (when given the uniforms), ``core.gating.relaxed_decisions`` and
``core.shift.shifted_log_keep`` compute with ~15 small torch ops forward and ~8 backward (each a kernel
launch on a GPU, per layer and micro-batch):

* ``n = log(u) - log1p(-u)`` from the uniforms (or the noise as given, or none);
* ``r = (logits + n) / tau``; ``s = sigmoid(r)``;
* ``decisions = (1[s > 0.5] - s) + s`` (the straight-through estimator: forward the hard decision,
  backward the gradient of ``s``);
* ``log_keep[t] = logsigmoid(-r[t + 1])`` where key t has a successor in its document (``same_next``),
  else 0.

Backward: ``d logits[t] = (g_dec[t] s(1-s) - same_next[t-1] g_lk[t-1] s[t]) / tau`` (the noise takes no
gradient). Logits and noise may be strided views (a permuted layout, one draw per layer expanded over the
heads). Values equal the torch ops' within float rounding (exp / log as Triton computes them), not bit for
bit. CUDA tensors, or CPU under ``TRITON_INTERPRET=1`` (tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dms_megatron.kernels.triton_device import require_triton_device

_BLOCK = 1024


@triton.jit
def _noisy_logit(L, N, b, h, t, ok, slb, slh, slt, snb, snh, snt, NOISE: tl.constexpr):
    """logit + noise at (b, h, t) in fp32; NOISE 0: none, 1: logistic noise, 2: its uniforms."""
    x = tl.load(L + b * slb + h * slh + t * slt, mask=ok, other=0.0).to(tl.float32)
    if NOISE == 1:
        x = x + tl.load(N + b * snb + h * snh + t * snt, mask=ok, other=0.0)
    if NOISE == 2:  # core.noise.logistic_from_uniform: log(u) - log1p(-u)
        u = tl.load(N + b * snb + h * snh + t * snt, mask=ok, other=0.5)
        x = x + (tl.log(u) - tl.log(1.0 - u))
    return x


@triton.jit
def _decisions_fwd(L, N, SAME, DEC, LK, S, H, T, tau, slb, slh, slt, snb, snh, snt,
                   NOISE: tl.constexpr, HAS_SAME: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    row = tl.program_id(0)  # b * H + h
    b = row // H
    h = row % H
    t = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = t < T
    ok_next = t + 1 < T
    r = _noisy_logit(L, N, b, h, t, ok, slb, slh, slt, snb, snh, snt, NOISE) / tau
    r_next = _noisy_logit(L, N, b, h, t + 1, ok_next, slb, slh, slt, snb, snh, snt, NOISE) / tau
    s = 1.0 / (1.0 + tl.exp(-r))
    hard = tl.where(s > 0.5, 1.0, 0.0)
    dec = (hard - s) + s
    # logsigmoid(-y) = min(-y, 0) - log(1 + exp(-|y|))
    lk = tl.minimum(-r_next, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(r_next)))
    keep_bias = ok_next
    if HAS_SAME:
        keep_bias = keep_bias & (tl.load(SAME + b * T + t, mask=ok, other=0) != 0)
    lk = tl.where(keep_bias, lk, 0.0)
    tl.store(DEC + row * T + t, dec, mask=ok)
    tl.store(LK + row * T + t, lk, mask=ok)
    tl.store(S + row * T + t, s, mask=ok)


@triton.jit
def _decisions_bwd(S, SAME, GDEC, GLK, GL, H, T, tau, HAS_SAME: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    b = row // H
    t = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = t < T
    prev = t - 1
    ok_prev = ok & (prev >= 0)
    s = tl.load(S + row * T + t, mask=ok, other=0.0)
    g_dec = tl.load(GDEC + row * T + t, mask=ok, other=0.0)
    g_lk = tl.load(GLK + row * T + prev, mask=ok_prev, other=0.0)
    if HAS_SAME:
        g_lk = tl.where(tl.load(SAME + b * T + prev, mask=ok_prev, other=0) != 0, g_lk, 0.0)
    g = (g_dec * s * (1.0 - s) - g_lk * s) / tau
    tl.store(GL + row * T + t, g, mask=ok)


class _FusedDecisions(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, noise, noise_kind, same_next, tau):  # type: ignore[override]
        B, H, T = logits.shape
        dec = torch.empty(B, H, T, dtype=torch.float32, device=logits.device)
        lk, s = torch.empty_like(dec), torch.empty_like(dec)
        n = noise if noise is not None else dec
        same = same_next if same_next is not None else dec
        if dec.numel():
            grid = (B * H, triton.cdiv(T, _BLOCK))
            _decisions_fwd[grid](
                logits, n, same, dec, lk, s, H, T, float(tau), *logits.stride(), *n.stride(),
                NOISE=noise_kind, HAS_SAME=same_next is not None, BLOCK=_BLOCK,
            )  # fmt: skip
        ctx.save_for_backward(s, same_next)
        ctx.tau, ctx.logits_dtype = float(tau), logits.dtype
        return dec, lk

    @staticmethod
    def backward(ctx, g_dec, g_lk):  # type: ignore[override]
        s, same_next = ctx.saved_tensors
        B, H, T = s.shape
        g_dec, g_lk = g_dec.float().contiguous(), g_lk.float().contiguous()  # autograd materialises zeros
        g_logits = torch.empty_like(s)
        if s.numel():
            grid = (B * H, triton.cdiv(T, _BLOCK))
            same = same_next if same_next is not None else s
            _decisions_bwd[grid](
                s, same, g_dec, g_lk, g_logits, H, T, ctx.tau, HAS_SAME=same_next is not None, BLOCK=_BLOCK
            )
        return g_logits.to(ctx.logits_dtype), None, None, None, None


def fused_decisions(
    logits: torch.Tensor,
    noise: torch.Tensor | None,
    tau: float,
    same_next: torch.Tensor | None = None,
    *,
    uniforms: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(decisions, log_keep)``, each ``[B, H, T]`` fp32, of eviction logits ``[B, H, T]`` (any strides)
    with optional logistic ``noise`` (or the ``uniforms`` it is drawn from, transformed in the kernel as
    ``core.noise.logistic_from_uniform`` does; either may be a broadcast view, e.g. one draw per layer
    expanded over the heads) and ``same_next`` ``[B, T]`` bool (``core.shift.same_doc_as_next``; None:
    one document per row); see the module docstring. Differentiable in ``logits``."""
    require_triton_device(logits, "fused_decisions")
    if noise is not None and uniforms is not None:
        raise ValueError("fused_decisions takes noise or the uniforms it is drawn from, not both")
    draw = noise if noise is not None else uniforms
    if logits.dim() != 3 or (draw is not None and draw.shape != logits.shape):
        raise ValueError(
            f"fused_decisions needs [B, H, T] logits and noise of their shape, got {tuple(logits.shape)}"
            f" and {None if draw is None else tuple(draw.shape)}"
        )
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau}")
    B, _, T = logits.shape
    if same_next is not None and (same_next.shape != (B, T) or same_next.dtype != torch.bool):
        raise ValueError(f"same_next must be a [B, T] = [{B}, {T}] bool tensor, got {tuple(same_next.shape)}")
    kind = 0 if draw is None else (1 if noise is not None else 2)
    draw = None if draw is None else draw.float()
    same = None if same_next is None else same_next.contiguous()
    dec, lk = _FusedDecisions.apply(logits, draw, kind, same, tau)
    return dec, lk


__all__ = ["fused_decisions"]
