"""Greedy generation with a DMS megatron stage (PP=1, any TP), by full recomputation per token.

In eval mode ``DMSCoreAttention`` applies hard decisions (a key flagged for eviction is masked once it
leaves the window), so recomputing the prefix each step gives exactly what a compressed KV cache would:
earlier decisions never change (causality). This is a correctness/demo path, O(T^2) per token; the
paged compressed-cache engine is ``dms_megatron.inference`` (planned).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from megatron.core import parallel_state, tensor_parallel

from dms_megatron.megatron.pipeline import attach_dms_pipeline, reduce_decision_stats


@dataclass
class Generation:
    tokens: list[int]  # generated ids (prompt excluded)
    eviction_rate: float  # evicted fraction of all (layer, KV head, position) decisions, last forward
    rates: torch.Tensor  # [layers, kv_heads] of the last forward


@torch.no_grad()
def greedy_generate(
    model: torch.nn.Module,
    prompt: Sequence[int],
    max_new_tokens: int,
    vocab_size: int,
    stop_ids: Sequence[int] = (),
    teacher: bool = False,
) -> Generation:
    """Greedy continuation of ``prompt``; ``teacher=True`` runs the same model with eviction off."""
    if parallel_state.get_pipeline_model_parallel_world_size() != 1:
        raise ValueError("greedy_generate needs the whole model on one stage (pipeline size 1)")
    if not prompt:
        raise ValueError("the prompt is empty")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    state = attach_dms_pipeline(model)
    config = model.config
    num_layers, num_kv = config.num_layers, config.num_query_groups or config.num_attention_heads
    device = next(model.parameters()).device
    model.eval()
    ids = torch.tensor([list(prompt)], dtype=torch.long, device=device)
    out: list[int] = []
    rates = torch.zeros(num_layers, num_kv)
    state.teacher_pass = teacher
    try:
        for _ in range(max_new_tokens):
            pos = torch.arange(ids.shape[1], device=device).unsqueeze(0)
            logits = model(input_ids=ids, position_ids=pos, attention_mask=None)[:, -1]  # [1, V/tp]
            logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits)[..., :vocab_size]
            rates = reduce_decision_stats(state, num_layers, num_kv, device=device).cpu()
            nxt = int(logits.argmax(-1))
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]], device=device)], dim=1)
            if nxt in stop_ids:
                break
    finally:
        state.teacher_pass = False
    return Generation(out, float(rates.mean()), rates)
