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
         "fwd_bwd_tflops": 60.0, "fwd_bwd_host_ms": 1.20, "host_bound": True, "fwd_bwd_kernel_ms": 0.40,
         "fwd_bwd_host_no_launch_ms": 0.35},
    ]  # fmt: skip
    bench.add_ratios(rows)
    assert rows[1]["fwd_bwd_kernel_vs_sdpa"] == pytest.approx(1.6)
    lines = bench.table(rows).splitlines()
    assert "host ms" in lines[0] and "no-launch" in lines[0] and "kernel ms" in lines[0]
    assert "0.050" in lines[1] and "0.250" in lines[1] and "host-bound" not in lines[1]
    assert lines[2].rstrip().endswith("host-bound") and "4.81x" in lines[2] and "1.60x" in lines[2]
    assert "0.350" in lines[2] and lines[1].split()[-3] == "nan"  # no-launch time: fused kernel only


def test_no_triton_launches_skips_and_restores_every_kernel_of_a_module(bench) -> None:
    """Inside the block a module's Triton kernels launch nothing (the host's work around them is what a
    call then costs); after it they are the same objects again."""
    import types

    import triton
    import triton.language as tl

    @triton.jit
    def _kernel(X):
        tl.store(X, 1.0)

    module = types.SimpleNamespace(_kernel=_kernel, helper=len)
    launched = []
    with bench.no_triton_launches(module):
        assert module._kernel is not _kernel and module.helper is len
        assert module._kernel[(1,)]("not a tensor", flag=True) is None
        launched.append(True)
    assert launched and module._kernel is _kernel


def test_dms_rows_take_the_log_keep_bias_or_the_relaxed_logits(bench) -> None:
    """``--bias-from log_keep`` (default): the DMS kernels get the precomputed bias (over documents for the
    packed rows), as the training step does; ``relaxed``: the logits, the bias computed in the call."""
    calls = []

    def fake(q, k, v, relaxed, window, doc_ids=None, backend="auto", log_keep=None):
        calls.append((relaxed, doc_ids, backend, log_keep))

    lk = ("plain", "docs")
    for name, want in [("dms_triton", ("triton", None, "plain")), ("dms_flex", ("flex", None, "plain")),
                       ("dms_split_docs", ("split", "ids", "docs"))]:  # fmt: skip
        bench._kernel_fns(name, "q", "k", "v", "relaxed", 64, fake, "ids", lk)()
        relaxed, ids, backend, log_keep = calls.pop()
        assert relaxed is None and (backend, ids, log_keep) == want
        bench._kernel_fns(name, "q", "k", "v", "relaxed", 64, fake, "ids", None)()
        assert calls.pop() == ("relaxed", want[1], want[0], None)
