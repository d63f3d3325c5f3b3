"""``launch/retrofit.py`` end to end on CPU (Hydra overrides, multirun, run directory, offline W&B,
preemption by a signal from outside), and the bad-input checks that run before any process group or model
exists."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dms_megatron.config import RetrofitConfig
from dms_megatron.families import load_model_preset
from dms_megatron.training.run import preflight

ROOT = Path(__file__).resolve().parents[2]


def _cfg(tmp_path: Path, prefix: str, **over) -> RetrofitConfig:
    _, preset = load_model_preset("debug_llama")
    preset["hf_config"]["eos_token_id"] = 2
    cfg = {
        "model": {**preset, **over.pop("model", {})},
        "data": {"prefixes": [prefix], "seq_length": 32, **over.pop("data", {})},
        "train": {"steps": 2, **over.pop("train", {})},
        # a ramp the 2 steps reach, a window below the 32-token sequences
        "dms": {"window": 4, "cr_ramp_steps": 0, "neuron_fade_steps": 0, **over.pop("dms", {})},
        "run_dir": str(tmp_path / "run"),
    }
    return RetrofitConfig.from_dict(cfg)


def test_preflight_accepts_good_input(tmp_path, data) -> None:
    pre = preflight(_cfg(tmp_path, data))
    assert pre.eos_token_id == 2 and pre.resume_from is None


def _bad_dataset(
    tmp_path: Path, data: str, *, vocab: int = 96, top: int | None = None, tokens: int | None = None
) -> str:
    prefix = tmp_path / "bad"
    for suffix in (".bin", ".idx"):
        (tmp_path / f"bad{suffix}").write_bytes(Path(data + suffix).read_bytes())
    info = json.loads(Path(data + ".json").read_text())
    info["vocab_size"] = vocab
    if tokens is not None:
        info["num_tokens"] = tokens
    (tmp_path / "bad.json").write_text(json.dumps(info))
    if top is not None:
        arr = np.memmap(str(prefix) + ".bin", dtype=np.dtype(info["dtype"]), mode="r+")
        arr[5] = top
        arr.flush()
    return str(prefix)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing_checkpoint", "does not exist: import the HF model first"),
        ("no_data", "data.prefixes is empty"),
        ("missing_data", "is missing (run launch/preprocess.py)"),
        ("vocab_mismatch", "tokenizer/model mismatch"),
        ("out_of_range", "out of range"),
        ("empty", "is empty"),
        ("wrong_eos", "the model's EOS is"),
        ("too_long", "exceeds the model's context"),
        ("bad_resume", "is not a complete training checkpoint"),
        ("other_tokenizer", "was tokenised with another tokenizer"),
        ("fresh_run_over_checkpoints", "train.resume=none but"),
        ("damaged_resume", "__0_0.distcp: 3 bytes, 5 when saved"),
    ],
)
def test_preflight_rejects_bad_input(tmp_path, data, case, message) -> None:
    over: dict = {
        "missing_checkpoint": {"model": {"checkpoint": str(tmp_path / "nope")}},
        "no_data": {"data": {"prefixes": []}},
        "missing_data": {"data": {"prefixes": [str(tmp_path / "absent")]}},
        "too_long": {"data": {"seq_length": 100000}},
        "bad_resume": {"train": {"resume": str(tmp_path)}},
    }.get(case, {})
    if case == "vocab_mismatch":
        over = {"data": {"prefixes": [_bad_dataset(tmp_path, data, vocab=49152)]}}
    elif case == "out_of_range":
        over = {"data": {"prefixes": [_bad_dataset(tmp_path, data, top=500)]}}
    elif case == "empty":
        over = {"data": {"prefixes": [_bad_dataset(tmp_path, data, tokens=0)]}}
    elif case == "fresh_run_over_checkpoints":
        (tmp_path / "run" / "checkpoints" / "iter_0000002").mkdir(parents=True)
        over = {"train": {"resume": "none"}}
    elif case == "damaged_resume":  # the shard shrank since its save: refused before any model is built
        from dms_megatron.convert.file_records import record_files

        ckpt = tmp_path / "ckpt"
        ckpt.mkdir()
        (ckpt / "__0_0.distcp").write_bytes(b"12345")
        record_files(ckpt)
        (ckpt / "__0_0.distcp").write_bytes(b"123")
        (ckpt / "train_state.json").write_text('{"step": 2}')
        over = {"train": {"resume": str(ckpt)}}
    elif case == "other_tokenizer":  # same vocabulary size and EOS, another vocabulary
        smol = Path(__file__).resolve().parents[2] / "assets" / "smollm2-135m-instruct"
        if not (smol / "tokenizer.json").is_file():
            pytest.skip("SmolLM2 asset missing: run `make assets`")
        prefix = _bad_dataset(tmp_path, data)
        info = json.loads(Path(prefix + ".json").read_text())
        Path(prefix + ".json").write_text(json.dumps(info | {"tokenizer_sha256": "0" * 64}))
        over = {"data": {"prefixes": [prefix]}, "model": {"hf_path": str(smol)}}
    cfg = _cfg(tmp_path, data, **over)
    if case == "wrong_eos":
        cfg.model.hf_config["eos_token_id"] = 7
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        preflight(cfg)


def test_preflight_rejects_another_architecture(tmp_path, data) -> None:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    _, other = load_model_preset("debug_qwen2")
    from dms_megatron.families import arch_from_hf_config

    meta = {
        "arch": arch_from_hf_config(other["hf_config"]).to_dict(),
        "hf_config": other["hf_config"],
        "dms": None,
    }
    (ckpt / "dms_megatron.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="another architecture"):
        preflight(_cfg(tmp_path, data, model={"checkpoint": str(ckpt)}))


def _env() -> dict[str, str]:
    return {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}


def _launch(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "launch/retrofit.py", *args],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )


COMMON = (
    "model=debug_llama",
    "+model.hf_config.eos_token_id=2",
    "model.dtype=fp32",
    "dms=adapter",
    "dms.window=4",
    "dms.cr_ramp_steps=1",  # reached within the shortest run here (train.steps=1)
    "dms.attention_backend=reference",
    "train=adapter",
    "train.steps=2",
    "train.save_interval=2",
    "parallel.micro_batch_size=2",
    "parallel.global_batch_size=4",
    "data.seq_length=32",
)


def test_cli_run_directory_and_wandb(tmp_path, data) -> None:
    run = tmp_path / "run"
    proc = _launch(
        tmp_path, *COMMON, f"data.prefixes=[{data}]", f"run_dir={run}", "logging.wandb_project=dms_test"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "retrofit finished at step 2" in proc.stdout
    assert {"config.yaml", "run_info.json", "metrics.jsonl", "summary.json", "cr_curve.png"} <= {
        p.name for p in run.iterdir()
    }
    info = json.loads((run / "run_info.json").read_text())
    assert "launch/retrofit.py" in " ".join(info["command"]) and "dms.window=4" in info["command"]
    assert "window: 4" in (run / "config.yaml").read_text()
    assert list((run / "wandb").glob("offline-run-*")), "no offline W&B run"
    assert (run / "checkpoints" / "iter_0000002" / "train_state.json").is_file()
    # started again on the finished run (a requeued or resubmitted job): resumes at the end, runs no step
    again = _launch(tmp_path, *COMMON, f"data.prefixes=[{data}]", f"run_dir={run}", "logging.console=false")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "retrofit finished at step 2: no step to run" in again.stdout


def test_cli_multirun_sweep(tmp_path, data) -> None:
    proc = _launch(
        tmp_path,
        "-m",
        *COMMON,
        "train.steps=1",
        "train.save_interval=1",
        "dms.target_cr=2,3",
        f"data.prefixes=[{data}]",
        f"run_dir={tmp_path}/sweep_cr${{dms.target_cr}}",
        f"hydra.sweep.dir={tmp_path}/multirun",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for cr in ("2", "3"):
        summary = json.loads((tmp_path / f"sweep_cr{cr}" / "summary.json").read_text())
        assert summary["finished"] and summary["step"] == 1


def test_cli_rejects_bad_override(tmp_path, data) -> None:
    proc = _launch(tmp_path, *COMMON, f"data.prefixes=[{data}]", "dms.window=-1", f"run_dir={tmp_path}/x")
    assert proc.returncode != 0 and "dms.window=-1 is invalid" in proc.stderr
    assert not (tmp_path / "x" / "run_info.json").exists()  # failed before the run started (Hydra logs only)


def _alive_in_group(pgid: int) -> list[int]:
    """Processes of process group ``pgid`` that are still running (zombies left out)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(stat.parent.name))
    return alive


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_cli_sigterm_to_process_group_saves_and_resumes(tmp_path, data) -> None:
    """SIGTERM to the launcher's whole process group, as GNU ``timeout``, Slurm and ``kill -- -PGID`` send
    it, after an interval save (which used to leave megatron's save helper process exposed to it): the run
    saves a checkpoint where it stopped and exits cleanly, and ``train.resume=auto`` continues from there."""
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    args = (*COMMON, f"data.prefixes=[{data}]", f"run_dir={run}", "logging.console=false")
    out_path, err_path = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with out_path.open("w") as out_f, err_path.open("w") as err_f:
        proc = subprocess.Popen(
            [sys.executable, "launch/retrofit.py", *args, "train.steps=5000", "train.keep_last=1"],
            cwd=ROOT,
            env=_env(),
            stdout=out_f,
            stderr=err_f,
            start_new_session=True,  # its own process group, like a job under timeout or Slurm
        )
    try:
        deadline = time.monotonic() + 120
        while not (ckpts / "latest_checkpointed_iteration.txt").is_file() and time.monotonic() < deadline:
            assert proc.poll() is None, err_path.read_text()[-3000:]
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out, err = out_path.read_text(), err_path.read_text()
    assert proc.returncode == 0, err[-3000:]
    assert "received SIGTERM" in out
    stopped = re.search(r"retrofit stopped \(preempted\) at step (\d+)", out)
    assert stopped, out[-3000:]
    step = int(stopped.group(1))
    assert f"preempted: checkpoint saved at step {step}" in out
    assert (ckpts / "latest_checkpointed_iteration.txt").read_text().strip() == str(step)
    assert json.loads((ckpts / f"iter_{step:07d}" / "train_state.json").read_text())["step"] == step
    deadline = time.monotonic() + 10
    while _alive_in_group(proc.pid) and time.monotonic() < deadline:  # helpers shut down with the run
        time.sleep(0.1)
    assert not _alive_in_group(proc.pid)

    resumed = _launch(tmp_path, *args, f"train.steps={step + 1}", "train.resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {ckpts / f'iter_{step:07d}'} at step {step}" in resumed.stdout
    assert f"retrofit finished at step {step + 1}" in resumed.stdout
