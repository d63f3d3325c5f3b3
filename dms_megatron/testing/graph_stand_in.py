"""Test helpers for the teacher's CUDA graph (``megatron/teacher_graph.py``).

``rerun_capture``: a stand-in for ``teacher_graph.cuda_capture`` on the CPU: a "replay" re-runs the
forward on the static buffers and writes into the captured output, so tests check TeacherGraph's
bookkeeping (what it copies, pads and pins) without CUDA. It does not show what a real capture leaves
out: Python does not run on a real replay (tests/gpu/test_teacher_graph.py covers that).
``random_documents``: a micro-batch with documents of random lengths, for ``pack_thd``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def rerun_capture(fn: Callable[[], torch.Tensor], pool: Any) -> tuple[Callable[[], None], torch.Tensor]:
    """``(replay, output)`` like ``cuda_capture``; replay recomputes ``fn()`` into ``output``."""
    out = fn()
    return (lambda: out.copy_(fn())), out


def random_documents(seed: int, rows: int, length: int, vocab: int, start_prob: float) -> dict:
    """``{"tokens", "position_ids"}`` ``[rows, length]``: random tokens in documents that start at each
    position with probability ``start_prob`` (and at each row's first token), for ``pack_thd``."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (rows, length), generator=gen)
    starts = torch.rand(tokens.shape, generator=gen) < start_prob
    starts[:, 0] = True
    idx = torch.arange(length).expand_as(tokens)
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return {"tokens": tokens, "position_ids": idx - first}
