"""Declarative HF <-> Megatron weight mapping for the Llama / Qwen2 / Qwen3 families (torch only).

Megatron names are those of ``GPTModel`` built from the local layer spec (``{i}`` = global layer).
Three kinds of rule:
    copy  one HF tensor is the Megatron tensor
    qkv   q, k, v projections fused per query group: rows [g q heads, k head, v head] x head_dim
    glu   gate and up projections stacked: rows [gate; up]
Full (unsharded) tensors only; TP/PP sharding is the checkpoint layer's job.

DMS adapter weights use NVIDIA's reference names (``self_attn.dms_proj_alpha_norm`` / ``dms_proj_alpha``)
so exported checkpoints line up with released DMS models.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from dms_megatron.families import ModelArch


@dataclass(frozen=True)
class Rule:
    mcore: str
    hf: tuple[str, ...]
    kind: str = "copy"  # copy | qkv | glu
    when: Callable[[ModelArch, bool], bool] = lambda arch, adapter: True


_L = "model.layers.{i}."
_M = "decoder.layers.{i}."
RULES: tuple[Rule, ...] = (
    Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",)),
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",)),
    Rule("output_layer.weight", ("lm_head.weight",), when=lambda a, _: not a.tie_word_embeddings),
    Rule(_M + "input_layernorm.weight", (_L + "input_layernorm.weight",)),
    Rule(
        _M + "self_attention.linear_qkv.weight",
        tuple(_L + f"self_attn.{p}_proj.weight" for p in "qkv"),
        "qkv",
    ),
    Rule(
        _M + "self_attention.linear_qkv.bias",
        tuple(_L + f"self_attn.{p}_proj.bias" for p in "qkv"),
        "qkv",
        when=lambda a, _: a.qkv_bias,
    ),
    Rule(
        _M + "self_attention.q_layernorm.weight",
        (_L + "self_attn.q_norm.weight",),
        when=lambda a, _: a.qk_norm,
    ),
    Rule(
        _M + "self_attention.k_layernorm.weight",
        (_L + "self_attn.k_norm.weight",),
        when=lambda a, _: a.qk_norm,
    ),
    Rule(_M + "self_attention.linear_proj.weight", (_L + "self_attn.o_proj.weight",)),
    Rule(_M + "pre_mlp_layernorm.weight", (_L + "post_attention_layernorm.weight",)),
    Rule(_M + "mlp.linear_fc1.weight", (_L + "mlp.gate_proj.weight", _L + "mlp.up_proj.weight"), "glu"),
    Rule(_M + "mlp.linear_fc2.weight", (_L + "mlp.down_proj.weight",)),
    Rule(
        _M + "self_attention.adapter.norm.weight",
        (_L + "self_attn.dms_proj_alpha_norm.weight",),
        when=lambda a, adapter: adapter,
    ),
    Rule(
        _M + "self_attention.adapter.proj.weight",
        (_L + "self_attn.dms_proj_alpha.weight",),
        when=lambda a, adapter: adapter,
    ),
)
_LAYER = re.compile(r"\.(\d+)\.")


def _active(arch: ModelArch, adapter: bool) -> list[Rule]:
    return [r for r in RULES if r.when(arch, adapter)]


def _expand(pattern: str, arch: ModelArch) -> list[str]:
    return [pattern.format(i=i) for i in range(arch.num_layers)] if "{i}" in pattern else [pattern]


def mcore_names(arch: ModelArch, adapter: bool = False) -> list[str]:
    """Every Megatron parameter name of the full model (all stages)."""
    return [n for r in _active(arch, adapter) for n in _expand(r.mcore, arch)]


def hf_names(arch: ModelArch, adapter: bool = False) -> list[str]:
    """Every HF tensor name the model needs (or produces on export)."""
    out = []
    for r in _active(arch, adapter):
        for h in r.hf:
            out.extend(_expand(h, arch))
    return out


def _rule_for(name: str, arch: ModelArch, adapter: bool) -> tuple[Rule, int | None]:
    m = _LAYER.search(name)
    layer = int(m.group(1)) if m else None
    generic = _LAYER.sub(".{i}.", name, count=1) if m else name
    for r in _active(arch, adapter):
        if r.mcore == generic:
            return r, layer
    raise ValueError(f"no HF mapping for Megatron parameter {name!r} ({arch.architecture})")


def _hf_for(rule: Rule, layer: int | None) -> list[str]:
    return [h.format(i=layer) for h in rule.hf]


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, arch: ModelArch) -> torch.Tensor:
    ng, g, d = arch.num_query_groups, arch.group_size, arch.head_dim
    tail = q.shape[1:]
    parts = [q.reshape(ng, g * d, *tail), k.reshape(ng, d, *tail), v.reshape(ng, d, *tail)]
    return torch.cat(parts, dim=1).reshape(ng * (g + 2) * d, *tail)


def split_qkv(qkv: torch.Tensor, arch: ModelArch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ng, g, d = arch.num_query_groups, arch.group_size, arch.head_dim
    tail = qkv.shape[1:]
    grouped = qkv.reshape(ng, (g + 2) * d, *tail)
    q, k, v = grouped.split([g * d, d, d], dim=1)
    return q.reshape(ng * g * d, *tail), k.reshape(ng * d, *tail), v.reshape(ng * d, *tail)


def hf_to_mcore_tensor(
    name: str, read: Callable[[str], torch.Tensor], arch: ModelArch, adapter: bool = False
) -> torch.Tensor:
    """The full Megatron tensor ``name`` built from HF tensors fetched with ``read(hf_name)``."""
    rule, layer = _rule_for(name, arch, adapter)
    srcs = [read(h) for h in _hf_for(rule, layer)]
    if rule.kind == "qkv":
        return fuse_qkv(*srcs, arch)
    if rule.kind == "glu":
        return torch.cat(srcs, dim=0)
    return srcs[0]


def mcore_to_hf_tensors(
    name: str, tensor: torch.Tensor, arch: ModelArch, adapter: bool = False
) -> list[tuple[str, torch.Tensor]]:
    """HF ``(name, tensor)`` pairs for one full Megatron tensor."""
    rule, layer = _rule_for(name, arch, adapter)
    names = _hf_for(rule, layer)
    if rule.kind == "qkv":
        return list(zip(names, split_qkv(tensor, arch), strict=True))
    if rule.kind == "glu":
        return list(zip(names, tensor.chunk(2, dim=0), strict=True))
    return [(names[0], tensor)]


def hf_shapes(arch: ModelArch, adapter: bool = False) -> dict[str, tuple[int, ...]]:
    """Expected shape of every HF tensor of the model."""
    h, d, ffn, v = arch.hidden_size, arch.head_dim, arch.ffn_hidden_size, arch.vocab_size
    q, kv = arch.num_attention_heads * d, arch.num_query_groups * d
    per_layer = {
        "input_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.q_proj.bias": (q,),
        "self_attn.k_proj.bias": (kv,),
        "self_attn.v_proj.bias": (kv,),
        "self_attn.q_norm.weight": (d,),
        "self_attn.k_norm.weight": (d,),
        "self_attn.o_proj.weight": (h, q),
        "post_attention_layernorm.weight": (h,),
        "mlp.gate_proj.weight": (ffn, h),
        "mlp.up_proj.weight": (ffn, h),
        "mlp.down_proj.weight": (h, ffn),
        "self_attn.dms_proj_alpha_norm.weight": (h,),
        "self_attn.dms_proj_alpha.weight": (arch.num_query_groups, h),
    }
    top = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    out = {}
    for name in hf_names(arch, adapter):
        m = re.match(r"model\.layers\.\d+\.(.*)$", name)
        out[name] = per_layer[m.group(1)] if m else top[name]
    return out
