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


def test_auto_backend_takes_the_kernels_where_triton_runs_and_torch_elsewhere(monkeypatch) -> None:
    """``dms.kd_backend=auto`` (the default): the Triton loss on CUDA logits, the torch loss on CPU and
    for fp64 logits; both give the torch loss's value here."""
    import torch

    import dms_megatron.kernels.kd as kd
    import dms_megatron.kernels.triton_device as device
    from dms_megatron.config import DMSConfig
    from dms_megatron.core.losses import token_kl
    from dms_megatron.megatron.kd import vocab_parallel_token_kl

    assert DMSConfig().kd_backend == "auto"
    zs, zt = torch.randn(2, 5, 33), torch.randn(2, 5, 33)
    expected = token_kl(zs, zt)
    calls = []

    def fake_kernel(student, teacher, reverse, temperature, group):
        calls.append(student.dtype)
        return token_kl(student, teacher, "teacher_student" if reverse else "student_teacher", temperature)

    monkeypatch.setattr(kd, "token_kl_triton", fake_kernel)
    torch.testing.assert_close(vocab_parallel_token_kl(zs, zt, group=None, backend="auto"), expected)
    assert calls == []  # CPU tensors, no interpreter: the torch loss
    monkeypatch.setattr(device, "triton_runs_on", lambda dev: True)  # as on a CUDA device
    torch.testing.assert_close(vocab_parallel_token_kl(zs, zt, group=None, backend="auto"), expected)
    assert calls == [torch.float32]
    vocab_parallel_token_kl(zs.double(), zt.double(), group=None, backend="auto")
    assert calls == [torch.float32]  # fp64 logits stay on the torch loss
    with pytest.raises(ValueError, match="'auto', 'torch' or 'triton'"):
        vocab_parallel_token_kl(zs, zt, group=None, backend="cuda")
