"""The split DMS attention (band + old keys merged by log-sum-exp) against the reference, on CPU with
its torch engine: forward and all four gradients, float64, over windows, GQA and lengths."""

from __future__ import annotations

import pytest
import torch

from dms_megatron.core.attention import dms_attention_reference
from dms_megatron.core.shift import shifted_log_keep
from dms_megatron.kernels.split_attention import dms_attention_split, supported


def _inputs(B, Hq, Hkv, T, D, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, T, D, generator=gen, dtype=dtype) for h in (Hq, Hkv, Hkv))
    relaxed = torch.randn(B, Hkv, T, generator=gen, dtype=dtype) * 3
    return [x.requires_grad_() for x in (q, k, v, relaxed)]


def _grads(out, xs, g):
    return torch.autograd.grad(out, xs, g)


@pytest.mark.parametrize(
    ("B", "Hq", "Hkv", "T", "D", "window"),
    [
        (2, 4, 2, 37, 16, 5),  # GQA, several old keys per query
        (1, 3, 1, 50, 8, 0),  # MQA, window 0: every earlier key old
        (1, 2, 2, 29, 16, 1),
        (2, 2, 1, 20, 8, 19),  # W == T: no old part
        (1, 2, 1, 12, 8, 40),  # window past T
        (1, 5, 1, 64, 16, 30),
    ],
)
def test_forward_and_gradients_equal_the_reference(B, Hq, Hkv, T, D, window):
    q, k, v, relaxed = _inputs(B, Hq, Hkv, T, D, seed=T + window)
    g = torch.randn(B, Hq, T, D, dtype=torch.float64)
    ref = dms_attention_reference(q, k, v, relaxed, window)
    split = dms_attention_split(
        q, k, v, shifted_log_keep(relaxed), window, old_engine="math", band_engine="math"
    )
    torch.testing.assert_close(split, ref, rtol=1e-10, atol=1e-10)
    for got, want in zip(
        _grads(split, [q, k, v, relaxed], g), _grads(ref, [q, k, v, relaxed], g), strict=True
    ):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_bias_channels_keep_float32_precision_in_bfloat16():
    """The bias travels as a bf16 high + low pair: ~16 mantissa bits where one bf16 keeps 8."""
    from dms_megatron.kernels.split_attention import _old_inputs

    q, k, v = (torch.zeros(1, 1, 40, 8, dtype=torch.bfloat16) for _ in range(3))
    log_keep = -torch.rand(1, 1, 40) * 20
    scale = 8**-0.5
    _, ko, _ = _old_inputs(q, k, v, log_keep, slice(5, None), slice(0, 35), scale)
    carried = (ko[..., 8].float() + ko[..., 9].float()) * scale
    err = (carried - log_keep[..., :35]).abs().max().item()
    one_bf16 = (log_keep[..., :35] / scale).to(torch.bfloat16).float() * scale - log_keep[..., :35]
    assert err < 2e-4 and err < one_bf16.abs().max().item() / 50


def test_unsupported_inputs_are_named():
    q = torch.randn(1, 2, 8, 16)
    assert not supported(q, q, None)  # CPU tensors: the CUDA engines only
    with pytest.raises(ValueError, match="engine must be one of"):
        dms_attention_split(q, q, q, torch.zeros(1, 2, 8), 2, old_engine="nope")
    with pytest.raises(ValueError, match="sliding window"):
        dms_attention_split(q, q, q, torch.zeros(1, 2, 8), 2, band_engine="cudnn")
    with pytest.raises(ValueError, match="D == Dv"):
        dms_attention_split(q, q, torch.randn(1, 2, 8, 8), torch.zeros(1, 2, 8), 2)


def _doc_ids(lengths_per_row: list[list[int]]) -> torch.Tensor:
    rows = [torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in lengths_per_row]
    return torch.stack(rows)


@pytest.mark.parametrize(
    ("lengths", "Hq", "Hkv", "window"),
    [
        ([[10, 1, 25, 4]], 4, 2, 3),  # documents shorter than, equal to and longer than W
        ([[40]], 3, 1, 0),  # one document, window 0
        ([[7, 13, 20], [30, 10]], 2, 1, 5),  # [B, T] ids, batch rows packed differently
        ([[6, 6, 6]], 2, 2, 9),  # every document inside the band: no old part
        ([[3, 30, 1, 2]], 5, 1, 1),
    ],
)
def test_documents_equal_the_reference(lengths, Hq, Hkv, window):
    doc_ids = _doc_ids(lengths)
    B, T = doc_ids.shape
    q, k, v, relaxed = _inputs(B, Hq, Hkv, T, 8, seed=T + window)
    g = torch.randn(B, Hq, T, 8, dtype=torch.float64)
    ref = dms_attention_reference(q, k, v, relaxed, window, doc_ids=doc_ids)
    split = dms_attention_split(
        q, k, v, shifted_log_keep(relaxed, doc_ids), window, None, doc_ids,
        old_engine="math", band_engine="math",
    )  # fmt: skip
    torch.testing.assert_close(split, ref, rtol=1e-10, atol=1e-10)
    for got, want in zip(
        _grads(split, [q, k, v, relaxed], g), _grads(ref, [q, k, v, relaxed], g), strict=True
    ):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_teacher_causal_attention_over_documents_equals_the_reference():
    from dms_megatron.kernels.split_attention import causal_attention

    doc_ids = _doc_ids([[5, 17, 2, 9]])[0]  # [T]: shared by the batch rows
    q, k, v, _ = _inputs(2, 4, 2, 33, 8, seed=3)
    g = torch.randn(2, 4, 33, 8, dtype=torch.float64)
    ref = dms_attention_reference(q, k, v, None, 4, doc_ids=doc_ids)
    got = causal_attention(q, k, v, None, doc_ids, engine="math")
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    for a, b in zip(_grads(got, [q, k, v], g), _grads(ref, [q, k, v], g), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_document_layout_is_built_once_from_the_host_copy():
    from dms_megatron.kernels.split_attention import HOST_DOC_IDS, doc_layout

    ids = _doc_ids([[4, 9, 3]])[0]
    on_device = ids.clone()
    setattr(on_device, HOST_DOC_IDS, ids)  # what the batch packer attaches
    layout = doc_layout(on_device, 1, 16, 3)
    assert doc_layout(on_device, 1, 16, 3) is layout  # cached per W on the tensor
    assert layout.band.cu.tolist() == [0, 4, 13, 16] and layout.band.max_len == 9
    # rows at position >= 3 in their document: 3 of doc 0, 4..12 of doc 1 from its 4th token, none of doc 2
    assert layout.rows.tolist() == [3, 7, 8, 9, 10, 11, 12]
    assert layout.old.cu.tolist() == [0, 1, 7] and layout.old.max_len == 6
    assert doc_layout(on_device, 1, 16, 5) is not layout


def test_documents_must_be_contiguous_runs():
    from dms_megatron.kernels.split_attention import doc_layout

    with pytest.raises(ValueError, match="one run"):
        doc_layout(torch.tensor([0, 0, 1, 1, 0]), 1, 5, 1)
    with pytest.raises(ValueError, match="doc_ids must be"):
        doc_layout(torch.zeros(7, dtype=torch.long), 1, 5, 1)
