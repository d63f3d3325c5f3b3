"""Checkpoint conversion on a machine without CUDA: megatron's build/save-time CUDA calls stay on the CPU
for the duration of a ``with cpu_megatron():`` block (see the package docstring)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch

from dms_megatron.megatron.compat import installed_megatron_core_version
from dms_megatron.megatron.patches import Patch, is_applied, patched
from dms_megatron.megatron.patches.cpu_training import cpu_training_enabled

log = logging.getLogger(__name__)

_REMOVE_WHEN = "megatron-core builds and saves models without touching CUDA"


def _current_device() -> torch.device:
    return torch.device("cpu")


def _tensor_stays(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return self


PATCHES: tuple[Patch, ...] = (
    Patch("torch.cuda", "current_device", _current_device, remove_when=_REMOVE_WHEN),
    Patch("torch.cuda", "synchronize", lambda *a, **k: None, remove_when=_REMOVE_WHEN),
    Patch("torch", "Tensor.cuda", _tensor_stays, remove_when=_REMOVE_WHEN),
)


@contextlib.contextmanager
def cpu_megatron() -> Iterator[None]:
    """Within the block, on a CUDA-less machine, ``torch.cuda.current_device``/``synchronize`` are
    CPU no-ops. A no-op where CUDA is available or a patch is already active."""
    if torch.cuda.is_available() or cpu_training_enabled() or is_applied(PATCHES[0]):
        yield
        return
    with patched(PATCHES):
        log.info(
            "dms_megatron: no CUDA; megatron's CUDA calls stay on the CPU (megatron-core %s)",
            installed_megatron_core_version(),
        )
        yield
