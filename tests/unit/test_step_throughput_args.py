"""``benchmarks/step_throughput.py --dms-variant NAME=OVERRIDE[,OVERRIDE...]``: the parsed variants, and a
clear refusal of a malformed or clashing one (the runs themselves: a CPU smoke in docs/training.md);
``--triton-launch FILE``: launch settings loaded into the Triton kernel, unknown kernels refused."""

from __future__ import annotations

import pytest

from tests.unit.benchmark_module import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("step_throughput")


def test_variants_are_parsed(bench) -> None:
    got = bench._variants(["kd_triton=dms.kd_backend=triton", "two=dms.tau=0.2,dms.train_noise=false"])
    assert got == {"kd_triton": ["dms.kd_backend=triton"], "two": ["dms.tau=0.2", "dms.train_noise=false"]}
    assert bench._variants([]) == {}


@pytest.mark.parametrize(
    "spec",
    ["kd_triton", "=dms.tau=0.2", "x=", "x=dms.tau", "dms_retrofit=dms.tau=0.2", "vanilla_sdpa=dms.tau=0.2"],
)
def test_malformed_or_clashing_variants_are_refused(bench, spec) -> None:
    with pytest.raises(SystemExit, match="--dms-variant"):
        bench._variants([spec])


def test_a_repeated_name_is_refused(bench) -> None:
    with pytest.raises(SystemExit, match="--dms-variant"):
        bench._variants(["a=dms.tau=0.2", "a=dms.tau=0.3"])


def test_triton_launch_settings_are_loaded_and_unknown_kernels_refused(bench, tmp_path) -> None:
    pytest.importorskip("triton")
    from dms_megatron.kernels import triton_dms

    good = tmp_path / "good.json"
    good.write_text('{"dkdv": {"blocks": [32, 128], "num_warps": 8, "num_stages": 1}}')
    try:
        bench._use_triton_launch(good)
        assert triton_dms._split(triton_dms._launch(128, 128, False)["dkdv"])[:2] == (32, 128)
        assert triton_dms._split(triton_dms._launch(128, 128, False)["dkdv"])[2] == {
            "num_warps": 8,
            "num_stages": 1,
        }
        assert triton_dms._launch(128, 128, False)["fwd"] == triton_dms._CUDA_LAUNCH[128]["fwd"]
    finally:
        triton_dms.LAUNCH_OVERRIDES.clear()
    assert triton_dms._launch(128, 128, False)["dkdv"]["blocks"] == (64, 128)  # the default again
    bad = tmp_path / "bad.json"
    bad.write_text('{"bwd": {"num_warps": 8}}')
    with pytest.raises(SystemExit, match="unknown kernels"):
        bench._use_triton_launch(bad)


def test_timed_steps_start_where_asked(bench) -> None:
    """``--start-step N``: the warm-up and measured steps are N, N+1, ... of the schedule; only the
    measured ones are timed."""
    seen: list[int] = []
    times = bench._time_steps(seen.append, warmup=2, measure=3, start=40)
    assert seen == [40, 41, 42, 43, 44] and len(times) == 3


def test_a_separator_before_the_overrides_is_dropped(bench) -> None:
    assert bench._hydra_overrides(["--", "experiment=smollm2_paper", "dms.tau=0.2"]) == [
        "experiment=smollm2_paper",
        "dms.tau=0.2",
    ]


def test_triton_launch_defaults_follow_the_head_dim() -> None:
    """Each head-dim class has its own tuned settings; the interpreter uses small tiles and no options."""
    pytest.importorskip("triton")
    from dms_megatron.kernels import triton_dms

    assert {k: s["blocks"] for k, s in triton_dms._launch(64, 64, False).items()} == dict.fromkeys(
        ("fwd", "dkdv", "dq"), (64, 64)
    )
    assert triton_dms._launch(128, 128, False)["fwd"]["blocks"] == (128, 128)
    assert triton_dms._split(triton_dms._launch(96, 128, False)["dkdv"])[2] == {
        "num_warps": 8,
        "num_stages": 3,
    }
    assert triton_dms._launch(256, 256, False)["dkdv"]["blocks"] == (32, 64)
    assert triton_dms._split(triton_dms._launch(128, 128, True)["fwd"])[2] == {}
    assert {s["blocks"] for s in triton_dms._launch(128, 128, True).values()} == {(16, 16)}
    fp32 = triton_dms._launch(128, 128, False, fp32=True)  # small tiles, 2 stages
    assert {s["blocks"] for s in fp32.values()} == {(32, 32)}
    assert triton_dms._split(triton_dms._launch(64, 64, False, fp32=True)["dq"])[2] == {
        "num_warps": 4,
        "num_stages": 2,
    }
