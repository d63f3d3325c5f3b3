"""The Triton attention's CUDA launch settings compiled for sm_90 on CPU (``benchmarks/kernel_resources.py``,
Triton's bundled ptxas): every kernel fits an H100's shared memory and keeps its spills small (the fp32
tiles used until 2026-12-08 spilled 21-25 KB per thread to local memory)."""

from __future__ import annotations

import pytest

from tests.unit.benchmark_module import load_benchmark

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return load_benchmark("kernel_resources").default_rows(["bf16", "fp32"], [128])


def test_default_settings_fit_an_h100_and_spill_little(rows) -> None:
    assert {(r["dtype"], r["kernel"]) for r in rows} == {
        (d, k) for d in ("bf16", "fp32") for k in ("fwd", "dkdv", "dq")
    }
    for r in rows:
        assert r["fits"] and 0 < r["shared_bytes"] <= 232448, r
        assert r["registers"] > 32 and r["stack_bytes"] < 2048, r


def test_table_lists_every_row(rows) -> None:
    text = load_benchmark("kernel_resources").table(rows)
    assert len(text.splitlines()) == len(rows) + 1 and "does not fit" not in text


def test_decode_kernel_compiles_with_its_merge_ordering() -> None:
    """The one-launch decode kernel for sm_90, with the ring (DMS) and without (paged backend): it fits,
    its arrival counter is an acquire-release add at GPU scope, the merging program reads the other
    programs' partials past L1, and block barriers surround the arrival."""
    bench = load_benchmark("kernel_resources")
    for ring in (True, False):
        r = bench.decode_resources("bf16", 128, ring=ring)
        assert r["fits"] and r["stack_bytes"] < 256, r
        assert r["atomics"] == ["atom.global.gpu.acq_rel.add.u32"], r
        assert r["l1_bypassing_loads"] > 0 and r["barriers"] >= 2, r
