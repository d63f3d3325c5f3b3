"""The split DMS attention (cuDNN over the old keys + FlashAttention-2 band) on a GPU: equal to the
float64 reference within bf16 tolerance over randomized shapes, windows, packed documents (FlashAttention-2's
variable-length form), the teacher's bias-free mode and seeds, with either library for the old keys; and
how reproducible two runs are."""

from __future__ import annotations

import pytest
import torch

from dms_megatron.kernels.split_attention import dms_attention_split
from tests.gpu.test_triton_attention import _case, _rel, _run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _split_run(case: dict, engine: str, seed: int):
    """_run's inputs through the split kernel (the dispatcher would send documents elsewhere)."""
    import dms_megatron.kernels as kernels

    original = kernels.dms_attention

    def split(q, k, v, relaxed, window, scale=None, doc_ids=None, backend="split"):
        from dms_megatron.core.shift import shifted_log_keep
        from dms_megatron.kernels.split_attention import causal_attention

        if relaxed is None:
            return causal_attention(q, k, v, scale, doc_ids)
        log_keep = shifted_log_keep(relaxed, doc_ids)
        return dms_attention_split(q, k, v, log_keep, window, scale, doc_ids, old_engine=engine)

    import tests.gpu.test_triton_attention as t

    t.dms_attention = split
    try:
        return _run(case, torch.bfloat16, "split", seed)
    finally:
        t.dms_attention = original


@pytest.mark.parametrize("engine", ["cudnn", "flash"])
@pytest.mark.parametrize("seed", range(8))
def test_split_equals_the_float64_reference(seed, engine):
    case = {**_case(seed), "docs": seed % 2 == 1}  # half the seeds packed documents
    fast = _split_run(case, engine, seed)
    ref = _run(case, torch.bfloat16, "reference", seed)
    names = ["out", "dq", "dk", "dv", "devict_logits"][: len(fast)]
    errs = {n: _rel(a, b) for n, a, b in zip(names, fast, ref, strict=True)}
    print(case, engine, {n: f"{e:.1e}" for n, e in errs.items()})
    assert max(errs.values()) < 3e-2, (case, errs)


@pytest.mark.parametrize("docs", [False, True])
def test_two_runs_reproducibility_is_recorded(docs):
    case = {"B": 1, "Hkv": 1, "g": 5, "T": 4096, "D": 128, "window": 256, "docs": docs, "bias": True}
    first = _split_run(case, "cudnn", 7)
    again = _split_run(case, "cudnn", 7)
    same = [bool(torch.equal(a, b)) for a, b in zip(first, again, strict=True)]
    print(f"documents {docs}: bitwise identical (out, dq, dk, dv, devict):", same)
    assert same[0], "the forward must be deterministic"
