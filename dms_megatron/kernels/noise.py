"""The decision noise of ``core.noise`` in one Triton launch on CUDA.

``core.noise.uniform_from_hash`` builds the per-element hash out of ~190 small integer tensor ops (each
32-bit multiply is split into 16-bit halves to stay inside int64). On a GPU each of them is a kernel
launch: with 30 layers and 2 micro-batches a SmolLM2 retrofit step launched ~11K of them for its noise
alone, a host cost the GPU then waits for. Here the same hash runs per element in uint32 arithmetic
(wrapping multiply = the core's ``_mul32``), so the uniforms are **bit-identical** to the core's on any
device; the logistic transform stays the core's torch expression, so the noise is too.

``logistic_noise`` dispatches: the kernel for CUDA tensors (or on CPU under ``TRITON_INTERPRET=1``,
tests), ``core.noise.logistic_noise`` otherwise.
"""

from __future__ import annotations

import torch

from dms_megatron.core.noise import NoiseKey, check_draw, logistic_from_uniform
from dms_megatron.core.noise import uniform_from_hash as uniform_from_hash_reference
from dms_megatron.kernels.triton_device import triton_runs_on

try:  # Triton ships with torch's CUDA wheels; without it the core's torch ops run everywhere
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where Triton is absent
    triton = None

_BLOCK = 1024

if triton is not None:

    @triton.jit
    def _mix32(x):
        """The core's ``_mix32`` on uint32 (multiplies wrap modulo 2**32)."""
        x = x ^ (x >> 16)
        x = x * tl.full((), 0x7FEB352D, tl.uint32)
        x = x ^ (x >> 15)
        x = x * tl.full((), 0x846CA68B, tl.uint32)
        return x ^ (x >> 16)

    @triton.jit
    def _fold(x, coord):
        """Mix one int64 coordinate into the hash: its low 32 bits, then its high 32 bits."""
        golden = tl.full((), 0x9E3779B9, tl.uint32)
        lo = (coord & 0xFFFFFFFF).to(tl.uint32)
        hi = ((coord >> 32) & 0xFFFFFFFF).to(tl.uint32)
        x = _mix32(x ^ (lo * golden))
        return _mix32(x ^ (hi * golden))

    @triton.jit
    def _uniform_kernel(OUT, stream_hash, b_off, h_off, t_off, n, H, T, BLOCK: tl.constexpr):
        idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = idx < n
        t = idx % T
        h = (idx // T) % H
        b = idx // T // H
        x = tl.full((BLOCK,), 0, tl.uint32) + stream_hash.to(tl.uint32)
        x = _fold(x, b + b_off)
        x = _fold(x, h + h_off)
        x = _fold(x, t + t_off)
        # top 24 bits -> (k + 0.5) / 2**24, exactly as the core computes it
        u = ((x >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
        tl.store(OUT + idx, u, mask=ok)


def _kernel_runs_on(device: torch.device) -> bool:
    return triton is not None and triton_runs_on(device)


def uniform_from_hash(
    key: NoiseKey, shape: tuple[int, int, int], *, device: torch.device | str | None = None, **offsets: int
) -> torch.Tensor:
    """``core.noise.uniform_from_hash`` (same ``sample_offset`` / ``head_offset`` / ``position_offset``
    keywords), bit for bit, in one launch where the kernel runs; the core's torch ops elsewhere."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if not _kernel_runs_on(dev):
        return uniform_from_hash_reference(key, shape, device=device, **offsets)
    check_draw(shape, **offsets)
    B, H, T = shape
    out = torch.empty(B, H, T, dtype=torch.float32, device=dev)
    n = out.numel()
    if n:
        b_off, h_off, t_off = (offsets.get(f"{c}_offset", 0) for c in ("sample", "head", "position"))
        _uniform_kernel[(triton.cdiv(n, _BLOCK),)](
            out, key.stream_hash(), b_off, h_off, t_off, n, H, T, BLOCK=_BLOCK
        )
    return out


def logistic_noise(
    key: NoiseKey, shape: tuple[int, int, int], *, device: torch.device | str | None = None, **offsets: int
) -> torch.Tensor:
    """``core.noise.logistic_noise``: this module's uniforms through the core's transform (so the core's
    values on any device)."""
    return logistic_from_uniform(uniform_from_hash(key, shape, device=device, **offsets))


__all__ = ["logistic_noise", "uniform_from_hash"]
