"""DMSConfig validation: every bad value fails with a ValueError naming the key."""

from __future__ import annotations

import pytest

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


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"variant": "qneuron"}, "variant"),
        ({"decisions_per": "token"}, "decisions_per"),
        ({"window": -1}, "window"),
        ({"window": 2.5}, "window"),
        ({"tau": 0.0}, "tau"),
        ({"logit_scale": -1.0}, "logit_scale"),
        ({"kl_direction": "forward"}, "kl_direction"),
        ({"kl_temperature": 0}, "kl_temperature"),
        ({"compression_loss": "sum"}, "compression_loss"),
        ({"compression_weight": -0.1}, "compression_weight"),
        ({"cr_start": 0.5}, "cr_start"),
        ({"target_cr": 0.9}, "target_cr"),
        ({"cr_ramp_steps": -5}, "cr_ramp_steps"),
        ({"attention_backend": "triton"}, "attention_backend"),
        ({"teacher_mode": "yes"}, "teacher_mode"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_values_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=rf"dms\.{key}="):
        DMSConfig(**kwargs)
