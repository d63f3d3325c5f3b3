"""``apply_dms``: turn any megatron-core GPT layer spec into a DMS layer spec.

Only the existing slots change: ``self_attention.module`` becomes ``DMSSelfAttention`` and
``self_attention.submodules.core_attention`` becomes ``DMSCoreAttention``; with the local spec the
layer class becomes ``DMSTransformerLayer`` so the adapter can read the pre-norm residual. Nothing
upstream is copied or patched.
"""

from __future__ import annotations

import copy
import logging

from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer

from dms_megatron.config import DMSConfig
from dms_megatron.megatron.attention import DMSCoreAttention, DMSSelfAttention, DMSTransformerLayer
from dms_megatron.megatron.state import DMSRunState

log = logging.getLogger(__name__)


def _norm_is_fused(layer_spec: ModuleSpec) -> bool:
    """True when the input norm lives inside linear_qkv (TE spec): attention sees pre-norm states."""
    norm = getattr(layer_spec.submodules, "input_layernorm", None)
    norm_module = norm.module if isinstance(norm, ModuleSpec) else norm
    return norm_module is None or norm_module is IdentityOp


def apply_dms(layer_spec: ModuleSpec, dms_config: DMSConfig, state: DMSRunState | None = None) -> ModuleSpec:
    """Return a copy of ``layer_spec`` with DMS attention in its self-attention slots.

    ``state`` is the run state shared by every DMS module built from the spec (created if None);
    fetch it back from a built model with ``dms_run_state(model)``.
    """
    if not isinstance(dms_config, DMSConfig):
        raise ValueError(f"dms_config must be a DMSConfig, got {type(dms_config).__name__}")
    if dms_config.compression_loss == "per_layer":
        raise NotImplementedError(
            "dms.compression_loss=per_layer is implemented in dms_megatron.core but not yet wired into "
            "the Megatron plugin; use dms.compression_loss=global (the paper's exact objective)"
        )
    if (
        not isinstance(layer_spec, ModuleSpec)
        or not isinstance(layer_spec.module, type)
        or not issubclass(layer_spec.module, TransformerLayer)
    ):
        raise ValueError("apply_dms expects a TransformerLayer ModuleSpec (e.g. get_gpt_layer_local_spec())")
    attn = getattr(layer_spec.submodules, "self_attention", None)
    if not isinstance(attn, ModuleSpec) or getattr(attn.submodules, "core_attention", None) is None:
        raise ValueError("the layer spec has no self_attention ModuleSpec with a core_attention slot")
    state = DMSRunState() if state is None else state
    spec = copy.copy(layer_spec)
    spec.submodules = copy.copy(layer_spec.submodules)
    fused = _norm_is_fused(layer_spec)
    if not fused:
        if layer_spec.module is not TransformerLayer and not issubclass(
            layer_spec.module, DMSTransformerLayer
        ):
            if dms_config.variant == "adapter":
                raise ValueError(
                    f"the adapter variant needs the pre-norm residual, but the layer class "
                    f"{layer_spec.module.__name__} is custom; use TransformerLayer or the TE spec"
                )
        else:
            spec.module = DMSTransformerLayer
    new_attn = copy.copy(attn)
    new_attn.module = DMSSelfAttention
    new_attn.params = {
        **(attn.params or {}),
        "dms_config": dms_config,
        "dms_state": state,
        "residual_is_input": fused,
    }
    new_attn.submodules = copy.copy(attn.submodules)
    new_attn.submodules.core_attention = ModuleSpec(
        module=DMSCoreAttention, params={"dms_config": dms_config, "dms_state": state}
    )
    spec.submodules.self_attention = new_attn
    log.info(
        "DMS spec: variant=%s window=%d fused_input_norm=%s", dms_config.variant, dms_config.window, fused
    )
    return spec
