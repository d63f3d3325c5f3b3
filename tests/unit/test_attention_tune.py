"""``benchmarks/attention_tune.py`` without a GPU: the candidate launch settings of each kernel."""

from __future__ import annotations

from tests.unit.benchmark_module import load_benchmark


def test_candidates_cross_tiles_warps_stages_and_optionally_tma() -> None:
    tune = load_benchmark("attention_tune")
    plain = tune.candidates("fwd", 128)
    assert len(plain) == len(tune.BLOCKS["fwd"]) * len(tune.WARPS) * len(tune.STAGES["fwd"])
    assert not any("tma" in c for c in plain)
    with_tma = tune.candidates("fwd", 128, tma=True)
    assert len(with_tma) == 2 * len(plain) and sum(c.get("tma", False) for c in with_tma) == len(plain)
    assert all(c["blocks"][0] * c["blocks"][1] <= 64 * 64 for c in tune.candidates("dq", 256))
