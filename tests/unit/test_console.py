"""What a cluster user reads: known upstream warnings hidden (and only those), one line per step in a
log file, and the run described before it starts."""

from __future__ import annotations

import io
import logging
import warnings

import pytest
from rich.console import Console

from dms_megatron.config import RetrofitConfig
from dms_megatron.runtime import SHOW_UPSTREAM_ENV, UPSTREAM_LOG_RECORDS, quiet_upstream_noise
from dms_megatron.training.metrics import MetricsLogger
from dms_megatron.training.run import describe_run


@pytest.mark.parametrize("show", [False, True])
def test_only_the_listed_upstream_messages_are_hidden(monkeypatch, show, caplog):
    monkeypatch.setenv(SHOW_UPSTREAM_ENV, "1" if show else "0")
    logger, text, _ = UPSTREAM_LOG_RECORDS[1]
    target = logging.getLogger(logger)
    monkeypatch.setattr(target, "filters", [])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_upstream_noise()
        warnings.warn("MimoModelConfig is experimental and still under active development", stacklevel=1)
        warnings.warn("something else went wrong", stacklevel=1)
    with caplog.at_level(logging.WARNING, logger=logger):
        target.warning("%s. Please reference the migration guide", text)
        target.warning("an unrelated megatron warning")
    messages = [str(w.message) for w in caught]
    assert "something else went wrong" in messages and "an unrelated megatron warning" in caplog.text
    assert any("MimoModelConfig" in m for m in messages) == show
    assert (text in caplog.text) == show


def test_step_lines_do_not_wrap_in_a_log_file(tmp_path):
    out = io.StringIO()
    console = Console(file=out, width=40, force_terminal=False)
    log = MetricsLogger(tmp_path, console=console)
    metrics = {"loss/kd": 0.123456, "loss/compression": 0.01, "cr/target": 4.0, "cr/memory": 3.9}
    log.log(7, {**metrics, "throughput/tokens_per_s": 12345.6})
    log.close()
    lines = [line for line in out.getvalue().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("step 7") and "memory 3.9" in lines[0]


def test_the_run_is_described_before_it_starts():
    from dms_megatron.families import load_model_preset

    hf_config = load_model_preset("smollm2_135m")[1]["hf_config"]
    cfg = RetrofitConfig.from_dict(
        {
            "model": {"name": "smollm2_135m", "checkpoint": "ckpt", "hf_config": hf_config},
            "dms": {"variant": "neuron", "target_cr": 8.0, "cr_ramp_steps": 100, "neuron_fade_steps": 30},
            "parallel": {"tp": 3, "pp": 2, "sequence_parallel": True, "global_batch_size": 16},
            "data": {"prefixes": ["d"], "seq_length": 4096},
            "train": {"steps": 500},
            "run_dir": "runs/x",
        }
    )
    text = describe_run(cfg, world_size=12)
    assert "retrofit smollm2_135m from ckpt" in text and "TP=3 PP=2 DP=2 SP on 12" in text
    assert "500 steps of 16 x 4096 tokens" in text and "neuron variant, train.mode=full" in text
    assert "memory CR 1 -> 8 at 8192 tokens over 100 steps, after a 30-step channel fade" in text
    assert "run dir: runs/x" in text
