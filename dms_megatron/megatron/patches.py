"""Explicit, logged, version-gated patches of upstream objects (house rule: all of them live here).

``split_decision_channels_on_input(block, acc, channels)``: per ``TransformerBlock`` *instance*, its
``set_input_tensor`` is replaced so that an activation received from the previous pipeline stage,
``[s, b, h + channels]``, has its last channels (the DMS decision counts, see ``state.py``) split off
into the stage's accumulator before megatron sees ``[s, b, h]``. Needed for megatron-core 0.19.2, whose
P2P carries one tensor of one shape; remove if megatron gains a side channel for per-stage tensors.

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
import types
from collections.abc import Iterator
from typing import Any

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


def split_decision_channels_on_input(block: Any, acc: Any, channels: int) -> None:
    """Replace ``block.set_input_tensor`` (this instance only); see the module docstring."""
    from megatron.core.transformer.transformer_block import TransformerBlock

    version = installed_megatron_core_version()
    if version not in SUPPORTED_MEGATRON_CORE:
        raise RuntimeError(
            f"this patch is written for megatron-core {SUPPORTED_MEGATRON_CORE}, found {version}"
        )
    hidden = block.config.hidden_size

    def set_input_tensor(self, input_tensor):
        if isinstance(input_tensor, list | tuple):
            input_tensor = input_tensor[0]
        if input_tensor is not None and input_tensor.shape[-1] == hidden + channels:
            acc.acc_in = input_tensor[..., hidden:].float().sum(-1)
            input_tensor = input_tensor[..., :hidden]
        TransformerBlock.set_input_tensor(self, input_tensor)

    block.set_input_tensor = types.MethodType(set_input_tensor, block)
    log.info(
        "dms_megatron: %s.set_input_tensor splits %d decision channels off its input",
        type(block).__name__,
        channels,
    )
