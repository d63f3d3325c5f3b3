"""A stand-in for ``teacher_graph.cuda_capture`` on the CPU: a "replay" re-runs the forward on the static
buffers and writes into the captured output, so tests check TeacherGraph's bookkeeping (what it copies,
pads and pins) without CUDA. It does not show what a real capture leaves out: Python does not run on a
real replay (tests/gpu/test_teacher_graph.py covers that)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def rerun_capture(fn: Callable[[], torch.Tensor], pool: Any) -> tuple[Callable[[], None], torch.Tensor]:
    """``(replay, output)`` like ``cuda_capture``; replay recomputes ``fn()`` into ``output``."""
    out = fn()
    return (lambda: out.copy_(fn())), out
