"""Compression loss, CR schedule and the chunked KL distillation loss."""

from __future__ import annotations

import pytest
import torch

from dms_megatron.core import (
    CRSchedule,
    compression_hinge,
    compression_loss,
    decision_sums,
    distillation_loss,
    kd_token_mask,
    target_fraction,
    token_kl,
)
from tests.unit.brute_force import brute_kl


def _brute_compression(layers, target, valid, per_layer):
    B = layers[0].shape[0]
    losses = []
    for b in range(B):
        per = []
        tot, cnt = 0.0, 0.0
        for d in layers:
            s = c = 0.0
            for h in range(d.shape[1]):
                for t in range(d.shape[2]):
                    if valid is None or valid[b, t]:
                        s += float(d[b, h, t])
                        c += 1
            per.append(max(0.0, target - s / c))
            tot, cnt = tot + s, cnt + c
        losses.append(sum(per) / len(per) if per_layer else max(0.0, target - tot / cnt))
    return sum(losses) / B


@pytest.mark.parametrize("per_layer", [False, True])
def test_compression_loss_matches_brute_force(per_layer):
    gen = torch.Generator().manual_seed(0)
    layers = [(torch.rand(3, 2, 10, generator=gen) > p).double() for p in (0.2, 0.5, 0.9)]
    valid = torch.rand(3, 10, generator=gen) > 0.3
    for v in (None, valid):
        got = compression_loss(layers, 0.6, valid=v, per_layer=per_layer)
        assert got.item() == pytest.approx(_brute_compression(layers, 0.6, v, per_layer), abs=1e-12)
    stacked = torch.stack(layers, dim=1)
    assert compression_loss(stacked, 0.6, per_layer=per_layer).item() == pytest.approx(
        compression_loss(layers, 0.6, per_layer=per_layer).item()
    )


def test_partial_sums_compose_across_stages():
    """Summing per-stage partial sums then applying the hinge == the all-layer loss (PP exactness)."""
    gen = torch.Generator().manual_seed(1)
    layers = [(torch.rand(2, 4, 16, generator=gen) > 0.5).double() for _ in range(4)]
    stage1 = [decision_sums(d) for d in layers[:2]]
    stage2 = [decision_sums(d) for d in layers[2:]]
    total = sum(s for s, _ in stage1 + stage2)
    count = sum(c for _, c in stage1 + stage2)
    assert compression_hinge(total, count, 0.75).item() == pytest.approx(
        compression_loss(layers, 0.75).item()
    )


def test_compression_gradient_flows_only_below_target():
    soft = torch.tensor([[[0.2, 0.9, 0.4, 0.6]]], requires_grad=True)
    dec = (soft > 0.5).float() - soft.detach() + soft
    compression_loss([dec], target_fraction=0.75).backward()  # frac 0.5 < 0.75: pushes all up
    torch.testing.assert_close(soft.grad, torch.full_like(soft, -0.25))
    soft.grad = None
    dec = (soft > 0.5).float() - soft.detach() + soft
    compression_loss([dec], target_fraction=0.25).backward()  # frac 0.5 >= 0.25: no gradient
    assert torch.all(soft.grad == 0)


def test_compression_errors():
    with pytest.raises(ValueError, match="target_fraction"):
        compression_loss([torch.zeros(1, 1, 2)], 1.0)
    with pytest.raises(ValueError, match="at least one layer"):
        compression_loss([], 0.5)
    with pytest.raises(ValueError, match="valid"):
        compression_loss([torch.zeros(2, 1, 3)], 0.5, valid=torch.ones(2, 4, dtype=torch.bool))


def test_schedule():
    s = CRSchedule(end_cr=8.0, ramp_steps=700)
    assert s.cr(0) == 1.0 and s.cr(350) == pytest.approx(4.5) and s.cr(700) == 8.0 and s.cr(5000) == 8.0
    assert s.target_fraction(700) == pytest.approx(1 - 1 / 8)
    assert CRSchedule(end_cr=4.0, ramp_steps=0).cr(0) == 4.0
    assert target_fraction(1.0) == 0.0
    for bad in (
        {"end_cr": 0.5, "ramp_steps": 1},
        {"end_cr": 2.0, "ramp_steps": -1},
        {"end_cr": 2.0, "ramp_steps": 1, "start_cr": 0.9},
    ):
        with pytest.raises(ValueError):
            CRSchedule(**bad)
    with pytest.raises(ValueError, match="compression ratio"):
        target_fraction(0.99)


@pytest.mark.parametrize("direction", ["student_teacher", "teacher_student"])
@pytest.mark.parametrize(("tau", "chunk"), [(1.0, 7), (2.0, 100), (0.5, 1)])
def test_kl_matches_brute_force_value_and_gradient(direction, tau, chunk):
    gen = torch.Generator().manual_seed(0)
    zs = (torch.randn(3, 5, 37, generator=gen, dtype=torch.float64) * 3).requires_grad_()
    zt = (torch.randn(3, 5, 37, generator=gen, dtype=torch.float64) * 3).requires_grad_()
    kl = token_kl(zs, zt, direction=direction, temperature=tau, vocab_chunk=chunk)
    ref = brute_kl(zs, zt, reverse=direction == "teacher_student", tau=tau)
    assert kl.dtype == torch.float64 and kl.shape == (3, 5)  # fp64 in, fp64 math
    torch.testing.assert_close(kl, ref, rtol=1e-10, atol=1e-12)
    w = torch.rand(3, 5, generator=gen, dtype=torch.float64)
    (g,) = torch.autograd.grad((kl * w).sum(), zs)
    (gref,) = torch.autograd.grad((ref * w).sum(), zs)
    torch.testing.assert_close(g, gref, rtol=1e-10, atol=1e-12)
    assert zt.grad is None  # the teacher never receives a gradient


def test_kl_of_bf16_logits_is_fp32_and_masked_mean():
    gen = torch.Generator().manual_seed(0)
    zs = torch.randn(2, 4, 50, generator=gen).bfloat16().requires_grad_()
    zt = torch.randn(2, 4, 50, generator=gen).bfloat16()
    mask = torch.tensor([[1, 1, 0, 1], [0, 0, 0, 1]], dtype=torch.bool)
    loss = distillation_loss(zs, zt, mask=mask)
    ref = brute_kl(zs.detach(), zt, reverse=False)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx((ref * mask).sum().item() / 4, rel=1e-5)
    loss.backward()
    assert zs.grad.dtype == torch.bfloat16 and torch.all(zs.grad[0, 2] == 0)
    assert distillation_loss(zs, zt, mask=torch.zeros(2, 4, dtype=torch.bool)).item() == 0.0
    assert distillation_loss(zs, zs.detach()).item() == pytest.approx(0.0, abs=1e-6)


def test_kl_errors():
    z = torch.zeros(2, 5)
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        token_kl(z, torch.zeros(2, 6))
    with pytest.raises(ValueError, match="direction"):
        token_kl(z, z, direction="forward")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="temperature"):
        token_kl(z, z, temperature=0)
    with pytest.raises(ValueError, match="mask"):
        distillation_loss(z, z, mask=torch.ones(3))


def test_kd_token_mask_drops_eos_inputs_and_padding():
    ids = torch.tensor([[5, 2, 7, 9], [2, 3, 0, 0]])
    valid = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    assert kd_token_mask(ids, 2, valid).tolist() == [[True, False, True, True], [False, True, False, False]]
    assert kd_token_mask(ids, [2, 9]).tolist() == [[True, False, True, False], [False, True, True, True]]
    with pytest.raises(ValueError, match="integer"):
        kd_token_mask(ids.float(), 2)
