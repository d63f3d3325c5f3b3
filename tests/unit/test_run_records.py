"""One run per run directory (lock), the resume config check, the config records of resumed segments,
and Ctrl-C handling; no model is built."""

from __future__ import annotations

import json
import logging
import os
import platform
import signal
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml

from dms_megatron.config import RetrofitConfig
from dms_megatron.families import load_model_preset
from dms_megatron.training.run_records import (
    RunDirInUseError,
    RunDirLock,
    check_resume_config,
    config_changes,
    config_record_for_step,
)


def test_second_lock_on_one_run_dir_fails_naming_the_holder(tmp_path) -> None:
    holder = rf"in use by another run \(pid {os.getpid()} on host "
    with RunDirLock(tmp_path / "run"), pytest.raises(RunDirInUseError, match=holder):
        RunDirLock(tmp_path / "run").acquire()
    with RunDirLock(tmp_path / "run"):  # released at the end of the first run
        pass


def test_lock_held_by_another_process(tmp_path) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from dms_megatron.training.run_records import RunDirLock\n"
            f"lock = RunDirLock({str(tmp_path)!r}); lock.acquire()\n"
            "print('locked', flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirInUseError, match=rf"pid {holder.pid} on host {platform.node()}"):
            RunDirLock(tmp_path).acquire()
    finally:
        holder.communicate("", timeout=30)  # it exits; the kernel drops its lock
    with RunDirLock(tmp_path):
        pass


def _config(run_dir: Path, **sections: dict) -> dict:
    _, preset = load_model_preset("debug_llama")
    cfg = {
        "model": {**preset, "dtype": "fp32"},
        "dms": {"window": 4, "cr_ramp_steps": 2, "neuron_fade_steps": 0},
        "data": {"prefixes": ["d"], "seq_length": 32},
        "train": {"steps": 8},
        "run_dir": str(run_dir),
    }
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values}
    return asdict(RetrofitConfig.from_dict(cfg))


def _saved_run(tmp_path: Path, step: int = 4) -> Path:
    """A run directory with its first config record and a checkpoint at ``step``."""
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / f"iter_{step:07d}"
    ckpt.mkdir(parents=True)
    (ckpt / "train_state.json").write_text(json.dumps({"step": step}))
    (run / "config.yaml").write_text(yaml.safe_dump(_config(run)))
    return ckpt


def test_resume_with_identical_config_goes(tmp_path) -> None:
    ckpt = _saved_run(tmp_path)
    assert check_resume_config(_config(tmp_path / "run"), ckpt, 4) == {}


def test_resume_with_safe_changes_is_logged(tmp_path, caplog) -> None:
    ckpt = _saved_run(tmp_path)
    new = _config(tmp_path / "run", train={"steps": 20, "keep_last": 5}, logging={"log_interval": 2})
    with caplog.at_level(logging.WARNING):
        safe = check_resume_config(new, ckpt, 4)
    assert safe == {"logging.log_interval": (1, 2), "train.keep_last": (2, 5), "train.steps": (8, 20)}
    assert "train.steps: 8 -> 20" in caplog.text


@pytest.mark.parametrize(
    ("change", "listed"),
    [
        ({"dms": {"variant": "adapter"}}, "dms.variant: 'neuron' -> 'adapter'"),
        ({"dms": {"window": 8}}, "dms.window: 4 -> 8"),
        ({"dms": {"target_cr": 4.0}}, "dms.target_cr: 8.0 -> 4.0"),
        ({"data": {"seq_length": 64}}, "data.seq_length: 32 -> 64"),
        ({"model": {"dtype": "bf16"}}, "model.dtype: 'fp32' -> 'bf16'"),
        ({"train": {"lr": 1e-4}}, "the LR schedule is restored from the checkpoint"),
        ({"parallel": {"global_batch_size": 16}}, "parallel.global_batch_size: 8 -> 16"),
    ],
)
def test_resume_with_changed_settings_is_refused(tmp_path, change, listed) -> None:
    ckpt = _saved_run(tmp_path)
    with pytest.raises(ValueError, match="cannot resume from") as err:
        check_resume_config(_config(tmp_path / "run", **change), ckpt, 4)
    assert listed in str(err.value) and "another run_dir" in str(err.value)


def test_layout_changes_are_safe(tmp_path) -> None:
    ckpt = _saved_run(tmp_path)
    new = _config(tmp_path / "run", parallel={"tp": 2, "micro_batch_size": 2, "recompute": "full"})
    assert set(check_resume_config(new, ckpt, 4)) == {
        "parallel.tp",
        "parallel.micro_batch_size",
        "parallel.recompute",
    }


def test_without_a_record_the_checkpoints_dms_block_is_compared(tmp_path) -> None:
    ckpt = tmp_path / "elsewhere" / "iter_0000004"
    ckpt.mkdir(parents=True)
    new = _config(tmp_path / "run", dms={"variant": "adapter"})
    old_dms = _config(tmp_path / "run")["dms"]
    with pytest.raises(ValueError, match=r"dms\.variant: 'neuron' -> 'adapter'"):
        check_resume_config(new, ckpt, 4, old_dms)
    assert check_resume_config(new, ckpt, 4, None) == {}  # nothing to compare with: a warning only


def test_the_record_of_the_segment_that_saved_the_checkpoint_is_used(tmp_path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    assert config_record_for_step(run, 4) is None
    for name in ("config.yaml", "config_resume_4.yaml", "config_resume_10.yaml"):
        (run / name).write_text("{}")
    assert config_record_for_step(run, 4).name == "config.yaml"  # saved by the first segment
    assert config_record_for_step(run, 10).name == "config_resume_4.yaml"
    assert config_record_for_step(run, 12).name == "config_resume_10.yaml"


def test_resumed_segment_keeps_the_first_record(tmp_path) -> None:
    from dms_megatron.training.run import write_run_info

    run = tmp_path / "run"
    write_run_info(run, {"a": 1}, ["x"], 1, None)
    write_run_info(run, {"a": 2}, ["y"], 2, 40)
    assert yaml.safe_load((run / "config.yaml").read_text()) == {"a": 1}
    assert json.loads((run / "run_info.json").read_text())["command"][1:] == ["x"]
    assert yaml.safe_load((run / "config_resume_40.yaml").read_text()) == {"a": 2}
    assert json.loads((run / "run_info_resume_40.json").read_text())["world_size"] == 2


def test_config_changes_split_safe_and_refused() -> None:
    safe, refused = config_changes(
        {"logging": {"console": True}, "dms": {"window": 4}, "run_dir": "a"},
        {"logging": {"console": False}, "dms": {"window": 4, "new_key": 1}, "run_dir": "b"},
    )
    assert safe == {"logging.console": (True, False), "run_dir": ("a", "b")}
    assert refused == {"dms.new_key": ("<absent>", 1)}


def test_first_ctrl_c_stops_at_the_step_boundary_second_exits(tmp_path) -> None:
    """First SIGINT: the stop flag (a checkpoint at the next step boundary), SIGINT back to its default
    action; second: the process dies of SIGINT at once."""
    script = (
        "import os, signal, time\n"
        "from dms_megatron.training.checkpoint import PreemptionGuard\n"
        "guard = PreemptionGuard()\n"
        "for sig in guard.SIGNALS: signal.signal(sig, guard._handle)\n"  # __enter__ without save helpers
        "os.kill(os.getpid(), signal.SIGINT); time.sleep(0.2)\n"
        "print('first', guard.received == signal.SIGINT, signal.getsignal(signal.SIGINT) == signal.SIG_DFL,"
        " flush=True)\n"
        "os.kill(os.getpid(), signal.SIGINT); time.sleep(5)\n"
        "print('still alive', flush=True)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    assert proc.stdout.splitlines() == ["first True True"], proc.stderr[-2000:]
    assert proc.returncode == -signal.SIGINT
    assert "received SIGINT: saving a checkpoint" in proc.stderr and "Ctrl-C again" in proc.stderr


def test_guard_handles_sigterm_sigusr1_and_sigint() -> None:
    from dms_megatron.training.checkpoint import PreemptionGuard

    assert set(PreemptionGuard.SIGNALS) == {signal.SIGTERM, signal.SIGUSR1, signal.SIGINT}
    guard = PreemptionGuard()
    guard._handle(signal.SIGTERM, None)
    assert guard.received == signal.SIGTERM and guard.should_stop()


def test_run_retrofit_refuses_a_locked_run_dir_before_any_work(tmp_path) -> None:
    from dms_megatron.training.run import run_retrofit

    cfg = RetrofitConfig.from_dict({**_config(tmp_path / "run"), "run_dir": str(tmp_path / "run")})
    with RunDirLock(tmp_path / "run"), pytest.raises(RunDirInUseError, match="choose another run_dir"):
        run_retrofit(cfg)  # data.prefixes=[d] does not exist: preflight would fail, but the lock comes first
