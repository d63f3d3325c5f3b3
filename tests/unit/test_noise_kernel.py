"""The one-launch noise kernel (``kernels.noise``) draws exactly ``core.noise``'s values: uniforms and
logistic noise bit for bit over seeded stream keys, shapes and offsets past 2**32 (run by the Triton
interpreter on CPU; tests/gpu/test_core_on_gpu.py checks it on CUDA and counts its launches)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
from dms_megatron.core.noise import NoiseKey, logistic_noise
from dms_megatron.kernels import noise as kernel_noise
from tests.unit.interpreted import run_interpreted

CASES = 10


@pytest.fixture(scope="module")
def report() -> dict:
    return run_interpreted("noise_interpreted.py", CASES)


def test_kernel_draws_the_core_noise_bit_for_bit(report) -> None:
    rows = report["cases"]
    assert len(rows) == CASES
    assert any(max(r["offsets"].values()) >= 2**32 for r in rows)  # the high 32 bits are mixed in
    assert any(r["shape"][2] > 1024 for r in rows)  # more than one program
    for r in rows:
        assert r["uniform_equal"] and r["logistic_equal"], r
        assert r["dtype"] == "torch.float32"


def test_kernel_keeps_the_core_argument_checks(report) -> None:
    assert report["empty_shape"] == [2, 0, 5]
    assert report["negative_offset_rejected"]


def test_cpu_without_the_interpreter_is_the_core_function() -> None:
    key = NoiseKey(seed=3, step=9, micro_batch=1, dp_rank=0, layer=4)
    got = kernel_noise.logistic_noise(key, (2, 3, 40), head_offset=6, device="cpu")
    assert torch.equal(got, logistic_noise(key, (2, 3, 40), head_offset=6))
