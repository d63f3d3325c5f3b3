"""Runs the one-launch noise kernel (``kernels.noise``) under the Triton interpreter on CPU and prints,
as JSON, whether its uniforms and logistic noise equal ``core.noise`` bit for bit over seeded draws
(stream keys, shapes, offsets past 2**32); started by ``test_noise_kernel.py`` in a fresh interpreter."""

from __future__ import annotations

import json
import random
import sys

import interpreter_setup  # noqa: F401  (TRITON_INTERPRET=1 before any kernel exists)
import torch

from dms_megatron.core import noise as core_noise
from dms_megatron.kernels import noise as kernel_noise


def case(seed: int) -> dict:
    rng = random.Random(seed)
    key = core_noise.NoiseKey(
        seed=rng.choice([0, 1234, 2**40 + 7]),
        step=rng.randint(0, 5000),
        micro_batch=rng.randint(0, 7),
        dp_rank=rng.randint(0, 63),
        layer=rng.randint(0, 79),
    )
    shape = (rng.randint(1, 3), rng.randint(1, 5), rng.randint(1, 1500))
    offsets = {
        "sample_offset": rng.choice([0, 3, 2**33 + 1]),
        "head_offset": rng.choice([0, 5, 2**32]),
        "position_offset": rng.choice([0, 77, 2**35 + 12345]),
    }
    want_u = core_noise.uniform_from_hash(key, shape, **offsets)
    got_u = kernel_noise.uniform_from_hash(key, shape, **offsets, device="cpu")
    want = core_noise.logistic_noise(key, shape, **offsets)
    got = kernel_noise.logistic_noise(key, shape, **offsets, device="cpu")
    return {
        "shape": list(shape),
        "offsets": offsets,
        "uniform_equal": bool(torch.equal(want_u, got_u)),
        "logistic_equal": bool(torch.equal(want, got)),
        "dtype": str(got.dtype),
    }


def main(n: int) -> None:
    rows = [case(seed) for seed in range(n)]
    empty = kernel_noise.logistic_noise(core_noise.NoiseKey(0, 0, 0, 0, 0), (2, 0, 5), device="cpu")
    try:
        kernel_noise.logistic_noise(core_noise.NoiseKey(0, 0, 0, 0, 0), (1, 1, 4), head_offset=-1)
        rejected = False
    except ValueError:
        rejected = True
    print(json.dumps({"cases": rows, "empty_shape": list(empty.shape), "negative_offset_rejected": rejected}))


if __name__ == "__main__":
    main(int(sys.argv[1]))
