"""The Triton KL distillation kernels (``kernels.kd``, ``dms.kd_backend=triton``) equal
``core.losses.token_kl``: per-token KL and the student's gradient, both directions, temperatures 1 and 2,
vocabularies of 7 to 5001 (not multiples of the block), fp32 and fp16 logits, a vocabulary sharded over
two ranks (run by the Triton interpreter on CPU; tests/gpu/test_core_on_gpu.py checks bf16 on CUDA)."""

from __future__ import annotations

import pytest

pytest.importorskip("triton")
from tests.unit.interpreted import run_interpreted

CASES = 10


@pytest.fixture(scope="module")
def report() -> dict:
    return run_interpreted("kd_interpreted.py", CASES)


def test_kernels_equal_the_torch_kl_and_its_gradient(report) -> None:
    rows = report["cases"]
    assert len(rows) == CASES
    assert {r["reverse"] for r in rows} == {False, True} and {r["tau"] for r in rows} == {1.0, 2.0}
    assert any(r["V"] > 2048 and r["V"] % 2048 for r in rows)  # several blocks, a ragged last one
    for r in rows:
        assert r["shape_ok"] and r["grad_dtype_ok"], r
        assert r["kl_rel"] < 2e-5 and r["grad_rel"] < 2e-5, r


def test_shape_mismatch_is_rejected(report) -> None:
    assert report["shape_mismatch_rejected"]


def test_vocabulary_sharded_over_two_ranks_equals_the_whole_vocabulary(report) -> None:
    """Two gloo ranks, each with half the vocabulary (temperature 2): every rank's per-token KL and the
    concatenated shard gradients equal the torch KL of the whole vocabulary."""
    sharded = report["sharded"]
    assert len(sharded["kl_rel_per_rank"]) == 2
    assert all(e < 1e-4 for e in sharded["kl_rel_per_rank"]), sharded
    assert sharded["grad_rel"] < 1e-4, sharded


def test_the_trainers_entry_takes_the_backend(report) -> None:
    """``vocab_parallel_kd_loss(..., backend="triton")`` (what ``dms.kd_backend=triton`` selects) equals
    the torch backend; an unknown backend is refused."""
    assert report["entry_rel"] < 1e-5 and report["unknown_backend_refused"], report
