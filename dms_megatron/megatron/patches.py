"""Explicit, logged, version-gated patches of upstream objects (house rule: all of them live here).

``cpu_megatron()``: megatron-core 0.19.2 calls ``torch.cuda.current_device()`` while *building* models
(e.g. ``GPTModel.__init__`` -> rotary embedding), ``Tensor.cuda()`` on the tied embedding of a
pipelined model (``LanguageModule.setup_embeddings_and_output_layer``) and ``torch.cuda.synchronize()``
while saving distributed checkpoints; all raise on a machine without a GPU driver. Checkpoint conversion
is CPU work that users run on login or CPU nodes, so for its duration, and only when CUDA is
unavailable, these three calls stay on the CPU. Remove when megatron-core builds and saves models
without touching CUDA. (Training still needs a GPU; tests/megatron has a fuller shim of its own.)
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch

from dms_megatron.megatron.compat import SUPPORTED_MEGATRON_CORE, installed_megatron_core_version

log = logging.getLogger(__name__)


@contextlib.contextmanager
def cpu_megatron() -> Iterator[None]:
    """Within the block, on a CUDA-less machine, ``torch.cuda.current_device``/``synchronize`` are
    CPU no-ops. A no-op where CUDA is available or a patch is already active."""
    if torch.cuda.is_available() or getattr(torch.cuda.current_device, "_dms_cpu_patch", False):
        yield
        return
    version = installed_megatron_core_version()
    if version not in SUPPORTED_MEGATRON_CORE:
        raise RuntimeError(
            f"cpu_megatron() is written for megatron-core {SUPPORTED_MEGATRON_CORE}, found {version}"
        )
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
