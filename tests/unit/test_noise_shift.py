"""Reproducible logistic noise and the one-token shift with document boundaries."""

from __future__ import annotations

import math

import pytest
import torch

from dms_megatron.core import (
    NoiseKey,
    doc_ids_from_cu_seqlens,
    logistic_noise,
    shift_to_previous_token,
    shifted_log_keep,
    uniform_from_hash,
)
from tests.unit.brute_force import brute_log_keep

KEY = NoiseKey(seed=1234, step=7, micro_batch=2, dp_rank=1, layer=3)


def test_noise_is_a_pure_function_of_its_coordinates():
    a = logistic_noise(KEY, (2, 4, 64))
    b = logistic_noise(NoiseKey(1234, 7, 2, 1, 3), (2, 4, 64))
    assert a.dtype == torch.float32
    assert torch.equal(a, b)
    for other in (
        NoiseKey(1235, 7, 2, 1, 3),
        NoiseKey(1234, 8, 2, 1, 3),
        NoiseKey(1234, 7, 3, 1, 3),
        NoiseKey(1234, 7, 2, 0, 3),
        NoiseKey(1234, 7, 2, 1, 4),
        NoiseKey(1234 + 2**32, 7, 2, 1, 3),
    ):
        c = logistic_noise(other, (2, 4, 64))
        assert not torch.equal(a, c), other
        assert abs(torch.corrcoef(torch.stack([a.flatten(), c.flatten()]))[0, 1]) < 0.1


def test_noise_slices_match_the_full_draw():
    """What a TP rank (head slice), a CP rank (position slice) or a sample slice sees is the same
    as the corresponding slice of the single-device draw."""
    full = logistic_noise(KEY, (4, 8, 96))
    tp1 = logistic_noise(KEY, (4, 4, 96), head_offset=4)
    cp = logistic_noise(KEY, (4, 8, 32), position_offset=64)
    mb = logistic_noise(KEY, (2, 8, 96), sample_offset=2)
    assert torch.equal(tp1, full[:, 4:])
    assert torch.equal(cp, full[:, :, 64:])
    assert torch.equal(mb, full[2:])


def test_noise_has_the_logistic_distribution():
    n = logistic_noise(KEY, (8, 16, 8192)).double()  # 1M samples
    assert abs(n.mean().item()) < 0.01
    assert n.var().item() == pytest.approx(math.pi**2 / 3, rel=0.01)
    # CDF check at a few points: F(x) = sigmoid(x)
    for x in (-3.0, -1.0, 0.0, 0.5, 2.0):
        assert (n <= x).double().mean().item() == pytest.approx(1 / (1 + math.exp(-x)), abs=0.002)
    u = uniform_from_hash(KEY, (1, 1, 100000))
    assert u.min() > 0 and u.max() < 1
    # independent across positions: lag-1 autocorrelation ~ 0
    flat = n.flatten()
    assert abs(torch.corrcoef(torch.stack([flat[:-1], flat[1:]]))[0, 1].item()) < 0.005


def test_noise_matches_on_another_device_dtype_path():
    # integer arithmetic only: the meta device would not compute; compare two fresh processes instead
    import subprocess
    import sys

    code = (
        "import torch; from dms_megatron.core import NoiseKey, logistic_noise; "
        "print(logistic_noise(NoiseKey(1234, 7, 2, 1, 3), (1, 2, 3)).tolist())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert eval(out) == logistic_noise(KEY, (1, 2, 3)).tolist()


def test_noise_key_validation():
    with pytest.raises(ValueError, match="step"):
        NoiseKey(0, -1, 0, 0, 0)
    with pytest.raises(ValueError, match="shape"):
        logistic_noise(KEY, (2, 3))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="head_offset"):
        logistic_noise(KEY, (1, 1, 1), head_offset=-1)


def test_shift_without_documents():
    x = torch.arange(12, dtype=torch.float64).view(1, 2, 6)
    out = shift_to_previous_token(x, fill=-1.0)
    assert out[0, 0].tolist() == [1, 2, 3, 4, 5, -1]
    assert out[0, 1].tolist() == [7, 8, 9, 10, 11, -1]


def test_shift_stops_at_document_boundaries():
    relaxed = torch.randn(2, 3, 9, dtype=torch.float64)
    doc = [0, 0, 1, 2, 2, 2, 3, 3, 4]  # documents of length 1 included
    got = shifted_log_keep(relaxed, torch.tensor(doc))
    torch.testing.assert_close(got, brute_log_keep(relaxed, doc))
    # per-sample document ids
    doc2 = torch.tensor([doc, [0] * 9])
    got2 = shifted_log_keep(relaxed, doc2)
    torch.testing.assert_close(got2[1], brute_log_keep(relaxed[1:], None)[0])


def test_shifted_log_keep_of_disabled_eviction_is_zero():
    relaxed = torch.full((1, 2, 5), float("-inf"))
    assert torch.equal(shifted_log_keep(relaxed), torch.zeros(1, 2, 5))


def test_doc_ids_from_cu_seqlens():
    ids = doc_ids_from_cu_seqlens(torch.tensor([0, 3, 4, 4, 8]), total_len=8)
    assert ids.tolist() == [0, 0, 0, 1, 3, 3, 3, 3]
    with pytest.raises(ValueError, match="start at 0"):
        doc_ids_from_cu_seqlens(torch.tensor([1, 3]))
    with pytest.raises(ValueError, match="non-decreasing"):
        doc_ids_from_cu_seqlens(torch.tensor([0, 3, 2]))
    with pytest.raises(ValueError, match="ends at 3"):
        doc_ids_from_cu_seqlens(torch.tensor([0, 3]), total_len=4)


def test_shift_with_a_kept_document_mask_equals_the_doc_ids_path_and_keeps_inf_semantics():
    from dms_megatron.core.shift import same_doc_as_next
    from dms_megatron.kernels.bias import same_next_mask, shifted_bias

    relaxed = torch.randn(2, 3, 9, dtype=torch.float64)
    relaxed[0, 1, 4] = float("-inf")  # eviction off for one key: its bias is 0
    doc = torch.tensor([0, 0, 1, 2, 2, 2, 3, 3, 4])
    want = shifted_log_keep(relaxed, doc)
    same = same_doc_as_next(doc.expand(2, 9))
    assert torch.equal(shifted_log_keep(relaxed, same_next=same), want)
    assert want[0, 1, 3] == 0
    # the backends' bias: fp32, the mask built once per ids object and reused by the next layer
    got = shifted_bias(relaxed, doc)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want.float())
    assert same_next_mask(doc, 2, 9, relaxed.device) is same_next_mask(doc, 2, 9, relaxed.device)
    other = doc.clone()
    assert same_next_mask(other, 2, 9, relaxed.device) is not same_next_mask(doc, 2, 9, relaxed.device)
    assert torch.equal(shifted_bias(relaxed, None), shifted_log_keep(relaxed.float()))
    with pytest.raises(ValueError, match="same_next must be"):
        shifted_log_keep(relaxed, same_next=same[:, :5])
