"""The fused Triton DMS attention equals the reference: output and the gradients of q, k, v and the
eviction logits, over seeded shapes (GQA groups, head dims, lengths off the block grid), windows
(0, 1, random, >= T), packed documents and the bias-free teacher mode. Run by the Triton interpreter on
CPU (fp32 and fp16: the interpreter's bf16 matmul is wrong, so bf16 is left to tests/gpu)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
from tests.unit.interpreted import run_interpreted

ROOT = Path(__file__).resolve().parents[2]
# seeded cases (the interpreter runs ~1-4 s per case): the default tiling, the GPU tilings' shape (5:
# every window kind, documents and the bias-free mode), and how many of the first are run twice
CASES = {"default_blocks": 6, "other_blocks": 5}
REPEATED = 3


@pytest.fixture(scope="module")
def report() -> dict:
    return run_interpreted(
        "triton_interpreted.py", CASES["default_blocks"], 3, CASES["other_blocks"], REPEATED
    )


@pytest.mark.parametrize("tiling", ["default_blocks", "other_blocks"])
def test_fp32_output_and_gradients_equal_the_reference(report, tiling) -> None:
    rows = report[tiling]
    assert len(rows) == CASES[tiling]
    assert {r["case"]["window"] for r in rows} >= {0, 1}
    assert any(r["case"]["docs"] for r in rows) and any(not r["case"]["bias"] for r in rows)
    for r in rows:
        assert len(r["errors"]) == (5 if r["case"]["bias"] else 4), r
        assert max(r["errors"]) < 2e-5, r


def test_fp32_equals_the_reference_at_the_cuda_default_tiles(report) -> None:
    """The GPU's tiles (kernels.triton_dms._CUDA_LAUNCH) in the interpreter: masking and bounds at block
    sizes up to 128 x 128 with lengths off the grid, documents and every window kind."""
    rows = report["cuda_blocks"]
    assert {r["case"]["D"] for r in rows} == {64, 128} and any(r["case"]["docs"] for r in rows)
    for r in rows:
        assert max(r["errors"]) < 2e-5, r


def test_fp32_equals_the_reference_at_the_cuda_fp32_tiles(report) -> None:
    rows = report["fp32_blocks"]
    assert len(rows) == 3 and any(r["case"]["docs"] for r in rows)
    for r in rows:
        assert max(r["errors"]) < 2e-5, r


def test_fp32_equals_the_reference_through_tensor_descriptors(report) -> None:
    """The "tma" launch option: key / value (forward, dQ) and query / output-gradient (dK/dV) tiles
    loaded through [B, H, T, D] tensor descriptors, contiguous and Megatron-strided inputs, documents."""
    rows = report["tma"]
    assert len(rows) == CASES["other_blocks"] and all(r["described"] for r in rows)
    assert any(r["case"]["strided"] for r in rows) and any(r["case"]["docs"] for r in rows)
    for r in rows:
        assert max(r["errors"]) < 2e-5, r


def test_repeated_runs_are_bitwise_identical(report) -> None:
    repeated = [r["bitwise_repeat"] for r in report["default_blocks"] if "bitwise_repeat" in r]
    assert len(repeated) == REPEATED and all(repeated)


def test_fp16_within_half_precision(report) -> None:
    for r in report["fp16"]:
        assert max(r["errors"]) < 2e-2, r


def test_clear_errors_without_running_a_kernel() -> None:
    from dms_megatron.kernels import dms_attention
    from dms_megatron.kernels.triton_dms import document_bounds

    q = torch.randn(1, 2, 8, 16)
    k = v = torch.randn(1, 1, 8, 16)
    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(ValueError, match="needs CUDA tensors"):
            dms_attention(q, k, v, None, 2, backend="triton")
    with pytest.raises(ValueError, match="head dims"):
        dms_attention(torch.randn(1, 2, 8, 24), torch.randn(1, 1, 8, 24), v, None, 2, backend="triton")
    with pytest.raises(ValueError, match="contiguous run"):
        document_bounds(torch.tensor([[0, 0, 1, 1, 0]]))
    start, end = document_bounds(torch.tensor([[0, 0, 1, 1, 1, 4]]))
    assert start.tolist() == [[0, 0, 2, 2, 2, 5]] and end.tolist() == [[2, 2, 5, 5, 5, 6]]


def test_tma_descriptors_only_where_requested_and_addressable() -> None:
    """``"tma"`` asks for [B, H, T, D] descriptors of ``rows``-row blocks; without it, or for a tensor TMA
    cannot address (base or a stride off 16 bytes), every kernel argument stays None (pointer loads)."""
    from dms_megatron.kernels.triton_dms import _descriptors

    x = torch.randn(1, 2, 40, 16)
    (desc,) = _descriptors({"tma": True}, 32, x)
    assert list(desc.shape) == [1, 2, 40, 16] and list(desc.block_shape) == [1, 1, 32, 16]
    assert _descriptors({}, 32, x) == (None,)
    shifted = torch.randn(2 * 40 * 16 + 1)[1:].view(1, 2, 40, 16)  # base 4 bytes off 16-byte alignment
    assert _descriptors({"tma": True}, 32, x, shifted) == (None, None)
