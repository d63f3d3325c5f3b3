"""Eviction logits (neuron and adapter) and decisions."""

from __future__ import annotations

import pytest
import torch

from dms_megatron.core import (
    EvictionAdapter,
    hard_decisions,
    neuron_evict_logits,
    per_layer_logits,
    relaxed_decisions,
    teacher_decisions,
    zero_neuron,
)


def _rotate_half_rope(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    D = x.shape[-1]
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=x.dtype) / D))
    ang = pos[:, None].to(x.dtype) * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    x1, x2 = x[..., : D // 2], x[..., D // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


@pytest.mark.parametrize(("Hq", "Hkv"), [(4, 4), (4, 2), (8, 2), (5, 1)])
def test_neuron_logits_read_last_channel_of_each_groups_first_head(Hq, Hkv):
    q = torch.randn(3, 2, Hq, 8, dtype=torch.float64)  # Megatron layout [s, b, heads, D]
    logits = neuron_evict_logits(q, Hkv, scale=100.0, offset=5.0)
    g = Hq // Hkv
    assert logits.shape == (3, 2, Hkv)
    for j in range(Hkv):
        torch.testing.assert_close(logits[..., j], 100.0 * q[:, :, j * g, 7] - 5.0)


def test_neuron_logits_with_heads_on_axis_1_and_gradient():
    q = torch.randn(2, 6, 5, 4, dtype=torch.float64, requires_grad=True)  # [B, Hq, T, D]
    logits = neuron_evict_logits(q, 2, scale=10.0, offset=1.0, head_axis=1)
    assert logits.shape == (2, 2, 5)
    torch.testing.assert_close(logits[:, 1], 10.0 * q[:, 3, :, 3] - 1.0)
    (grad,) = torch.autograd.grad(logits.sum(), q)
    expect = torch.zeros_like(q)
    expect[:, ::3, :, 3] = 10.0
    torch.testing.assert_close(grad, expect)


def test_zero_neuron_before_and_after_rope_leaves_no_trace():
    Hq, Hkv, D = 4, 2, 8
    q = torch.randn(6, Hq, D, dtype=torch.float64)  # [T, heads, D]
    pos = torch.arange(6)
    z = zero_neuron(q, Hkv)
    assert torch.all(z[:, ::2, -1] == 0)
    torch.testing.assert_close(z[:, 1::2], q[:, 1::2])  # other heads untouched
    torch.testing.assert_close(z[:, ::2, :-1], q[:, ::2, :-1])  # other channels untouched
    rotated = _rotate_half_rope(z.transpose(0, 1), pos).transpose(0, 1)
    # RoPE pairs channel D-1 with D/2-1: after rotation the zeroed channel is generally non-zero ...
    assert rotated[1:, ::2, -1].abs().max() > 0
    # ... so it is zeroed again, which leaves the paired channel as the only carrier of q[D/2-1]
    again = zero_neuron(rotated, Hkv)
    assert torch.all(again[:, ::2, -1] == 0)
    assert not q.is_set_to(z) and z.data_ptr() != q.data_ptr()


def test_adapter_starts_at_minus_offset_and_learns():
    ad = EvictionAdapter(hidden_size=16, num_kv_heads=3, scale=100.0, offset=5.0).double()
    x = torch.randn(4, 2, 16, dtype=torch.float64)
    out = ad(x)
    assert out.shape == (4, 2, 3)
    assert torch.all(out == -5.0)
    out.sum().backward()
    assert ad.proj.weight.grad.abs().sum() > 0  # the zero init is not a dead end
    with pytest.raises(ValueError, match="hidden size"):
        ad(torch.randn(2, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="positive"):
        EvictionAdapter(0, 2)


def test_per_layer_broadcasts_head_zero():
    logits = torch.randn(2, 5, 3)
    out = per_layer_logits(logits, head_axis=1)
    assert out.shape == logits.shape
    for j in range(5):
        torch.testing.assert_close(out[:, j], logits[:, 0])


def test_relaxed_decisions_forward_hard_backward_soft():
    logits = torch.tensor([-3.0, -0.05, 0.05, 3.0], dtype=torch.float64, requires_grad=True)
    noise = torch.tensor([0.0, 0.1, -0.1, 0.0], dtype=torch.float64)
    dec, relaxed = relaxed_decisions(logits, noise, tau=0.1)
    assert dec.dtype == torch.float32  # fp32 whatever the input dtype
    torch.testing.assert_close(dec, torch.tensor([0.0, 1.0, 0.0, 1.0]))
    torch.testing.assert_close(relaxed.double(), (logits.detach() + noise) / 0.1)
    dec.sum().backward()
    soft = torch.sigmoid((logits.detach() + noise) / 0.1)
    torch.testing.assert_close(
        logits.grad, (soft * (1 - soft) / 0.1).to(logits.grad.dtype), rtol=1e-5, atol=1e-7
    )


def test_relaxed_decisions_errors_and_modes():
    with pytest.raises(ValueError, match="tau"):
        relaxed_decisions(torch.zeros(3), None, tau=0.0)
    with pytest.raises(ValueError, match="noise shape"):
        relaxed_decisions(torch.zeros(3), torch.zeros(4), tau=0.1)
    with pytest.raises(ValueError, match="floating"):
        relaxed_decisions(torch.zeros(3, dtype=torch.long), None, tau=0.1)
    t = teacher_decisions(torch.randn(2, 3))
    assert torch.all(t.decisions == 0) and torch.all(torch.isneginf(t.relaxed))
    assert hard_decisions(torch.tensor([-1.0, 0.0, 2.0])).tolist() == [0, 0, 1]


def test_neuron_errors():
    with pytest.raises(ValueError, match="multiple"):
        neuron_evict_logits(torch.zeros(2, 3, 4), num_kv_heads=2)
    with pytest.raises(ValueError, match="channel"):
        neuron_evict_logits(torch.zeros(2, 4, 4), num_kv_heads=2, head_axis=-1)
    with pytest.raises(ValueError, match="floating"):
        zero_neuron(torch.zeros(2, 4, 4, dtype=torch.long), num_kv_heads=2)


@pytest.mark.parametrize("head_axis", [-2, 1])
def test_neuron_mask_and_fade_equal_zero_neuron(head_axis):
    from dms_megatron.core.gating import fade_neuron, neuron_mask

    shape = (3, 7, 6, 8) if head_axis == -2 else (3, 6, 7, 8)  # 6 query heads, 2 KV heads
    q = torch.randn(*shape, dtype=torch.float64)
    ref = zero_neuron(q, 2, head_axis)
    mask = neuron_mask(q, 2, head_axis)
    assert torch.equal(q * mask, ref)
    assert mask.dtype == q.dtype and int((mask == 0).sum()) == 2  # channel D-1 of heads 0 and 3
    assert neuron_mask(q, 2, head_axis).data_ptr() == mask.data_ptr()  # built once, then reused
    assert torch.equal(fade_neuron(q, 2, 0.0, head_axis), ref)
    assert fade_neuron(q, 2, 1.0, head_axis) is q
    # the fade in between: the channel scaled by keep, every other channel untouched
    torch.testing.assert_close(fade_neuron(q, 2, 0.25, head_axis), ref + 0.25 * (q - ref))
    # gradient: 0 through the zeroed channel, 1 elsewhere
    x = q.clone().requires_grad_(True)
    fade_neuron(x, 2, 0.0, head_axis).sum().backward()
    assert torch.equal(x.grad, mask.expand_as(q))
