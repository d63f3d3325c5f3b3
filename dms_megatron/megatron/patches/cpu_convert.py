"""Checkpoint conversion on a machine without CUDA: megatron's build/save-time CUDA calls stay on the CPU
for the duration of a ``with cpu_megatron():`` block (see the package docstring)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch

from dms_megatron.megatron.patches import require_supported_megatron
from dms_megatron.megatron.patches.cpu_training import cpu_training_enabled

log = logging.getLogger(__name__)


@contextlib.contextmanager
def cpu_megatron() -> Iterator[None]:
    """Within the block, on a CUDA-less machine, ``torch.cuda.current_device``/``synchronize`` are
    CPU no-ops. A no-op where CUDA is available or a patch is already active."""
    if (
        torch.cuda.is_available()
        or cpu_training_enabled()
        or getattr(torch.cuda.current_device, "_dms_cpu_patch", False)
    ):
        yield
        return
    version = require_supported_megatron("cpu_megatron()")
    saved = torch.cuda.current_device, torch.cuda.synchronize, torch.Tensor.cuda

    def current_device() -> torch.device:
        return torch.device("cpu")

    current_device._dms_cpu_patch = True  # type: ignore[attr-defined]
    torch.cuda.current_device = current_device  # type: ignore[assignment]
    torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
    log.info("dms_megatron: no CUDA; megatron's CUDA calls stay on the CPU (megatron-core %s)", version)
    try:
        yield
    finally:
        torch.cuda.current_device, torch.cuda.synchronize, torch.Tensor.cuda = saved  # type: ignore[assignment]
