"""DMS training attention as two library attentions merged by log-sum-exp (CUDA: cuDNN + FlashAttention-2).

Same contract as ``core.dms_attention_reference`` without documents (shape legend there)::

    q [B, Hq, T, D], k [B, Hkv, T, D], v [B, Hkv, T, D], log_keep [B, Hkv, T] (shifted bias) or None

With ``W = window + 1``, the keys a query ``i`` sees split in two disjoint sets:

- **band** ``i - W < j <= i``: no bias; a sliding-window causal attention (FlashAttention-2's
  ``window_size_left = window``), queries 0..T-1.
- **old** ``j <= i - W``: bias ``log_keep[j]``; for queries ``W..T-1`` against keys ``0..T-W-1`` this is
  a plain causal attention (query ``W + t`` sees keys ``0..t``). The bias enters through extra channels
  (head dim D + 8): q gets ``[1, 1]`` and k gets the bias over the softmax scale split into a high and a
  low part in the input dtype (``hi + lo`` carries ~16 mantissa bits where one bf16 would carry 8), the
  remaining channels and v's extra channels zero. The library then adds ``scale * (hi + lo) = log_keep``
  to each score.

Merge: ``lse = logaddexp(lse_band, lse_old)``, ``out = e^(lse_band - lse) out_band + e^(lse_old - lse)
out_old``. Backward: each part's library backward given the **merged** output and log-sum-exp: it
recomputes its probabilities ``exp(s - lse)`` and ``rowsum(dO * out)`` from them, which are exactly the
union softmax's, so the two parts' gradients add up to the exact gradient (as ring attention does). The
bias gradient is the old part's dK on the high channel times ``1 / scale``.

Engines (``_ENGINES``): ``cudnn`` (the old part: causal only), ``flash`` (both parts) and ``math`` (fp32
torch, any device: the CPU tests check the split and its backward with it). Documents are not
supported (the dispatcher uses the Triton kernel for packed sequences).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

EXTRA = 8  # channels added to the old part's head dim (two carry the bias; a multiple of 8 for the libraries)
SUPPORTED_HEAD_DIMS = (64, 128)
BIAS_FLOOR = -1000.0  # log_keep below this is clamped (exp(-1000) == 0 in fp32): keeps hi / lo finite


# --- engines: (q, k, v [B, H, T, d], scale, left) -> (out [B, Hq, T, d], lse [B, Hq, T] fp32) and the
# backward (dout, q, k, v, out, lse, scale, left) -> (dq, dk, dv); left = keys back besides the query's
# own (-1: all, causal).


def _wide(x: torch.Tensor) -> torch.Tensor:
    """x in at least fp32 (fp64 stays fp64: the tests' precision)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _math_forward(q, k, v, scale, left):
    g = q.shape[1] // k.shape[1]
    q, k, v = _wide(q), _wide(k), _wide(v)
    s = torch.einsum("bhtd,bhsd->bhts", q, k.repeat_interleave(g, 1)) * scale
    s = s.masked_fill(~_visible(q.shape[2], left, q.device), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None])
    out = torch.einsum("bhts,bhsd->bhtd", p, v.repeat_interleave(g, 1))
    return out, lse


def _math_backward(dout, q, k, v, out, lse, scale, left):
    B, Hq, T, _ = q.shape
    Hkv = k.shape[1]
    g = Hq // Hkv
    kf, vf, qf = _wide(k).repeat_interleave(g, 1), _wide(v).repeat_interleave(g, 1), _wide(q)
    s = torch.einsum("bhtd,bhsd->bhts", qf, kf) * scale
    s = s.masked_fill(~_visible(T, left, q.device), float("-inf"))
    p = torch.exp(s - _wide(lse)[..., None])  # the given (merged) lse, as the libraries do
    do = _wide(dout)
    delta = (do * _wide(out)).sum(-1, keepdim=True)
    ds = p * (torch.einsum("bhtd,bhsd->bhts", do, vf) - delta)
    dq = torch.einsum("bhts,bhsd->bhtd", ds, kf) * scale
    dk = (torch.einsum("bhts,bhtd->bhsd", ds, qf) * scale).view(B, Hkv, g, T, -1).sum(2)
    dv = torch.einsum("bhts,bhtd->bhsd", p, do).view(B, Hkv, g, T, -1).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _visible(T: int, left: int, device) -> torch.Tensor:
    age = torch.arange(T, device=device)[:, None] - torch.arange(T, device=device)[None, :]
    return (age >= 0) & (age <= left) if left >= 0 else age >= 0


def _flash_forward(q, k, v, scale, left):
    out, lse, *_ = torch.ops.aten._flash_attention_forward(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, None, q.shape[2], k.shape[2],
        0.0, True, False, scale=scale, window_size_left=left, window_size_right=0,
    )  # fmt: skip
    return out.transpose(1, 2), lse


def _flash_backward(dout, q, k, v, out, lse, scale, left):
    t = [x.transpose(1, 2) for x in (dout, q, k, v, out)]
    rng = torch.zeros(2, dtype=torch.uint64, device=q.device)  # dropout is off: the state is unused
    unused = torch.empty(0, device=q.device)
    dq, dk, dv = torch.ops.aten._flash_attention_backward(
        *t, lse.contiguous(), None, None, q.shape[2], k.shape[2], 0.0, True, rng, unused,
        scale=scale, window_size_left=left, window_size_right=0,
    )  # fmt: skip
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


def _expand(x: torch.Tensor, g: int) -> torch.Tensor:
    return x if g == 1 else x.repeat_interleave(g, 1)


_CUDNN_LSE_SHAPE: list[
    int
] = []  # the rank of the log-sum-exp the cuDNN op returns (its backward takes it back)


def _cudnn_forward(q, k, v, scale, left):
    if left >= 0:
        raise ValueError("the cudnn engine takes causal attention only (left = -1)")
    g = q.shape[1] // k.shape[1]
    out, lse, *_ = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q, _expand(k, g), _expand(v, g), None, True, 0.0, True, False, scale=scale
    )
    _CUDNN_LSE_SHAPE[:] = [lse.dim()]
    return out, lse.reshape(q.shape[:3])


def _cudnn_backward(dout, q, k, v, out, lse, scale, left):
    g = q.shape[1] // k.shape[1]
    T = q.shape[2]
    seed = torch.zeros((), dtype=torch.int64, device=q.device)  # dropout is off
    if _CUDNN_LSE_SHAPE == [4]:
        lse = lse[..., None]
    dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        dout.contiguous(), q, _expand(k, g), _expand(v, g), out.contiguous(), lse.contiguous(),
        seed, seed, None, None, None, T, T, 0.0, True, scale=scale,
    )  # fmt: skip
    if g > 1:  # the group's gradients, summed in a fixed order
        B, Hkv = k.shape[:2]
        dk = dk.view(B, Hkv, g, T, -1).sum(2)
        dv = dv.view(B, Hkv, g, T, -1).sum(2)
    return dq, dk, dv


Engine = tuple[Callable, Callable]
_ENGINES: dict[str, Engine] = {
    "math": (_math_forward, _math_backward),
    "flash": (_flash_forward, _flash_backward),
    "cudnn": (_cudnn_forward, _cudnn_backward),
}


def _old_inputs(q, k, v, log_keep, W: int, scale: float):
    """The old part's q / k / v (queries W.., keys ..T-W) with the bias channels appended."""
    T = q.shape[2]
    Tq = T - W
    qo = F.pad(q[:, :, W:], (0, EXTRA))
    qo[..., q.shape[-1] : q.shape[-1] + 2] = 1.0
    bias = _wide(log_keep[:, :, :Tq]).clamp_min(BIAS_FLOOR) / scale
    hi = bias.to(k.dtype)
    lo = (bias - hi.to(bias.dtype)).to(k.dtype)
    ko = F.pad(k[:, :, :Tq], (0, EXTRA))
    ko[..., k.shape[-1]] = hi
    ko[..., k.shape[-1] + 1] = lo
    vo = F.pad(v[:, :, :Tq], (0, EXTRA))
    return qo, ko, vo


class _SplitAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, log_keep, window, scale, old_engine, band_engine):
        T, D = q.shape[2], q.shape[3]
        W = window + 1
        out_b, lse_b = _ENGINES[band_engine][0](q, k, v, scale, window)
        out, lse = out_b.to(q.dtype), _wide(lse_b)
        if T > W:
            out_o, lse_o = _ENGINES[old_engine][0](*_old_inputs(q, k, v, log_keep, W, scale), scale, -1)
            lse_old_rows = torch.logaddexp(lse[..., W:], _wide(lse_o))
            w_band = torch.exp(lse[..., W:] - lse_old_rows)[..., None]
            w_old = torch.exp(_wide(lse_o) - lse_old_rows)[..., None]
            out = out.clone()
            merged = _wide(out_b[:, :, W:]) * w_band + _wide(out_o[..., :D]) * w_old
            out[:, :, W:] = merged.to(q.dtype)
            lse = torch.cat([lse[..., :W], lse_old_rows], dim=-1)
        ctx.save_for_backward(q, k, v, log_keep, out, lse)
        ctx.window, ctx.scale, ctx.engines = window, scale, (old_engine, band_engine)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, log_keep, out, lse = ctx.saved_tensors
        window, scale = ctx.window, ctx.scale
        old_engine, band_engine = ctx.engines
        T, D = q.shape[2], q.shape[3]
        W = window + 1
        dout = dout.contiguous()
        dq, dk, dv = (x.to(q.dtype) for x in _ENGINES[band_engine][1](dout, q, k, v, out, lse, scale, window))
        dlk = torch.zeros(log_keep.shape, dtype=_wide(log_keep).dtype, device=q.device)
        if T > W:
            qo, ko, vo = _old_inputs(q, k, v, log_keep, W, scale)
            pad = (0, EXTRA)
            dqo, dko, dvo = _ENGINES[old_engine][1](
                F.pad(dout[:, :, W:], pad), qo, ko, vo, F.pad(out[:, :, W:], pad), lse[..., W:], scale, -1
            )
            Tq = T - W
            dq = dq.clone()
            dq[:, :, W:] += dqo[..., :D]
            dk = dk.clone()
            dk[:, :, :Tq] += dko[..., :D]
            dv = dv.clone()
            dv[:, :, :Tq] += dvo[..., :D]
            dlk[:, :, :Tq] = _wide(dko[..., D]) / scale
        return dq, dk, dv, dlk.to(log_keep.dtype), None, None, None, None


def supported(q: torch.Tensor, v: torch.Tensor, doc_ids: torch.Tensor | None) -> bool:
    """Whether the split runs these inputs on CUDA (bf16 / fp16, D == Dv in 64 / 128, no documents)."""
    return (
        q.is_cuda
        and doc_ids is None
        and q.shape[-1] == v.shape[-1]
        and q.shape[-1] in SUPPORTED_HEAD_DIMS
        and q.dtype in (torch.bfloat16, torch.float16)
    )


def dms_attention_split(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_keep: torch.Tensor,
    window: int,
    scale: float | None = None,
    *,
    old_engine: str = "cudnn",
    band_engine: str = "flash",
) -> torch.Tensor:
    """DMS attention (see the module docstring); ``log_keep`` is the shifted bias [B, Hkv, T]."""
    for name in (old_engine, band_engine):
        if name not in _ENGINES:
            raise ValueError(f"engine must be one of {tuple(_ENGINES)}, got {name!r}")
    if band_engine == "cudnn":
        raise ValueError("the band needs a sliding window: band_engine 'flash' or 'math'")
    if q.shape[-1] != v.shape[-1]:
        raise ValueError(f"the split backend needs D == Dv, got {q.shape[-1]} and {v.shape[-1]}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    q, k, v = (x.contiguous() for x in (q, k, v))
    return _SplitAttention.apply(q, k, v, log_keep, int(window), scale, old_engine, band_engine)
