"""The trainer's gradient check (``all_finite``: one fp32 sum per gradient buffer) flags exactly the
buffers ``isfinite(x).all()`` flags: NaN, +Inf, -Inf, and +Inf with -Inf together, in fp32 and bf16."""

from __future__ import annotations

import math

import pytest
import torch

from dms_megatron.training.trainer import all_finite


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "bad",
    [[], [math.nan], [math.inf], [-math.inf], [math.inf, -math.inf], [math.nan, math.inf]],
    ids=["finite", "nan", "inf", "-inf", "inf and -inf", "nan and inf"],
)
def test_all_finite_agrees_with_isfinite_all(dtype, bad) -> None:
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(0)).to(dtype) * 1e4
    for i, value in enumerate(bad):
        x[17 + 1000 * i] = value
    got = all_finite(x)
    assert got.dtype == torch.bool and got.dim() == 0
    assert bool(got) == bool(torch.isfinite(x).all()) == (not bad)


def test_all_finite_of_an_empty_buffer_is_true() -> None:
    assert bool(all_finite(torch.empty(0)))
