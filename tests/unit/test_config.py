"""DMSConfig defaults (the bad values: tests/unit/test_invalid_configs.py)."""

from __future__ import annotations

from dms_megatron.config import DMSConfig


def test_defaults_follow_the_paper():
    cfg = DMSConfig()
    assert (cfg.variant, cfg.window, cfg.logit_scale, cfg.logit_offset, cfg.tau) == (
        "neuron",
        256,
        100.0,
        5.0,
        0.1,
    )
    assert cfg.kl_direction == "student_teacher" and cfg.compression_loss == "global"
    # the ramp starts once the neuron variant's channel fade is over; CRs are memory CRs at 8K tokens
    assert cfg.schedule.cr(0) == cfg.schedule.cr(50) == 1.0 and cfg.schedule.cr(750) == 8.0
    assert cfg.cr_context == 8192 and cfg.schedule.decision_cr(750) > 8.0
