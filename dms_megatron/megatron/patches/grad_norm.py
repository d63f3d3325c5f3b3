"""megatron-core's Transformer-Engine-free gradient norm and scaling, on torch's foreach kernels.

Without Transformer Engine or Apex, megatron-core 0.19.2 falls back to
``megatron.core.utils.local_multi_tensor_l2_norm`` and ``local_multi_tensor_scale``. The norm builds
``torch.tensor(list_of_device_scalars)``: one host synchronisation per gradient tensor every step (548
``aten::_local_scalar_dense`` in the optimizer step of a SmolLM2 retrofit step, 95 at one TP=8 rank of
the 32B layer; H100 profiles of 2026-12-07, ``docs/results/2026-12-07_h100_tuned_step``), and the scale
launches a multiply and a copy per tensor. The replacements compute the same quantities with
``torch._foreach_norm`` / ``_foreach_mul_`` / ``_foreach_copy_`` and keep the norm on the device:

* the norm: the 2-norm of the per-tensor 2-norms (upstream reduces them on the host in fp32; the
  device reduction may differ in the last bit);
* the scale: bitwise what upstream computes (``dst.copy_(src * scale)``, in place when ``dst`` is
  ``src``; a copy when the scale is 1).

Installed only where the upstream fallback is the installed implementation (with TE or Apex megatron
uses their fused kernels and nothing is replaced).
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

import torch

from dms_megatron.megatron.patches import AppliedPatches, Patch, apply_patches, is_applied

log = logging.getLogger(__name__)


def foreach_l2_norm(
    chunk_size: int,
    noop_flag: torch.Tensor,
    tensor_lists: list[list[torch.Tensor]],
    per_tensor: bool,
    *args: Any,
) -> tuple[torch.Tensor, None]:
    """``amp_C.multi_tensor_l2norm``'s contract for the first list: ``([total 2-norm] fp32, None)``,
    on the tensors' device, without a host synchronisation."""
    tensors = tensor_lists[0]
    if not tensors:
        return torch.zeros(1, dtype=torch.float32, device=noop_flag.device), None
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float32)))
    return total.reshape(1), None


def foreach_scale(
    chunk_size: int, noop_flag: torch.Tensor, tensor_lists: list[list[torch.Tensor]], scale: float
) -> None:
    """``amp_C.multi_tensor_scale``'s contract: ``dst = src * scale`` for each pair of the two lists."""
    src, dst = tensor_lists[0], tensor_lists[1]
    if not src:
        return
    if all(s is d for s, d in zip(src, dst, strict=True)):
        torch._foreach_mul_(dst, scale)
    elif scale == 1.0:
        torch._foreach_copy_(dst, src)
    else:
        torch._foreach_copy_(dst, torch._foreach_mul(src, scale))


_REMOVE_WHEN = "megatron-core's TE-free fallback keeps the gradient norm on the device"
PATCHES: tuple[Patch, ...] = (
    Patch("megatron.core.optimizer.clip_grads", "l2_norm_impl", foreach_l2_norm, remove_when=_REMOVE_WHEN),
    Patch(
        "megatron.core.optimizer.clip_grads",
        "multi_tensor_scale_impl",
        foreach_scale,
        remove_when=_REMOVE_WHEN,
    ),
    Patch(
        "megatron.core.optimizer.optimizer",
        "multi_tensor_scale_impl",
        foreach_scale,
        remove_when=_REMOVE_WHEN,
    ),
)
_FALLBACKS = {
    "l2_norm_impl": "local_multi_tensor_l2_norm",
    "multi_tensor_scale_impl": "local_multi_tensor_scale",
}


def _on_fallback(patch: Patch) -> bool:
    """Whether ``patch``'s target holds megatron-core's local fallback (no TE, no Apex)."""
    utils = importlib.import_module("megatron.core.utils")
    current = getattr(importlib.import_module(patch.target_module), patch.target_attr)
    return current is getattr(utils, _FALLBACKS[patch.target_attr])


def use_foreach_grad_norm() -> AppliedPatches:
    """Install the replacements whose targets hold the upstream fallback (none with TE / Apex, or when
    already installed); the result can put the originals back. Idempotent."""
    todo = [p for p in PATCHES if not is_applied(p) and _on_fallback(p)]
    applied = apply_patches(todo)
    if todo:
        log.info("dms_megatron: gradient norm and scaling on torch foreach kernels (no TE / Apex installed)")
    return applied
