"""The fused decisions + log-keep kernel (``kernels.decisions``) equals the core's torch ops
(``relaxed_decisions`` then ``shifted_log_keep``): the same hard decisions, values and gradients within
float rounding, a zero bias at every document's last key (run by the Triton interpreter on CPU)."""

from __future__ import annotations

import pytest

pytest.importorskip("triton")
from tests.unit.interpreted import run_interpreted

CASES = 14


@pytest.fixture(scope="module")
def report() -> dict:
    return run_interpreted("decisions_interpreted.py", CASES)


def test_kernel_equals_the_core_ops(report) -> None:
    rows = report["cases"]
    assert len(rows) == CASES
    assert any(r["shape"][2] > 1024 for r in rows)  # more than one program per row
    assert any(r["documents"] for r in rows) and any(not r["documents"] for r in rows)
    assert {r["draw"] for r in rows} == {"none", "noise", "uniforms"}
    assert any(r["per_layer"] and r["draw"] != "none" for r in rows) and any(r["strided"] for r in rows)
    for r in rows:
        assert r["dtypes"] == ["torch.float32", "torch.float32"], r
        assert r["hard_equal"] and r["last_keys_zero"], r
        assert r["decisions_max_error"] <= 1e-6, r
        assert r["log_keep_max_error"] <= 1e-5, r
        assert r["grad_max_error"] <= 1e-5 * max(1.0, r["grad_max"]), r


def test_kernel_rejects_bad_inputs(report) -> None:
    assert report["bad_inputs_rejected"] == [True, True, True, True]


def test_megatron_core_attention_with_the_kernels_equals_the_reference_path() -> None:
    """``DMSCoreAttention`` in training mode: Triton attention + fused decisions (interpreter) == the
    reference attention + the core's torch decisions, output, decisions and all four gradients, with and
    without packed documents; and == the Triton attention behind the core's torch decisions, in fewer
    launches forward and backward (aten ops that launch a GPU kernel + Triton kernels)."""
    report = run_interpreted("core_attention_interpreted.py")
    for layout in ("sbhd", "thd"):
        r = report[layout]
        assert r["hard_equal"] and r["decisions"] <= 1e-6, r
        for key in ("out", "grad_q", "grad_k", "grad_v", "grad_logits"):
            assert r[key] <= 1e-5, (layout, key, r)
        assert r["unfused_max_difference"] <= 1e-5, r
        fused, unfused = r["launches_fused"], r["launches_unfused"]
        assert fused["forward"] < unfused["forward"] and fused["backward"] < unfused["backward"], r
