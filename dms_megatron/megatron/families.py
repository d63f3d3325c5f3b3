"""Build megatron ``TransformerConfig``, layer spec and ``GPTModel`` stages from a ``ModelArch``."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig

from dms_megatron.config import DMSConfig
from dms_megatron.families import ModelArch
from dms_megatron.megatron.norm import LocalNorm
from dms_megatron.megatron.spec import apply_dms
from dms_megatron.megatron.state import DMSRunState

# Settings under which a megatron model computes exactly what the HF model does and runs anywhere:
# no dropout, fp32, CPU initialisation (every TP layout shards one master), every fused kernel off
# (they are CUDA-only or torch.compile-based). Callers override for speed on GPU.
EXACT_DEFAULTS: dict[str, Any] = {
    "hidden_dropout": 0.0,
    "attention_dropout": 0.0,
    "params_dtype": torch.float32,
    "pipeline_dtype": torch.float32,
    "use_cpu_initialization": True,
    "bias_activation_fusion": False,
    "masked_softmax_fusion": False,
    "bias_dropout_fusion": False,
    "apply_rope_fusion": False,
    "gradient_accumulation_fusion": False,
    "persist_layer_norm": False,
    "cross_entropy_loss_fusion": False,
}


def padded_vocab_size(arch: ModelArch, tp: int) -> int:
    """Megatron's vocab-parallel layers need the vocabulary to divide by TP; pad the rest."""
    return -(-arch.vocab_size // tp) * tp


def transformer_config(arch: ModelArch, tp: int, pp: int, **overrides: Any) -> TransformerConfig:
    """Megatron config equivalent to the HF model (no dropout; fusions off unless overridden)."""
    arch.check_parallel(tp, pp)
    kwargs: dict[str, Any] = {
        "num_layers": arch.num_layers,
        "hidden_size": arch.hidden_size,
        "ffn_hidden_size": arch.ffn_hidden_size,
        "num_attention_heads": arch.num_attention_heads,
        "num_query_groups": arch.num_query_groups,
        "kv_channels": arch.head_dim,
        "normalization": "RMSNorm",
        "layernorm_epsilon": arch.norm_eps,
        "gated_linear_unit": True,
        "activation_func": F.silu,
        "add_bias_linear": False,
        "add_qkv_bias": arch.qkv_bias,
        "qk_layernorm": arch.qk_norm,
        "tensor_model_parallel_size": tp,
        "pipeline_model_parallel_size": pp,
        **EXACT_DEFAULTS,
    }
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def local_layer_spec(qk_layernorm: bool = False) -> ModuleSpec:
    """megatron's local (non-TE) GPT layer spec (RMSNorm) with ``LocalNorm`` in every norm slot, so that
    sequence parallelism works without Transformer Engine."""
    spec = get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=qk_layernorm)
    spec.submodules.input_layernorm = LocalNorm
    spec.submodules.pre_mlp_layernorm = LocalNorm
    attn = spec.submodules.self_attention.submodules
    for slot in ("q_layernorm", "k_layernorm"):
        if getattr(attn, slot) is not IdentityOp:
            setattr(attn, slot, LocalNorm)
    return spec


def layer_spec(
    arch: ModelArch, dms_config: DMSConfig | None = None, state: DMSRunState | None = None
) -> ModuleSpec:
    """``local_layer_spec`` for the family, DMS applied when a config is given."""
    spec = local_layer_spec(qk_layernorm=arch.qk_norm)
    return spec if dms_config is None else apply_dms(spec, dms_config, state)


def decoder_block_spec(config: TransformerConfig, spec: ModuleSpec) -> TransformerBlockSubmodules:
    """This rank's stage of the decoder: ``spec`` for each of its layers and a ``LocalNorm`` final norm
    (megatron's default final norm for a layer spec refuses sequence parallelism without TE)."""
    return TransformerBlockSubmodules(
        layer_specs=[spec] * get_num_layers_to_build(config), layer_norm=LocalNorm
    )


def build_gpt_stage(arch: ModelArch, config: TransformerConfig, spec: ModuleSpec) -> GPTModel:
    """This rank's pipeline stage of the model (parallel state must be initialised); the final norm is a
    ``LocalNorm`` too."""
    block = decoder_block_spec(config, spec)
    return GPTModel(
        config=config,
        transformer_layer_spec=block,
        vocab_size=padded_vocab_size(arch, config.tensor_model_parallel_size),
        max_sequence_length=arch.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(arch.rope_theta),
    )
