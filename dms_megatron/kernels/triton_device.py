"""The one rule of where our Triton kernels run: on CUDA tensors, or on CPU under the Triton interpreter
(``TRITON_INTERPRET=1``, tests only)."""

from __future__ import annotations

import os

import torch


def require_triton_device(x: torch.Tensor, what: str, hint: str = "") -> None:
    """``ValueError`` naming ``what`` when ``x`` is not on CUDA and the interpreter is off."""
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        cpu = "TRITON_INTERPRET=1 runs it on CPU, for tests only"
        raise ValueError(f"{what} needs CUDA tensors ({cpu}){hint}")
