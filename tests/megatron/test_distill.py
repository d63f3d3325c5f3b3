"""DistillationStage: a frozen teacher inside the student's pipeline schedule."""

from __future__ import annotations

import distill_jobs
import dms_jobs
import pytest
import torch
from runner import run_distributed


def _run(world, tp, pp, sp, teacher, teacher_graph=False, **dms):
    res = run_distributed(
        distill_jobs.distill_job,
        world,
        tp,
        pp,
        sp,
        teacher,
        {"variant": "adapter", **dms},
        teacher_graph,
        timeout=400,
    )
    if teacher_graph:  # every rank's teacher ran through the graph, one replay per micro-batch
        assert all(r["graph_replays"] == 2 for r in res), [r["graph_replays"] for r in res]
    losses = next(r["losses"] for r in res if r["losses"])
    assert all(r["teacher_grads_none"] for r in res), "the teacher must not receive gradients"
    assert not any("teacher" in n for r in res for n in r["trainable"]), "teacher params are not trainable"
    return losses, dms_jobs.merge_grads(res)


@pytest.fixture(scope="module")
def reference():
    return _run(1, 1, 1, False, "separate")


@pytest.mark.parametrize(
    ("world", "tp", "pp", "sp"),
    [(2, 1, 2, False), (2, 2, 1, True), (4, 2, 2, True)],
    ids=["pp2", "tp2sp", "tp2pp2sp"],
)
def test_distillation_layouts_match_single_rank(reference, world, tp, pp, sp):
    ref_losses, ref_grads = reference
    assert ref_losses[0]["kd"] > 0 and ref_losses[0]["cmp"] > 0
    losses, grads = _run(world, tp, pp, sp, "separate")
    for got, want in zip(losses, ref_losses, strict=True):
        for key in ("kd", "cmp"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), key
    assert set(grads) == set(ref_grads)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_self_teacher_equals_separate_stock_teacher(reference):
    """Adapter variant: the student with eviction off *is* the original model, so the self-teacher
    (no second copy) gives the same KD and gradients as a separate stock teacher, also under PP."""
    ref_losses, ref_grads = reference
    for world, pp in ((1, 1), (2, 2)):
        losses, grads = _run(world, 1, pp, False, "self")
        for got, want in zip(losses, ref_losses, strict=True):
            assert got["kd"] == pytest.approx(want["kd"], rel=1e-6)
        for name, g in ref_grads.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_teacher_mode_student_has_zero_kd():
    losses, _ = _run(1, 1, 1, False, "separate", teacher_mode=True)
    assert all(abs(d["kd"]) < 1e-6 for d in losses)


def test_the_teacher_through_its_graph_buffers_equals_its_own_forward():
    """TeacherGraph's static packed sequence (cu_seqlens padded with empty documents, max lengths
    pinned to the token count, per-token ids and positions refilled) changes nothing a real DMS teacher
    computes, over micro-batches of different document counts served by one signature (CPU stand-in
    capture; the CUDA capture: tests/gpu/test_teacher_graph.py)."""
    (res,) = run_distributed(distill_jobs.teacher_graph_job, 1, timeout=300)
    assert len(set(res["docs"])) > 1, res["docs"]
    assert res["graphs"] == 1 and res["replays"] == 4
    assert res["diffs"] == [0.0] * 4, res["diffs"]


@pytest.mark.parametrize(("world", "pp"), [(1, 1), (2, 2)], ids=["single", "pp2"])
def test_the_teacher_graph_changes_no_loss_or_gradient(reference, world, pp):
    """``DistillationStage(teacher_graph=True)``, through TeacherGraph's static buffers (CPU stand-in
    capture), on one rank and at PP=2 (the later stage's teacher input refilled per micro-batch): the
    same losses and gradients, exactly, as the eager teacher."""
    want_losses, want_grads = reference if pp == 1 else _run(world, 1, pp, False, "separate")
    losses, grads = _run(world, 1, pp, False, "separate", teacher_graph=True)
    assert losses == want_losses
    assert set(grads) == set(want_grads)
    for name, g in want_grads.items():
        assert torch.equal(grads[name], g), name
