"""``training.step_profile.summarize`` on synthetic profiler events: CUDA launches are counted per step by
the region or autograd node around them (inside a region also by the op that issued them), syncs by
region, ops ranked by self time and by calls."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from dms_megatron.training.step_profile import BACKWARD_PREFIX, format_summary, summarize

CPU = torch.autograd.DeviceType.CPU
CUDA = torch.autograd.DeviceType.CUDA


def _event(name: str, parent=None, device=CPU, us: float = 10.0):
    return SimpleNamespace(
        name=name,
        cpu_parent=parent,
        device_type=device,
        time_range=SimpleNamespace(elapsed_us=lambda: us),
        is_user_annotation=False,
        device_time_total=us,
        self_device_time_total=us,
        cpu_time_total=us,
        self_cpu_time_total=us,
    )


def _average(key: str, count: int, us: float):
    return SimpleNamespace(
        key=key, count=count, device_type=CPU, self_device_time_total=us, device_time_total=us,
        self_cpu_time_total=us, cpu_time_total=us,
    )  # fmt: skip


def test_launches_counted_by_region_and_backward_node_per_step() -> None:
    teacher = _event("dms.teacher_forward", us=300.0)
    node = _event(BACKWARD_PREFIX + "MulBackward0")
    mm = _event("aten::mm", parent=teacher)
    norm = _event("aten::rms_norm", parent=teacher)
    pow_ = _event("aten::pow", parent=norm)  # a launch inside a nested op counts for the outer one
    events = [teacher, node, mm, norm, pow_]
    events += [_event("cudaLaunchKernel", parent=mm) for _ in range(4)]  # 3 per step in the teacher
    events += [_event("cudaLaunchKernel", parent=pow_) for _ in range(2)]
    events += [_event("cudaLaunchKernel", parent=node) for _ in range(4)]  # 2 per step in the backward
    events += [_event("cudaMemcpyAsync") for _ in range(2)]  # 1 per step outside every region
    events += [_event("cudaStreamSynchronize", parent=teacher)]
    events += [_event("void gemm_kernel", device=CUDA, us=50.0) for _ in range(12)]
    averages = [_average("aten::mm", 10, 500.0), _average("aten::mul", 40, 100.0)]
    averages += [_average("cudaLaunchKernel", 10, 900.0)]  # not an op: left out of the op tables
    s = summarize(events, averages, steps=2, wall_s=0.01, on_device=True)
    expected = {"dms.teacher_forward": 3.0, "backward: MulBackward0": 2.0, "no region": 1.0}
    assert s["launches_per_step"] == expected
    assert s["launches_by_op"] == {"dms.teacher_forward": {"aten::mm": 2.0, "aten::rms_norm": 1.0}}
    assert s["kernels_per_step"] == 6.0
    assert s["host_syncs_per_step"] == {"cudaStreamSynchronize in dms.teacher_forward": 0.5}
    assert [o["op"] for o in s["top_ops_self_ms"]] == ["aten::mm", "aten::mul"]
    assert [(o["op"], o["calls"]) for o in s["top_ops_by_calls"]] == [("aten::mul", 20.0), ("aten::mm", 5.0)]
    assert "CUDA launches per step: 6 (dms.teacher_forward 3, backward: MulBackward0 2, no region 1)" in (
        format_summary("dms", s)
    )
    assert "dms.teacher_forward launches by op: aten::mm 2, aten::rms_norm 1" in format_summary("dms", s)
