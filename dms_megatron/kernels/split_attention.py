"""DMS training attention as two library attentions merged by log-sum-exp (CUDA: cuDNN + FlashAttention-2).

Same contract as ``core.dms_attention_reference`` (shape legend there)::

    q [B, Hq, T, D], k [B, Hkv, T, D], v [B, Hkv, T, D], log_keep [B, Hkv, T] (shifted bias),
    doc_ids [B, T] / [T] or None (packed sequences: each run of equal ids is one document)

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

Documents: the batch is flattened into one token axis and both parts run as variable-length
attentions (FlashAttention-2's ``cu_seqlens``): the band over the documents, the old part over the rows
whose position in their document is ``>= W`` against the keys ``W`` earlier (per document, again a
plain causal attention). The layout (``DocLayout``: cumulative lengths, row indices) is built once per
micro-batch on the host, from a host copy of the ids when the batch packer attached one
(``HOST_DOC_IDS``; else one device-to-host copy), and cached on the ids tensor, so the layers after the
first add no host sync. With documents the old part uses ``flash`` (the cuDNN engine here is dense).

Engines (``_ENGINES``): ``cudnn`` (the old part: causal only, no documents), ``flash`` (both parts) and
``math`` (fp32 torch, any device: the CPU tests check the split and its backward with it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dms_megatron.core.shift import check_doc_ids

EXTRA = 8  # channels added to the old part's head dim (two carry the bias; a multiple of 8 for the libraries)
SUPPORTED_HEAD_DIMS = (64, 128)
BIAS_FLOOR = -1000.0  # log_keep below this is clamped (exp(-1000) == 0 in fp32): keeps hi / lo finite
HOST_DOC_IDS = "_dms_host_doc_ids"  # attribute of a device doc_ids tensor holding its CPU copy
_LAYOUT_CACHE = "_dms_split_layouts"  # attribute of a doc_ids tensor: {W: DocLayout}


@dataclass(frozen=True)
class Segments:
    """Variable-length sequences along a flattened token axis: ``cu`` int32 ``[n + 1]`` cumulative
    lengths, ``max_len`` the longest, ``ids`` long ``[N]`` the sequence of each token (math engine)."""

    cu: torch.Tensor
    max_len: int
    ids: torch.Tensor


@dataclass(frozen=True)
class DocLayout:
    """The two parts over documents, on the flattened ``B * T`` token axis: ``band`` the documents;
    ``rows`` the tokens at position ``>= W`` in their document (the old part's queries; its keys are
    ``rows - W``), ``old`` their per-document runs."""

    band: Segments
    rows: torch.Tensor
    old: Segments


def with_host_copy(doc_ids: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``doc_ids`` (a CPU tensor) on ``device``, carrying the CPU copy (``HOST_DOC_IDS``) from which
    ``doc_layout`` lays out the documents without a device-to-host copy."""
    moved = doc_ids.to(device)
    if moved is not doc_ids:
        setattr(moved, HOST_DOC_IDS, doc_ids)
    return moved


def doc_layout(doc_ids: torch.Tensor, batch: int, length: int, W: int) -> DocLayout:
    """The layout of ``doc_ids`` (``[T]`` or ``[B, T]``; each run of equal ids one document) for a
    band of ``W`` keys, cached on the tensor per ``W``."""
    cache = getattr(doc_ids, _LAYOUT_CACHE, None)
    if cache is not None and W in cache:
        return cache[W]
    host = getattr(doc_ids, HOST_DOC_IDS, None)
    host = check_doc_ids((doc_ids if host is None else host).detach().cpu(), batch, length)
    lengths = []
    for row in host.long():
        ids, counts = torch.unique_consecutive(row, return_counts=True)
        if ids.unique().numel() != ids.numel():
            raise ValueError("the split attention needs each document in one run of equal doc_ids")
        lengths.append(counts)
    lens = torch.cat(lengths)
    starts = torch.cumsum(lens, 0) - lens
    seq = torch.repeat_interleave(torch.arange(lens.numel()), lens)
    rows = (torch.arange(int(lens.sum())) - starts[seq] >= W).nonzero().reshape(-1)
    old_lens = (lens - W).clamp_min(0)
    dev = doc_ids.device

    def segments(n: torch.Tensor, ids: torch.Tensor) -> Segments:
        cu = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(n, 0)]).to(torch.int32)
        return Segments(cu.to(dev), int(n.max()) if n.numel() else 0, ids.to(dev))

    layout = DocLayout(segments(lens, seq), rows.to(dev), segments(old_lens[old_lens > 0], seq[rows]))
    if cache is None:
        cache = {}
        setattr(doc_ids, _LAYOUT_CACHE, cache)
    cache[W] = layout
    return layout


# --- engines: (q, k, v [B, H, T, d], scale, left, segs) -> (out [B, Hq, T, d], lse [B, Hq, T] fp32) and
# the backward (dout, q, k, v, out, lse, scale, left, segs) -> (dq, dk, dv); left = keys back besides the
# query's own (-1: all, causal); segs: None, or Segments along T (then B == 1).


def _wide(x: torch.Tensor) -> torch.Tensor:
    """x in at least fp32 (fp64 stays fp64: the tests' precision)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _math_forward(q, k, v, scale, left, segs=None):
    g = q.shape[1] // k.shape[1]
    q, k, v = _wide(q), _wide(k), _wide(v)
    s = torch.einsum("bhtd,bhsd->bhts", q, k.repeat_interleave(g, 1)) * scale
    s = s.masked_fill(~_visible(q.shape[2], left, q.device, segs), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None])
    out = torch.einsum("bhts,bhsd->bhtd", p, v.repeat_interleave(g, 1))
    return out, lse


def _math_backward(dout, q, k, v, out, lse, scale, left, segs=None):
    B, Hq, T, _ = q.shape
    Hkv = k.shape[1]
    g = Hq // Hkv
    kf, vf, qf = _wide(k).repeat_interleave(g, 1), _wide(v).repeat_interleave(g, 1), _wide(q)
    s = torch.einsum("bhtd,bhsd->bhts", qf, kf) * scale
    s = s.masked_fill(~_visible(T, left, q.device, segs), float("-inf"))
    p = torch.exp(s - _wide(lse)[..., None])  # the given (merged) lse, as the libraries do
    do = _wide(dout)
    delta = (do * _wide(out)).sum(-1, keepdim=True)
    ds = p * (torch.einsum("bhtd,bhsd->bhts", do, vf) - delta)
    dq = torch.einsum("bhts,bhsd->bhtd", ds, kf) * scale
    dk = (torch.einsum("bhts,bhtd->bhsd", ds, qf) * scale).view(B, Hkv, g, T, -1).sum(2)
    dv = torch.einsum("bhts,bhtd->bhsd", p, do).view(B, Hkv, g, T, -1).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _visible(T: int, left: int, device, segs: Segments | None = None) -> torch.Tensor:
    age = torch.arange(T, device=device)[:, None] - torch.arange(T, device=device)[None, :]
    seen = (age >= 0) & (age <= left) if left >= 0 else age >= 0
    return seen if segs is None else seen & (segs.ids[:, None] == segs.ids[None, :])


def _flash_layout(x: torch.Tensor, segs: Segments | None) -> torch.Tensor:
    """[B, H, T, d] -> FlashAttention's [B, T, H, d], or its packed [T, H, d] with segments."""
    return x.transpose(1, 2) if segs is None else x[0].transpose(0, 1)


def _flash_back(x: torch.Tensor, segs: Segments | None) -> torch.Tensor:
    return x.transpose(1, 2) if segs is None else x.transpose(0, 1)[None]


def _flash_lse(lse: torch.Tensor, segs: Segments | None) -> torch.Tensor:
    """FlashAttention's log-sum-exp ([B, H, T], packed: [H, T]) as [B, H, T]."""
    if segs is None:
        return lse
    if lse.dim() != 2:
        raise RuntimeError(f"expected FlashAttention's packed log-sum-exp [H, T], got {tuple(lse.shape)}")
    return lse[None]


def _flash_forward(q, k, v, scale, left, segs=None):
    cu = None if segs is None else segs.cu
    longest_q = q.shape[2] if segs is None else segs.max_len
    out, lse, *_ = torch.ops.aten._flash_attention_forward(
        _flash_layout(q, segs), _flash_layout(k, segs), _flash_layout(v, segs), cu, cu, longest_q,
        longest_q, 0.0, True, False, scale=scale, window_size_left=left, window_size_right=0,
    )  # fmt: skip
    return _flash_back(out, segs), _flash_lse(lse, segs)


def _flash_backward(dout, q, k, v, out, lse, scale, left, segs=None):
    t = [_flash_layout(x, segs) for x in (dout, q, k, v, out)]
    rng = torch.zeros(2, dtype=torch.uint64, device=q.device)  # dropout is off: the state is unused
    unused = torch.empty(0, device=q.device)
    cu = None if segs is None else segs.cu
    longest = q.shape[2] if segs is None else segs.max_len
    lse = lse.contiguous() if segs is None else lse[0].contiguous()
    dq, dk, dv = torch.ops.aten._flash_attention_backward(
        *t, lse, cu, cu, longest, longest, 0.0, True, rng, unused,
        scale=scale, window_size_left=left, window_size_right=0,
    )  # fmt: skip
    return tuple(_flash_back(x, segs) for x in (dq, dk, dv))


def _expand(x: torch.Tensor, g: int) -> torch.Tensor:
    return x if g == 1 else x.repeat_interleave(g, 1)


_CUDNN_LSE_SHAPE: list[
    int
] = []  # the rank of the log-sum-exp the cuDNN op returns (its backward takes it back)


def _cudnn_forward(q, k, v, scale, left, segs=None):
    if left >= 0 or segs is not None:
        raise ValueError("the cudnn engine takes causal attention without documents only (left = -1)")
    g = q.shape[1] // k.shape[1]
    out, lse, *_ = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q, _expand(k, g), _expand(v, g), None, True, 0.0, True, False, scale=scale
    )
    _CUDNN_LSE_SHAPE[:] = [lse.dim()]
    return out, lse.reshape(q.shape[:3])


def _cudnn_backward(dout, q, k, v, out, lse, scale, left, segs=None):
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


Rows = slice | torch.Tensor  # token indices along T: a slice without documents, a gather with them


@dataclass(frozen=True)
class _Plan:
    """Where each part runs: ``flat`` (documents: [B, H, T] flattened to [1, H, B * T]), the band's
    segments, the old part's query rows and key rows (``None``: no old part) and segments."""

    flat: bool
    band: Segments | None
    q_rows: Rows | None
    k_rows: Rows | None
    old: Segments | None


def _plan(B: int, T: int, W: int | None, doc_ids: torch.Tensor | None) -> _Plan:
    """``W = None``: causal attention only (the band covers every earlier key), no old part."""
    if W is None:
        band = None if doc_ids is None else doc_layout(doc_ids, B, T, T + 1).band
        return _Plan(doc_ids is not None, band, None, None, None)
    if doc_ids is None:
        some = T > W
        return _Plan(False, None, slice(W, None) if some else None, slice(0, T - W) if some else None, None)
    layout = doc_layout(doc_ids, B, T, W)
    if layout.rows.numel() == 0:  # every document inside the band: no old part
        return _Plan(True, layout.band, None, None, None)
    return _Plan(True, layout.band, layout.rows, layout.rows - W, layout.old)


def _flat(x: torch.Tensor | None, plan: _Plan) -> torch.Tensor | None:
    """[B, H, T, ...] -> [1, H, B * T, ...] when the plan runs over documents."""
    if x is None or not plan.flat or x.shape[0] == 1:
        return x
    return x.transpose(0, 1).reshape(1, x.shape[1], -1, *x.shape[3:])


def _unflat(x: torch.Tensor, plan: _Plan, B: int) -> torch.Tensor:
    if not plan.flat or B == 1:
        return x
    return x.reshape(x.shape[1], B, -1, *x.shape[3:]).transpose(0, 1)


def _old_inputs(q, k, v, log_keep, q_rows: Rows, k_rows: Rows, scale: float):
    """The old part's q / k / v (queries ``q_rows``, keys ``k_rows``) with the bias channels appended."""
    D = q.shape[-1]
    qo = F.pad(q[:, :, q_rows], (0, EXTRA))
    qo[..., D : D + 2] = 1.0
    bias = _wide(log_keep[:, :, k_rows]).clamp_min(BIAS_FLOOR) / scale
    hi = bias.to(k.dtype)
    lo = (bias - hi.to(bias.dtype)).to(k.dtype)
    ko = F.pad(k[:, :, k_rows], (0, EXTRA))
    ko[..., D] = hi
    ko[..., D + 1] = lo
    vo = F.pad(v[:, :, k_rows], (0, EXTRA))
    return qo, ko, vo


class _SplitAttention(torch.autograd.Function):
    """``log_keep = None``: plain causal attention (the teacher), the band engine over every key."""

    @staticmethod
    def forward(ctx, q, k, v, log_keep, doc_ids, window, scale, old_engine, band_engine):
        B, D = q.shape[0], q.shape[3]
        if log_keep is None:
            window = -1
        plan = _plan(B, q.shape[2], None if log_keep is None else window + 1, doc_ids)
        q, k, v, log_keep = (_flat(x, plan) for x in (q, k, v, log_keep))
        out_b, lse_b = _ENGINES[band_engine][0](q, k, v, scale, window, plan.band)
        out, lse = out_b.to(q.dtype), _wide(lse_b)
        if plan.q_rows is not None:
            inputs = _old_inputs(q, k, v, log_keep, plan.q_rows, plan.k_rows, scale)
            out_o, lse_o = _ENGINES[old_engine][0](*inputs, scale, -1, plan.old)
            lse_band = lse[..., plan.q_rows]
            lse_rows = torch.logaddexp(lse_band, _wide(lse_o))
            w_band = torch.exp(lse_band - lse_rows)[..., None]
            w_old = torch.exp(_wide(lse_o) - lse_rows)[..., None]
            merged = _wide(out_b[:, :, plan.q_rows]) * w_band + _wide(out_o[..., :D]) * w_old
            out = out.clone()
            out[:, :, plan.q_rows] = merged.to(q.dtype)
            lse = lse.clone()
            lse[..., plan.q_rows] = lse_rows
        ctx.save_for_backward(q, k, v, log_keep, out, lse)
        ctx.plan, ctx.batch = plan, B
        ctx.window, ctx.scale, ctx.engines = window, scale, (old_engine, band_engine)
        return _unflat(out, plan, B)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, log_keep, out, lse = ctx.saved_tensors
        plan, B, window, scale = ctx.plan, ctx.batch, ctx.window, ctx.scale
        old_engine, band_engine = ctx.engines
        D = q.shape[3]
        dout = _flat(dout, plan).contiguous()
        band_grads = _ENGINES[band_engine][1](dout, q, k, v, out, lse, scale, window, plan.band)
        dq, dk, dv = (x.to(q.dtype) for x in band_grads)
        if log_keep is None:
            return (*(_unflat(x, plan, B) for x in (dq, dk, dv)), None, None, None, None, None, None)
        dlk = torch.zeros(log_keep.shape, dtype=_wide(log_keep).dtype, device=q.device)
        if plan.q_rows is not None:
            rows, keys = plan.q_rows, plan.k_rows
            qo, ko, vo = _old_inputs(q, k, v, log_keep, rows, keys, scale)
            pad = (0, EXTRA)
            dqo, dko, dvo = _ENGINES[old_engine][1](
                F.pad(dout[:, :, rows], pad), qo, ko, vo, F.pad(out[:, :, rows], pad), lse[..., rows],
                scale, -1, plan.old,
            )  # fmt: skip
            dq, dk, dv = dq.clone(), dk.clone(), dv.clone()
            dq[:, :, rows] += dqo[..., :D]  # the rows (and keys) are distinct: no accumulation order
            dk[:, :, keys] += dko[..., :D]
            dv[:, :, keys] += dvo[..., :D]
            dlk[:, :, keys] = _wide(dko[..., D]) / scale
        grads = (_unflat(x, plan, B) for x in (dq, dk, dv, dlk.to(log_keep.dtype)))
        return (*grads, None, None, None, None, None)


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    doc_ids: torch.Tensor | None = None,
    *,
    engine: str = "flash",
) -> torch.Tensor:
    """Causal attention without eviction (the teacher's): SDPA without documents, else ``engine``
    (FlashAttention-2's variable-length form on CUDA, ``math`` for the CPU tests) over the documents."""
    if doc_ids is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    q, k, v = (x.contiguous() for x in (q, k, v))
    return _SplitAttention.apply(q, k, v, None, doc_ids, -1, scale, engine, engine)


def supported(q: torch.Tensor, v: torch.Tensor, doc_ids: torch.Tensor | None) -> bool:
    """Whether the split runs these inputs on CUDA (bf16 / fp16, D == Dv in 64 / 128; documents too)."""
    return (
        q.is_cuda
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
    doc_ids: torch.Tensor | None = None,
    *,
    old_engine: str = "cudnn",
    band_engine: str = "flash",
) -> torch.Tensor:
    """DMS attention (see the module docstring); ``log_keep`` is the shifted bias [B, Hkv, T] (shifted
    within documents when ``doc_ids`` is given). With documents the cuDNN old part becomes ``flash``."""
    for name in (old_engine, band_engine):
        if name not in _ENGINES:
            raise ValueError(f"engine must be one of {tuple(_ENGINES)}, got {name!r}")
    if band_engine == "cudnn":
        raise ValueError("the band needs a sliding window: band_engine 'flash' or 'math'")
    if q.shape[-1] != v.shape[-1]:
        raise ValueError(f"the split backend needs D == Dv, got {q.shape[-1]} and {v.shape[-1]}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if doc_ids is not None and old_engine == "cudnn":
        old_engine = "flash"
    q, k, v = (x.contiguous() for x in (q, k, v))
    return _SplitAttention.apply(q, k, v, log_keep, doc_ids, int(window), scale, old_engine, band_engine)
