"""benchmarks/layout_parity.py's report: the largest relative difference per key against the first layout,
step timings as medians after the first step, and the layouts of one 8-GPU node (processes = TP x PP)."""

from __future__ import annotations

import pytest

from tests.unit.benchmark_module import load_benchmark


@pytest.fixture(scope="module")
def parity():
    return load_benchmark("layout_parity")


def _row(kd: float, step_s: float, mem: float | None = None) -> dict:
    row = {
        "loss/kd": kd,
        "loss/compression": 0.5,
        "cr/decision_rate": 2.0,
        "grad_norm": 1.0,
        "step_time_s": step_s,
        "throughput/tokens_per_s": 100 / step_s,
        "throughput/tflops_per_gpu": 1 / step_s,
    }
    if mem is not None:
        row["memory/max_allocated_gb"] = mem
        row["memory/max_allocated_gb_any_rank"] = 2 * mem
    return row


def test_compare_takes_the_largest_relative_difference(parity) -> None:
    rows = {"a": [_row(1.0, 1), _row(2.0, 1)], "b": [_row(1.1, 1), _row(2.0, 1)]}
    diff = parity.compare(rows)
    assert set(diff) == {"b"} and diff["b"]["steps"] == 2
    assert diff["b"]["loss/kd"] == pytest.approx(0.1)
    assert diff["b"]["grad_norm"] == 0.0


def test_timing_is_the_median_after_the_first_step(parity) -> None:
    got = parity._timing([_row(1, 9.0), _row(1, 1.0), _row(1, 3.0), _row(1, 2.0, mem=5.5)])
    assert got["step_time_s"] == 2.0 and got["throughput/tokens_per_s"] == 50.0
    assert got["memory/max_allocated_gb"] == 5.5 and got["memory/max_allocated_gb_any_rank"] == 11.0
    assert parity._timing([_row(1, 4.0)])["step_time_s"] == 4.0  # one step: that step


def test_node_layouts_use_tp_times_pp_processes(parity) -> None:
    for name in ("tp8sp", "tp8sp_again", "tp4sp_pp2", "tp2sp_pp2", "tp2sp_pp2_again", "tp1", "pp2"):
        procs, overrides = parity.LAYOUTS[name]
        opts = dict(o.split("=", 1) for o in overrides)
        assert procs == int(opts["parallel.tp"]) * int(opts["parallel.pp"]), name
        assert opts["parallel.sequence_parallel"] == ("true" if int(opts["parallel.tp"]) > 1 else "false")


def test_device_guess_warnings_are_found_in_the_logs(tmp_path) -> None:
    slurm = load_benchmark("slurm_preemption")
    log = tmp_path / "tp8sp.log"
    log.write_text(
        "step 1\n[rank3]:[W] ProcessGroupNCCL.cpp: using GPU 3 to perform barrier as devices used by this "
        "process are currently unknown. This can potentially cause a hang\nstep 2\n"
    )
    (tmp_path / "clean.log").write_text("device 0 bound\nstep 1\n")
    found = slurm.device_guess_warnings([log, tmp_path / "clean.log", tmp_path / "missing.log"])
    assert len(found) == 1 and found[0].startswith("tp8sp.log: [rank3]") and "currently unknown" in found[0]


def test_slurm_preemption_needs_a_launcher_experiment(tmp_path) -> None:
    slurm = load_benchmark("slurm_preemption")
    with pytest.raises(SystemExit, match="needs one experiment= override"):
        slurm.preempted_run(tmp_path, 1, ["experiment=smollm2_paper"], tmp_path / "run", 2, 10)
    with pytest.raises(SystemExit, match="needs one experiment= override"):
        slurm.preempted_run(tmp_path, 1, ["model=debug_llama"], tmp_path / "run", 2, 10)
