"""Where a training step's time goes: torch.profiler over a few steps, summarised by named region.

The trainer opens ``torch.profiler.record_function`` ranges (the names below: ``FORWARD_REGIONS``
inside ``dms.forward_backward``, ``OUTSIDE_REGIONS`` around the rest of the step) around reading
and packing the batch, the teacher and student forwards, the KD and compression losses, the finite
check, the optimizer step and the step statistics. The backward runs inside megatron's schedule (and,
on CUDA, on autograd's device thread, outside those ranges), so it is reported as what is left of the
step, and separately per autograd node (``FlexAttentionBackward``, ``MmBackward0``, ...).

Times: on CUDA the summed duration of the kernels each region launched (GPU busy time; ``total_ms`` is
all kernels of the step, ``wall_ms`` the host's step time); on CPU the regions' wall times.
Host syncs: ``.item()`` / ``.tolist()`` / ``bool(tensor)`` calls (``aten::_local_scalar_dense``) and
explicit CUDA synchronisations, per step. ``_local_scalar_dense`` also counts reads of CPU scalars (e.g.
``t[idx] = 0`` on a device tensor reads the 0 back from a CPU tensor), which do not wait for the device:
the ``cudaStreamSynchronize`` / ``cudaDeviceSynchronize`` entries are the ones that do (the Chrome trace
shows which op each belongs to).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

BACKWARD_PREFIX = "autograd::engine::evaluate_function: "
FORWARD_REGIONS = ("dms.teacher_forward", "dms.student_forward", "dms.kd_loss", "dms.compression_loss")
OUTSIDE_REGIONS = ("dms.read_and_pack", "dms.nonfinite_check", "dms.optimizer_step", "dms.step_stats")
SYNC_EVENTS = ("aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaDeviceSynchronize")
# host-side CUDA runtime / driver calls that put work on a stream: a host-bound step's cost is their count
LAUNCH_EVENTS = (
    "cudaLaunchKernel",
    "cudaLaunchKernelExC",
    "cuLaunchKernel",
    "cuLaunchKernelEx",
    "cudaMemcpyAsync",
    "cudaMemsetAsync",
    "cudaGraphLaunch",
)


def _event_time_us(event: Any, on_device: bool, self_only: bool = False) -> float:
    if on_device:
        return float(event.self_device_time_total if self_only else event.device_time_total)
    return float(event.self_cpu_time_total if self_only else event.cpu_time_total)


def _enclosing_region(event: Any, backward_nodes: bool = False) -> str:
    """The innermost named region around ``event`` (with ``backward_nodes``: or autograd node, as
    ``backward: NAME``, since the backward runs outside the regions)."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("dms."):
            return parent.name
        if backward_nodes and parent.name.startswith(BACKWARD_PREFIX):
            return "backward: " + parent.name[len(BACKWARD_PREFIX) :]
        parent = parent.cpu_parent
    return "no region"


def _issuing_op(event: Any) -> str:
    """The outermost op (below any named region or autograd node) whose call issued ``event``."""
    op, parent = "none", event.cpu_parent
    while parent is not None:
        if parent.name.startswith(("dms.", BACKWARD_PREFIX, "ProfilerStep")):
            break
        op = parent.name
        parent = parent.cpu_parent
    return op


def summarize(
    events: list[Any], averages: list[Any], steps: int, wall_s: float, on_device: bool, top: int = 25
) -> dict[str, Any]:
    """Per-step summary (milliseconds) of the profiler's ``events()`` and ``key_averages()`` over
    ``steps`` steps."""
    per = 1e-3 / steps  # us over all steps -> ms per step
    regions: dict[str, float] = defaultdict(float)
    backward: dict[str, float] = defaultdict(float)
    syncs: dict[str, int] = defaultdict(int)
    launches: dict[str, int] = defaultdict(int)
    launch_ops: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    kernels_us = 0.0
    kernel_count = 0
    for e in events:
        name = e.name
        if e.device_type != torch.autograd.DeviceType.CPU:  # kernels, copies, GPU-side annotations
            if not getattr(e, "is_user_annotation", False):
                kernels_us += e.time_range.elapsed_us()
                kernel_count += 1
            continue
        if name in FORWARD_REGIONS or name in OUTSIDE_REGIONS or name == "dms.forward_backward":
            regions[name] += _event_time_us(e, on_device)
        elif name.startswith(BACKWARD_PREFIX):
            backward[name[len(BACKWARD_PREFIX) :]] += _event_time_us(e, on_device)
        if name in SYNC_EVENTS:
            syncs[f"{name} in {_enclosing_region(e)}"] += 1
        if name in LAUNCH_EVENTS:
            where = _enclosing_region(e, backward_nodes=True)
            launches[where] += 1
            if where.startswith("dms."):
                launch_ops[where][_issuing_op(e)] += 1
    wall_ms = wall_s * 1e3 / steps
    total_ms = kernels_us * per if on_device else wall_ms
    named = {k: regions.get(k, 0.0) * per for k in (*FORWARD_REGIONS, *OUTSIDE_REGIONS)}
    named["backward_and_schedule"] = total_ms - sum(named.values())
    cpu_ops = [
        a
        for a in averages
        if a.device_type == torch.autograd.DeviceType.CPU
        and not a.key.startswith(("dms.", BACKWARD_PREFIX, "ProfilerStep"))
        and a.key not in LAUNCH_EVENTS
    ]

    def _op(avg: Any) -> dict[str, Any]:
        return {
            "op": avg.key,
            "calls": avg.count / steps,
            "self_ms": _event_time_us(avg, on_device, True) * per,
        }

    ops = [_op(a) for a in sorted(cpu_ops, key=lambda a: -_event_time_us(a, on_device, self_only=True))[:top]]
    by_calls = [_op(a) for a in sorted(cpu_ops, key=lambda a: -a.count)[:top]]
    return {
        "steps": steps,
        "timer": "cuda kernels" if on_device else "cpu wall",
        "wall_ms": wall_ms,
        "total_ms": total_ms,
        "gpu_busy_fraction": total_ms / wall_ms if on_device and wall_ms else None,
        "kernels_per_step": kernel_count / steps if on_device else None,
        "regions_ms": named,
        "forward_backward_ms": regions.get("dms.forward_backward", 0.0) * per,
        "backward_nodes_ms": dict(
            sorted(((k, v * per) for k, v in backward.items()), key=lambda kv: -kv[1])[:top]
        ),
        "host_syncs_per_step": {k: v / steps for k, v in sorted(syncs.items())},
        "top_ops_self_ms": ops,
        "top_ops_by_calls": by_calls,
        # CUDA launches (kernels, async copies / memsets, graph replays) per step by region or backward
        # node; empty on CPU
        "launches_per_step": {k: v / steps for k, v in sorted(launches.items(), key=lambda kv: -kv[1])},
        # the same inside each named region, by the outermost op that issued them (top 15)
        "launches_by_op": {
            region: {k: v / steps for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])[:15]}
            for region, by_op in sorted(launch_ops.items())
        },
    }


def profile_steps(
    step_fn: Callable[[int], Any], first_step: int, steps: int, trace: str | Path | None = None
) -> dict[str, Any]:
    """Run ``step_fn(first_step + i)`` for ``steps`` steps under torch.profiler and summarise them;
    ``trace``: also write a Chrome trace (``.json`` or ``.json.gz``) for chrome://tracing / Perfetto."""
    on_device = torch.cuda.is_available()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if on_device:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    with torch.profiler.profile(activities=activities, record_shapes=False) as prof:
        t0 = time.perf_counter()
        for i in range(steps):
            step_fn(first_step + i)
        if on_device:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    if trace is not None:
        prof.export_chrome_trace(str(trace))
    return summarize(list(prof.events()), list(prof.key_averages()), steps, wall, on_device)


def format_summary(name: str, s: dict[str, Any]) -> str:
    """A short text table of one summary."""
    lines = [f"{name}: {s['total_ms']:.1f} ms per step ({s['timer']}; host wall {s['wall_ms']:.1f} ms)"]
    for k, v in s["regions_ms"].items():
        if not v:  # a step without that region (the vanilla step names none)
            continue
        lines.append(f"  {k:28s} {v:9.2f} ms  {100 * v / s['total_ms'] if s['total_ms'] else 0:5.1f}%")
    lines.append(f"  host syncs per step: {s['host_syncs_per_step']}")
    launches = s.get("launches_per_step") or {}
    if launches:
        top = ", ".join(f"{k} {v:.0f}" for k, v in list(launches.items())[:10])
        lines.append(f"  CUDA launches per step: {sum(launches.values()):.0f} ({top})")
    for region, ops in (s.get("launches_by_op") or {}).items():
        top = ", ".join(f"{k} {v:.0f}" for k, v in list(ops.items())[:8])
        lines.append(f"    {region} launches by op: {top}")
    lines.append("  backward by autograd node (top 8):")
    for k, v in list(s["backward_nodes_ms"].items())[:8]:
        lines.append(f"    {k:40s} {v:9.2f} ms")
    return "\n".join(lines)
