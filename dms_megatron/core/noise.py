"""Reproducible logistic noise for the decision relaxation (docs/dms.md section 2).

The noise is a pure function of its coordinates: (seed, step, micro_batch, dp_rank, layer) name the
stream, and (sample, kv_head, position) name the element. It is produced by a stateless integer hash
(no torch.Generator state), which gives three properties the training loop relies on:

* resume == uninterrupted: nothing to checkpoint, step k always draws the same values;
* any parallel layout draws the same value for the same global coordinates: a TP rank asks for its
  own KV heads with ``head_offset``, a context-parallel chunk for its positions with
  ``position_offset``, so TP=2 gets exactly the slices TP=1 uses;
* CPU and GPU draw bit-identical uniforms (integer ops); the fp32 ``log`` transform may differ by
  an ulp between CPU and CUDA math libraries (measured on H100: see tests/gpu/test_core_on_gpu.py).
  On one device the noise is exactly reproducible.

The logistic distribution is the distribution of G1 - G2 for independent Gumbel(0, 1) variables; we
sample it directly by its inverse CDF, ``log(u) - log(1 - u)``, from a 24-bit uniform u in (0, 1)
(tails clipped at about +-16.6, irrelevant next to tau = 0.1).

Shape legend: the output is ``[B, H, T]`` float32 (samples, KV heads, positions).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dms_megatron.core._checks import require_non_negative_int

_MASK32 = 0xFFFFFFFF
_M1 = 0x7FEB352D
_M2 = 0x846CA68B
_GOLDEN = 0x9E3779B9


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for int64 x in [0, 2**32), without int64 overflow."""
    lo, hi = x & 0xFFFF, x >> 16
    return (lo * c + ((hi * (c & 0xFFFF)) << 16)) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit avalanche permutation (xorshift-multiply finaliser)."""
    x = x ^ (x >> 16)
    x = _mul32(x, _M1)
    x = x ^ (x >> 15)
    x = _mul32(x, _M2)
    return x ^ (x >> 16)


def _mix_int(h: int, value: int) -> int:
    """Scalar version of the stream-key mixing (Python ints, same arithmetic as the tensor path)."""
    x = (h ^ ((value * _GOLDEN) & _MASK32)) & _MASK32
    x ^= x >> 16
    x = (x * _M1) & _MASK32
    x ^= x >> 15
    x = (x * _M2) & _MASK32
    return x ^ (x >> 16)


@dataclass(frozen=True)
class NoiseKey:
    """Names one noise stream: a layer's draw in one micro-batch of one step on one DP rank."""

    seed: int
    step: int
    micro_batch: int
    dp_rank: int
    layer: int

    def __post_init__(self) -> None:
        for name in ("seed", "step", "micro_batch", "dp_rank", "layer"):
            require_non_negative_int(f"NoiseKey.{name}", getattr(self, name))

    def stream_hash(self) -> int:
        h = 0x2545F491
        for value in (self.seed, self.step, self.micro_batch, self.dp_rank, self.layer):
            # fold values wider than 32 bits in two halves so large seeds stay distinct
            h = _mix_int(h, value & _MASK32)
            h = _mix_int(h, (value >> 32) & _MASK32)
        return h


def check_draw(
    shape: tuple[int, int, int], sample_offset: int = 0, head_offset: int = 0, position_offset: int = 0
) -> None:
    """``ValueError`` unless ``shape`` is ``(B, H, T)`` of non-negative sizes and the offsets are
    non-negative ints (the arguments of every noise draw, on any device)."""
    if len(shape) != 3 or any(s < 0 for s in shape):
        raise ValueError(f"shape must be (B, H, T) with non-negative sizes, got {shape}")
    for name, off in (
        ("sample_offset", sample_offset),
        ("head_offset", head_offset),
        ("position_offset", position_offset),
    ):
        require_non_negative_int(name, off)


def logistic_from_uniform(u: torch.Tensor) -> torch.Tensor:
    """Logistic(0, 1) values from uniforms in (0, 1) by the inverse CDF ``log(u) - log(1 - u)``."""
    return torch.log(u) - torch.log1p(-u)


def uniform_from_hash(
    key: NoiseKey,
    shape: tuple[int, int, int],
    *,
    sample_offset: int = 0,
    head_offset: int = 0,
    position_offset: int = 0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Uniform (0, 1) float32 values of shape ``[B, H, T]`` at the given global coordinates."""
    check_draw(shape, sample_offset, head_offset, position_offset)
    B, H, T = shape
    kw = {"dtype": torch.int64, "device": device}
    b = torch.arange(sample_offset, sample_offset + B, **kw).view(B, 1, 1)
    h = torch.arange(head_offset, head_offset + H, **kw).view(1, H, 1)
    t = torch.arange(position_offset, position_offset + T, **kw).view(1, 1, T)
    x = torch.full((1, 1, 1), key.stream_hash(), **kw)
    for coord in (b, h, t):
        x = _mix32(x ^ _mul32(coord & _MASK32, _GOLDEN))
        x = _mix32(x ^ _mul32((coord >> 32) & _MASK32, _GOLDEN))
    x = x.expand(B, H, T)
    # top 24 bits -> (k + 0.5) / 2**24: exactly representable in fp32, never 0 or 1
    return ((x >> 8).to(torch.float32) + 0.5) * (1.0 / 16777216.0)


def logistic_noise(
    key: NoiseKey,
    shape: tuple[int, int, int],
    *,
    sample_offset: int = 0,
    head_offset: int = 0,
    position_offset: int = 0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Logistic(0, 1) noise (= difference of two Gumbels), float32, ``[B, H, T]``."""
    u = uniform_from_hash(
        key,
        shape,
        sample_offset=sample_offset,
        head_offset=head_offset,
        position_offset=position_offset,
        device=device,
    )
    return logistic_from_uniform(u)
