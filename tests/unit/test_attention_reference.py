"""dms_attention_reference against the loop-based oracle, gradients, edge cases and errors."""

from __future__ import annotations

import pytest
import torch

from dms_megatron.core import dms_attention_reference
from tests.unit.brute_force import brute_dms_attention


def _inputs(B=2, Hq=4, Hkv=2, T=9, D=4, seed=0, dtype=torch.float64, requires_grad=True):
    gen = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=gen, dtype=dtype).requires_grad_(requires_grad)  # noqa: E731
    # logits spread so that log-keep ranges from ~0 to strongly negative
    return (
        mk(B, Hq, T, D),
        mk(B, Hkv, T, D),
        mk(B, Hkv, T, D),
        (mk(B, Hkv, T) * 3).detach().requires_grad_(requires_grad),
    )


@pytest.mark.parametrize(
    ("Hq", "Hkv", "T", "window", "chunk"),
    [
        (4, 2, 9, 2, None),  # GQA group 2
        (4, 4, 9, 0, 4),  # MHA (group 1), window 0, chunked
        (4, 1, 11, 3, 3),  # group 4
        (5, 1, 7, 1, 2),  # group 5 (R1-Distill-32B at TP=8)
        (2, 1, 6, 6, None),  # window >= T: no eviction effect
        (2, 1, 6, 100, 1),
        (2, 2, 1, 0, None),  # T = 1
    ],
)
def test_matches_brute_force_outputs_and_all_gradients(Hq, Hkv, T, window, chunk):
    q, k, v, lg = _inputs(Hq=Hq, Hkv=Hkv, T=T)
    out = dms_attention_reference(q, k, v, lg, window, chunk_size=chunk)
    ref = brute_dms_attention(q, k, v, lg, window)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, lg), grad_out)
    want = torch.autograd.grad(ref, (q, k, v, lg), grad_out, materialize_grads=True)
    for name, a, b in zip(["q", "k", "v", "evict_logits"], got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=f"gradient of {name}")


def test_gradcheck_including_evict_logits():
    q, k, v, lg = _inputs(B=1, Hq=4, Hkv=2, T=7, D=3)
    fn = lambda *a: dms_attention_reference(*a, window=2, chunk_size=3)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v, lg), eps=1e-6, atol=1e-7)
    assert torch.autograd.gradgradcheck(fn, (q, k, v, lg), eps=1e-6, atol=1e-6)


def test_documents_are_masked_and_shift_stops_at_boundaries():
    q, k, v, lg = _inputs(B=2, Hq=4, Hkv=2, T=10)
    doc = [0, 0, 0, 1, 2, 2, 2, 2, 2, 3]  # includes documents of length 1
    out = dms_attention_reference(q, k, v, lg, window=1, doc_ids=torch.tensor(doc), chunk_size=4)
    ref = brute_dms_attention(q, k, v, lg, window=1, doc=doc)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g1 = torch.autograd.grad(out.sum(), lg)[0]
    g2 = torch.autograd.grad(ref.sum(), lg)[0]
    torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-12)
    # the logit at a document's first position may not influence anything (it would decide the
    # previous document's last token): its gradient must be exactly zero
    for first in (3, 4, 9):
        assert torch.all(g1[:, :, first] == 0)


def test_packed_documents_equal_separate_sequences():
    q, k, v, lg = _inputs(B=1, Hq=2, Hkv=1, T=8, requires_grad=False)
    doc = torch.tensor([0] * 5 + [1] * 3)
    packed = dms_attention_reference(q, k, v, lg, window=1, doc_ids=doc)
    first = dms_attention_reference(q[:, :, :5], k[:, :, :5], v[:, :, :5], lg[:, :, :5], window=1)
    second = dms_attention_reference(q[:, :, 5:], k[:, :, 5:], v[:, :, 5:], lg[:, :, 5:], window=1)
    torch.testing.assert_close(packed, torch.cat([first, second], dim=2), rtol=0, atol=1e-13)


def test_no_eviction_equals_causal_sdpa():
    q, k, v, _ = _inputs(B=2, Hq=4, Hkv=2, T=12, requires_grad=False)
    out = dms_attention_reference(q, k, v, None, window=0)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out, sdpa, rtol=1e-12, atol=1e-12)
    # strongly negative logits mean "keep everything": the bias is log(1 - sigmoid(-inf)) = 0
    keep_all = torch.full((2, 2, 12), -1e4, dtype=torch.float64)
    torch.testing.assert_close(dms_attention_reference(q, k, v, keep_all, window=0), sdpa)


def test_hard_eviction_limit_masks_keys_outside_window():
    # huge positive logits: every key with a successor is evicted once outside the window
    q, k, v, _ = _inputs(B=1, Hq=1, Hkv=1, T=8, requires_grad=False)
    evict_all = torch.full((1, 1, 8), 1e4, dtype=torch.float64)
    out = dms_attention_reference(q, k, v, evict_all, window=2)
    # equivalent sliding-window attention (keys i-2..i)
    idx = torch.arange(8)
    allowed = (idx[:, None] - idx[None, :] >= 0) & (idx[:, None] - idx[None, :] <= 2)
    sw = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    torch.testing.assert_close(out, sw, rtol=1e-10, atol=1e-10)


def test_low_precision_inputs_use_fp32_math():
    q, k, v, lg = _inputs(T=16, dtype=torch.float64, requires_grad=False)
    ref = dms_attention_reference(q, k, v, lg, window=3)
    out = dms_attention_reference(q.bfloat16(), k.bfloat16(), v.bfloat16(), lg.float(), window=3)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref, rtol=0.05, atol=0.05)


_LONG_RUN = """
import resource, sys, torch
from dms_megatron.core import dms_attention_reference
T = 8192
gen = torch.Generator().manual_seed(0)
q = torch.randn(1, 4, T, 16, generator=gen, requires_grad=True)
k = torch.randn(1, 1, T, 16, generator=gen, requires_grad=True)
v = torch.randn(1, 1, T, 16, generator=gen, requires_grad=True)
lg = torch.randn(1, 1, T, generator=gen, requires_grad=True)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = dms_attention_reference(q, k, v, lg, window=64)
out.sum().backward()
assert out.shape == (1, 4, T, 16) and torch.isfinite(lg.grad).all() and lg.grad.abs().sum() > 0
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)
"""


def test_long_sequence_forward_backward_is_memory_bounded():
    """T=8192, 4 query heads: one fp32 score matrix alone is 1 GiB; chunking must stay far below."""
    import os
    import subprocess
    import sys

    # Large blocks via mmap are returned to the OS on free, so peak RSS tracks live memory instead of
    # glibc's retained heap (measured: 240 MiB chunked vs 3.2 GiB with chunk_size=T).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    res = subprocess.run(
        [sys.executable, "-c", _LONG_RUN], capture_output=True, text=True, timeout=300, env=env
    )
    assert res.returncode == 0, res.stderr
    peak_growth_mib = int(res.stdout.strip().splitlines()[-1])
    assert peak_growth_mib < 512, f"peak RSS grew by {peak_growth_mib} MiB"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"q": torch.zeros(1, 3, 4, 2), "k": torch.zeros(1, 2, 4, 2), "v": torch.zeros(1, 2, 4, 2)},
            "multiple",
        ),
        ({"k": torch.zeros(1, 1, 4, 3), "v": torch.zeros(1, 1, 4, 3)}, "head dims differ"),
        ({"window": -1}, "window"),
        ({"q": torch.zeros(1, 2, 4)}, "4 dims"),
        ({"q": torch.zeros(1, 2, 4, 2, dtype=torch.int64)}, "floating-point"),
        ({"q": torch.zeros(1, 2, 4, 2, dtype=torch.float64)}, "share a dtype"),
        ({"evict_logits": torch.zeros(1, 1, 5)}, r"\[B, Hkv, T\]"),
        ({"doc_ids": torch.zeros(4)}, "integer"),
        ({"doc_ids": torch.zeros(5, dtype=torch.long)}, "doc_ids"),
        ({"chunk_size": 0}, "chunk_size"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    args = {
        "q": torch.zeros(1, 2, 4, 2),
        "k": torch.zeros(1, 1, 4, 2),
        "v": torch.zeros(1, 1, 4, 2),
        "evict_logits": torch.zeros(1, 1, 4),
        "window": 1,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        dms_attention_reference(**args)
