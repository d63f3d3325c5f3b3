"""``patches.grad_norm``: megatron-core's TE-free gradient norm and scaling on foreach kernels equal the
upstream fallback's results (the scale bitwise), and install only over that fallback."""

from __future__ import annotations

import pytest
import torch

from dms_megatron.megatron.patches import is_applied
from dms_megatron.megatron.patches.grad_norm import (
    PATCHES,
    foreach_l2_norm,
    foreach_scale,
    use_foreach_grad_norm,
)


def _grads(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randn(*shape, generator=gen) * scale
        for shape, scale in (((7, 5), 1e-3), ((300,), 2.0), ((1,), 0.5))
    ]


def test_the_norm_is_the_norm_of_all_gradients_as_one_vector() -> None:
    grads = _grads()
    flag = torch.zeros(1, dtype=torch.int)
    norm, per_tensor = foreach_l2_norm(2048 * 32, flag, [grads], False)
    assert per_tensor is None and norm.shape == (1,) and norm.dtype == torch.float32
    want = torch.cat([g.flatten() for g in grads]).double().norm()
    assert float(norm) == pytest.approx(float(want), rel=1e-6)
    empty, _ = foreach_l2_norm(2048 * 32, flag, [[]], False)
    assert float(empty) == 0.0


def test_the_scale_is_bitwise_the_upstream_fallback() -> None:
    from megatron.core.utils import local_multi_tensor_scale

    flag = torch.zeros(1, dtype=torch.int)
    for scale in (0.37, 1.0):
        src = _grads(1)
        ours, theirs = [g.clone() for g in src], [g.clone() for g in src]
        foreach_scale(0, flag, [ours, ours], scale)  # in place, as gradient clipping calls it
        local_multi_tensor_scale(0, flag, [theirs, theirs], scale)
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
        ours = [torch.empty_like(g, dtype=torch.bfloat16) for g in src]  # fp32 main -> bf16 model params
        theirs = [torch.empty_like(g, dtype=torch.bfloat16) for g in src]
        foreach_scale(0, flag, [src, ours], scale)
        local_multi_tensor_scale(0, flag, [src, theirs], scale)
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))


def test_installed_only_over_the_fallback_and_idempotent() -> None:
    import megatron.core.optimizer.clip_grads as clip_grads
    from megatron.core.utils import local_multi_tensor_l2_norm

    if clip_grads.l2_norm_impl is not local_multi_tensor_l2_norm and not is_applied(PATCHES[0]):
        pytest.skip("Transformer Engine or Apex provides the fused kernels here: nothing to replace")
    applied = use_foreach_grad_norm()
    try:
        assert all(is_applied(p) for p in PATCHES)
        assert clip_grads.l2_norm_impl is foreach_l2_norm
        again = use_foreach_grad_norm()
        assert not again.saved  # already installed: nothing replaced twice
    finally:
        applied.restore()
    if applied.saved:
        assert clip_grads.l2_norm_impl is local_multi_tensor_l2_norm
