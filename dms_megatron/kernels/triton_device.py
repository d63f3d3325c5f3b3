"""The one rule of where our Triton kernels run: on CUDA tensors, or on CPU under the Triton interpreter
(``TRITON_INTERPRET=1``, tests only)."""

from __future__ import annotations

import os

import torch


def triton_runs_on(device: torch.device) -> bool:
    """True for a CUDA device, or any device while the Triton interpreter is on."""
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def require_triton_device(x: torch.Tensor, what: str, hint: str = "") -> None:
    """``ValueError`` naming ``what`` when ``x`` is not on CUDA and the interpreter is off."""
    if not triton_runs_on(x.device):
        cpu = "TRITON_INTERPRET=1 runs it on CPU, for tests only"
        raise ValueError(f"{what} needs CUDA tensors ({cpu}){hint}")
