"""``benchmarks/attention_bench.py`` without a GPU: the host issue time, the table's host-bound mark and
kernel-time ratios."""

from __future__ import annotations

import time

import pytest

from tests.unit.benchmark_module import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("attention_bench")


def test_host_issue_time_is_the_median_call_and_syncs_around_the_calls(bench) -> None:
    syncs: list[int] = []
    calls: list[int] = []

    def fn() -> None:
        calls.append(1)
        time.sleep(0.004 if len(calls) % 5 else 0.03)  # every fifth call slow: the median ignores it

    ms = bench.host_issue_ms(fn, calls=10, sync=lambda: syncs.append(len(calls)))
    assert len(calls) == 10 and syncs == [0, 10]
    assert 3.5 < ms < 20


def test_table_marks_host_bound_rows_and_gives_kernel_time_ratios(bench) -> None:
    rows = [
        {"Hq": 5, "Hkv": 1, "D": 128, "T": 4096, "kernel": "sdpa_default", "fwd_ms": 0.07, "fwd_bwd_ms": 0.26,
         "fwd_bwd_tflops": 285.0, "fwd_bwd_host_ms": 0.05, "host_bound": False, "fwd_bwd_kernel_ms": 0.25},
        {"Hq": 5, "Hkv": 1, "D": 128, "T": 4096, "kernel": "dms_triton", "fwd_ms": 0.10, "fwd_bwd_ms": 1.25,
         "fwd_bwd_tflops": 60.0, "fwd_bwd_host_ms": 1.20, "host_bound": True, "fwd_bwd_kernel_ms": 0.40},
    ]  # fmt: skip
    bench.add_ratios(rows)
    assert rows[1]["fwd_bwd_kernel_vs_sdpa"] == pytest.approx(1.6)
    lines = bench.table(rows).splitlines()
    assert "host ms" in lines[0] and "kernel ms" in lines[0]
    assert "0.050" in lines[1] and "0.250" in lines[1] and "host-bound" not in lines[1]
    assert lines[2].rstrip().endswith("host-bound") and "4.81x" in lines[2] and "1.60x" in lines[2]
