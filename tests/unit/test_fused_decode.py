"""The fused ring + pages decode kernel, and the same kernel without the ring (``paged_decode``'s triton
backend), equal the unfused reference composition (paged attention, torch attention over the window
ring, log-sum-exp merge) over seeded streams: empty and long page lists (1-4 programs per stream, merged
by the last to arrive), rings from 1 slot to 70, GQA groups 1-5, head dims 16/32, block sizes 4/16; and
the batch engine with it (its decode step then also runs the one-kernel RMSNorm and RoPE of
``kernels.fused_elementwise``, checked against the torch functions here too) equals the engine with the
reference backend. Run by the Triton interpreter on CPU (fp32 and fp16; bf16 is left to tests/gpu)"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
from tests.unit.interpreted import run_interpreted

ROOT = Path(__file__).resolve().parents[2]
CASES = 8


@pytest.fixture(scope="module")
def report() -> dict:
    return run_interpreted("fused_decode_interpreted.py", CASES)


def test_fp32_equals_the_unfused_reference(report) -> None:
    rows = report["fp32"]
    assert len(rows) == CASES
    assert any(0 in r["lengths"] for r in rows) and any(max(r["lengths"]) > 64 for r in rows)
    assert {r["W"] for r in rows} >= {1, 70}
    for r in rows:
        assert r["max_abs_error"] < 1e-5 and r["fp16_output_equals_rounded_fp32"], r
        # the same kernel without the ring: paged_decode's triton backend (output and log-sum-exp)
        assert r["split_path_max_abs_error"] < 1e-5 and r["split_path_empty_ok"], r


def test_the_last_program_of_a_stream_merges_its_splits(report) -> None:
    """One launch: the split programs of a stream count in on its arrival counter and the last one merges
    (the fp32 cases above run 1-4 page splits plus the ring); every counter is back to 0 after each launch;
    a stream with one program (enough streams, no ring) writes output and log-sum-exp directly."""
    assert {r["page_splits"] for r in report["fp32"]} >= {1, 2, 4}
    assert all(r["counters_zero_after"] for r in report["fp32"] + report["fp16"])
    one = report["single_split"]
    assert one["page_splits"] == 1 and one["empty_ok"], one
    assert one["max_abs_error"] < 1e-5 and one["lse_max_abs_error"] < 1e-5, one


def test_fp16_within_half_precision(report) -> None:
    for r in report["fp16"]:
        assert r["max_abs_error"] < 1e-2, r


def test_engine_with_the_fused_kernel_equals_the_reference_backend(report) -> None:
    """``CompressedKV(backend="fused")``: the same greedy tokens from the batch engine and the same
    logits at every decode step (1e-4) as the reference backend, on a tiny DMS Llama."""
    assert report["engine"]["same_tokens"]
    assert report["engine"]["max_logit_error"] < 1e-4, report["engine"]


def test_fused_norm_rotary_and_gate_equal_the_torch_functions(report) -> None:
    """One-kernel RMSNorm, RoPE and SiLU gate (the fused decode path) == the inference model's torch
    functions: fp32 to rounding (the sum of squares in another order), 16-bit within one unit in the
    last place (each intermediate rounded as torch rounds it), RoPE bit-exact."""
    errs = report["elementwise"]
    assert all(e < 1e-5 for e in errs["fp32"].values()), errs["fp32"]
    for key in ("fp16", "fp16 x, fp32 weight"):
        assert errs[key]["rotary q"] == 0.0 and errs[key]["rotary k"] == 0.0, errs[key]
        assert all(e <= 4e-3 for e in errs[key].values()), errs[key]  # values up to ~4: 1 ulp


def test_decode_commit_kernel_equals_the_torch_path(report) -> None:
    """``kernels.ring_commit`` leaves every cache tensor bit-identical to ``CompressedKV``'s torch path:
    windows 4 and 0 (a one-slot ring), positions before / at / past the ring size, with and without
    decisions; the cases change the ring, flags, page counts and pools (nothing vacuous)."""
    rows = report["commit"]
    assert {r["W"] for r in rows} == {1, 5} and {r["logits"] for r in rows} == {True, False}
    changed = set().union(*(r["changed"] for r in rows))
    assert changed >= {"ring_k", "ring_v", "ring_flag", "paged", "k_pool", "v_pool"}, changed
    for r in rows:
        assert r["mismatch"] == [], r


def test_empty_stream_gives_zeros(report) -> None:
    assert report["empty_stream_is_zero"]


def test_cpu_tensors_need_the_interpreter() -> None:
    from dms_megatron.kernels.fused_decode import ring_paged_decode_attention

    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the interpreter is on in this process")
    z = torch.zeros(1, 1, 16)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        ring_paged_decode_attention(
            z, torch.zeros(1, 4, 16), torch.zeros(1, 4, 16), torch.zeros(1, 1, dtype=torch.int32),
            torch.zeros(1, dtype=torch.long), torch.zeros(1, 3, 16), torch.zeros(1, 3, 16), torch.ones(1),
        )  # fmt: skip
