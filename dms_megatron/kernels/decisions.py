"""A layer's training decisions and its shifted log-keep bias in one Triton launch each way.

``fused_decisions(logits, noise, tau, same_next)`` computes, per element of ``[B, H, T]``, what
``core.gating.relaxed_decisions`` followed by ``core.shift.shifted_log_keep`` compute with ~11 small torch
ops forward and ~10 backward (each a kernel launch on a GPU, per layer and micro-batch):

* ``r = (logits + noise) / tau``; ``s = sigmoid(r)``;
* ``decisions = (1[s > 0.5] - s) + s`` (the straight-through estimator: forward the hard decision,
  backward the gradient of ``s``);
* ``log_keep[t] = logsigmoid(-r[t + 1])`` where key t has a successor in its document (``same_next``),
  else 0.

Backward: ``d logits[t] = (g_dec[t] s(1-s) - same_next[t-1] g_lk[t-1] s[t]) / tau`` (the noise takes no
gradient). Values equal the torch ops' within float rounding (sigmoid / log as Triton computes them), not
bit for bit. CUDA tensors, or CPU under ``TRITON_INTERPRET=1`` (tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dms_megatron.kernels.triton_device import require_triton_device

_BLOCK = 1024


@triton.jit
def _decisions_fwd(L, N, SAME, DEC, LK, S, H, T, tau, HAS_NOISE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)  # b * H + h
    b = row // H
    t = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = t < T
    nxt = t + 1
    ok_next = nxt < T
    x = tl.load(L + row * T + t, mask=ok, other=0.0).to(tl.float32)
    x_next = tl.load(L + row * T + nxt, mask=ok_next, other=0.0).to(tl.float32)
    if HAS_NOISE:
        x = x + tl.load(N + row * T + t, mask=ok, other=0.0)
        x_next = x_next + tl.load(N + row * T + nxt, mask=ok_next, other=0.0)
    r = x / tau
    r_next = x_next / tau
    s = 1.0 / (1.0 + tl.exp(-r))
    hard = tl.where(s > 0.5, 1.0, 0.0)
    dec = (hard - s) + s
    # logsigmoid(-y) = min(-y, 0) - log(1 + exp(-|y|))
    lk = tl.minimum(-r_next, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(r_next)))
    same = tl.load(SAME + b * T + t, mask=ok, other=0) != 0
    lk = tl.where(same & ok_next, lk, 0.0)
    tl.store(DEC + row * T + t, dec, mask=ok)
    tl.store(LK + row * T + t, lk, mask=ok)
    tl.store(S + row * T + t, s, mask=ok)


@triton.jit
def _decisions_bwd(S, SAME, GDEC, GLK, GL, H, T, tau, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    b = row // H
    t = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = t < T
    prev = t - 1
    ok_prev = ok & (prev >= 0)
    s = tl.load(S + row * T + t, mask=ok, other=0.0)
    g_dec = tl.load(GDEC + row * T + t, mask=ok, other=0.0)
    g_lk = tl.load(GLK + row * T + prev, mask=ok_prev, other=0.0)
    same_prev = tl.load(SAME + b * T + prev, mask=ok_prev, other=0) != 0
    g_lk = tl.where(same_prev, g_lk, 0.0)
    g = (g_dec * s * (1.0 - s) - g_lk * s) / tau
    tl.store(GL + row * T + t, g, mask=ok)


class _FusedDecisions(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, noise, same_next, tau):  # type: ignore[override]
        B, H, T = logits.shape
        dec = torch.empty(B, H, T, dtype=torch.float32, device=logits.device)
        lk, s = torch.empty_like(dec), torch.empty_like(dec)
        if dec.numel():
            grid = (B * H, triton.cdiv(T, _BLOCK))
            _decisions_fwd[grid](
                logits, noise if noise is not None else dec, same_next, dec, lk, s, H, T, float(tau),
                HAS_NOISE=noise is not None, BLOCK=_BLOCK,
            )  # fmt: skip
        ctx.save_for_backward(s, same_next)
        ctx.tau, ctx.logits_dtype = float(tau), logits.dtype
        return dec, lk

    @staticmethod
    def backward(ctx, g_dec, g_lk):  # type: ignore[override]
        s, same_next = ctx.saved_tensors
        B, H, T = s.shape
        g_dec = torch.zeros_like(s) if g_dec is None else g_dec.float().contiguous()
        g_lk = torch.zeros_like(s) if g_lk is None else g_lk.float().contiguous()
        g_logits = torch.empty_like(s)
        if s.numel():
            grid = (B * H, triton.cdiv(T, _BLOCK))
            _decisions_bwd[grid](s, same_next, g_dec, g_lk, g_logits, H, T, ctx.tau, BLOCK=_BLOCK)
        return g_logits.to(ctx.logits_dtype), None, None, None


def fused_decisions(
    logits: torch.Tensor, noise: torch.Tensor | None, tau: float, same_next: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(decisions, log_keep)``, each ``[B, H, T]`` fp32, of eviction logits ``[B, H, T]`` with optional
    noise of the same shape and ``same_next`` ``[B, T]`` bool (``core.shift.same_doc_as_next``; None: one
    document per row); see the module docstring. Differentiable in ``logits``."""
    require_triton_device(logits, "fused_decisions")
    if logits.dim() != 3 or (noise is not None and noise.shape != logits.shape):
        raise ValueError(
            f"fused_decisions needs [B, H, T] logits and noise of their shape, got {tuple(logits.shape)}"
            f" and {None if noise is None else tuple(noise.shape)}"
        )
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau}")
    B, _, T = logits.shape
    if same_next is None:
        same_next = torch.ones(B, T, dtype=torch.bool, device=logits.device)
    elif same_next.shape != (B, T) or same_next.dtype != torch.bool:
        raise ValueError(f"same_next must be a [B, T] = [{B}, {T}] bool tensor, got {tuple(same_next.shape)}")
    noise = None if noise is None else noise.float().contiguous()
    dec, lk = _FusedDecisions.apply(logits.contiguous(), noise, same_next.contiguous(), tau)
    return dec, lk


__all__ = ["fused_decisions"]
