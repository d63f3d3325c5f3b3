"""Pipeline glue for DMS: the decision channel between stages, the exact compression loss on the
last stage, and once-per-step metric reduction. See ``state.py`` for the gradient mechanics.

Upstream objects are touched per instance only: ``patches.split_decision_channels_on_input`` (the
one patch, ``patches/pipeline_input.py``) and a forward pre-hook and forward hook on each
``TransformerBlock`` (public torch API).

Decision counts ride as two channels (hi = multiple of 256, lo < 256) so that they stay exact in a
bf16 pipeline (bf16 holds integers exactly only up to 256).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.transformer_block import TransformerBlock

from dms_megatron.megatron.attention import DMSCoreAttention
from dms_megatron.megatron.patches.pipeline_input import split_decision_channels_on_input
from dms_megatron.megatron.state import DecisionAccumulator, DMSRunState, close_stage

log = logging.getLogger(__name__)
DECISION_CHANNELS = 2


def dms_run_state(model: torch.nn.Module) -> DMSRunState:
    """The ``DMSRunState`` shared by the DMS modules of ``model``."""
    for m in model.modules():
        if isinstance(m, DMSCoreAttention):
            return m.dms_state
    raise ValueError("model has no DMS attention (build its layer spec with apply_dms)")


def _blocks(model: torch.nn.Module) -> list[TransformerBlock]:
    return [m for m in model.modules() if isinstance(m, TransformerBlock)]


def _encode(acc: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    lo = torch.remainder(acc.detach(), 256.0)
    return torch.stack([acc - lo, lo], dim=-1).to(dtype)  # gradient flows through the hi channel


def attach_dms_pipeline(model: torch.nn.Module) -> DMSRunState:
    """Wire the decision channel into every model chunk of ``model`` (idempotent). Returns the state.

    Call once after building the model, before wrapping it in DDP.
    """
    state = dms_run_state(model)
    if parallel_state.model_parallel_is_initialized():
        vp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
        if vp is not None and vp > 1:
            raise NotImplementedError("DMS does not support virtual (interleaved) pipeline parallelism yet")
    for block in _blocks(model):
        if getattr(block, "_dms_attached", False):
            continue
        acc = DecisionAccumulator()
        state.accumulators[id(block)] = acc
        for m in block.modules():
            if isinstance(m, DMSCoreAttention):
                m.dms_accumulator = acc
        split_decision_channels_on_input(block, acc, DECISION_CHANNELS)

        def pre_hook(module, args, kwargs, _acc=acc):
            _acc.begin()

        def post_hook(module, args, kwargs, output, _acc=acc):
            hidden_out = output[0] if isinstance(output, tuple) else output
            hidden_out, acc_out = close_stage(hidden_out, _acc)
            if module.post_process:
                _acc.total = acc_out
                new = hidden_out
            else:
                new = torch.cat([hidden_out, _encode(acc_out, hidden_out.dtype)], dim=-1)
            return (new, *output[1:]) if isinstance(output, tuple) else new

        block.register_forward_pre_hook(pre_hook, with_kwargs=True)
        block.register_forward_hook(post_hook, with_kwargs=True)
        block._dms_attached = True
        log.info(
            "DMS: decision channel attached to %s (post_process=%s)", type(block).__name__, block.post_process
        )
    return state


def adjust_p2p_shapes(
    recv_shapes: list[tuple[int, ...]], send_shapes: list[tuple[int, ...]]
) -> tuple[list, list]:
    """``adjust_tensor_shapes_fn`` for the 1F1B schedule: widen activations by the decision channels."""

    def widen(shapes):
        return [(*s[:-1], s[-1] + DECISION_CHANNELS) if len(s) else s for s in shapes]

    return widen(recv_shapes), widen(send_shapes)


def dms_compression_loss(
    model: torch.nn.Module,
    valid: torch.Tensor,
    target_fraction: float,
    num_layers: int,
    num_kv_heads: int,
    samples: int | None = None,
) -> torch.Tensor:
    """Exact global compression loss on the last stage: ``mean_b relu(target - frac_b)``.

    ``valid [b, s]``: True where a position counts. ``num_layers``/``num_kv_heads``: the whole model's.
    ``samples``: for a packed (THD) micro-batch ``[1, n * s]`` made of ``n`` equal-length training
    sequences, ``n``: the hinge is taken per training sequence, as in the unpacked batch.
    """
    blocks = [b for b in _blocks(model) if b.post_process]
    if len(blocks) != 1:
        raise ValueError("dms_compression_loss runs on the last pipeline stage of a non-interleaved model")
    state = dms_run_state(model)
    acc = state.accumulators.get(id(blocks[0]))
    if acc is None or acc.total is None:
        raise RuntimeError("no decision counts: call attach_dms_pipeline(model) and run a forward first")
    total = acc.total  # [s(/tp), b]
    config = blocks[0].config
    v = valid.t().to(total.dtype)  # [s, b]
    tp = (
        parallel_state.get_tensor_model_parallel_world_size()
        if parallel_state.model_parallel_is_initialized()
        else 1
    )
    if config.sequence_parallel and tp > 1:
        shard = total.shape[0]
        rank = parallel_state.get_tensor_model_parallel_rank()
        local = total * v[rank * shard : (rank + 1) * shard]
        # full-length per-position counts (zeros outside this rank's shard), summed over TP ranks;
        # identity backward: each rank's shard receives the gradient of its own positions
        full = torch.zeros_like(v)
        full = full.index_add(0, torch.arange(rank * shard, (rank + 1) * shard, device=v.device), local)
        per_position = tensor_parallel.reduce_from_tensor_model_parallel_region(full)
    else:
        per_position = total * v
    counted = v
    if samples is not None:
        if per_position.shape[1] != 1 or per_position.shape[0] % samples:
            raise ValueError(
                f"samples={samples} needs a packed [1, n * s] micro-batch, got {tuple(valid.shape)}"
            )
        per_position = per_position.reshape(samples, -1).t()  # [s, n]
        counted = counted.reshape(samples, -1).t()
    per_sample = per_position.sum(0)
    count = counted.sum(0) * (num_layers * num_kv_heads)
    frac = per_sample / count.clamp(min=1.0)
    return torch.relu(target_fraction - frac).mean()


def reduce_decision_stats(
    state: DMSRunState, num_layers: int, num_kv_heads: int, device: Any = None
) -> torch.Tensor:
    """Eviction rate per ``[layer, KV head]`` of this step, reduced over TP, PP and DP. Collective:
    every rank must call it once per step, outside any forward. Clears the step's statistics."""
    sums = torch.zeros(num_layers, num_kv_heads, dtype=torch.float64, device=device)
    counts = torch.zeros_like(sums)
    tp_rank = (
        parallel_state.get_tensor_model_parallel_rank()
        if parallel_state.model_parallel_is_initialized()
        else 0
    )
    for layer, (s, c) in state.stats.items():
        ng = s.numel()
        sums[layer, tp_rank * ng : (tp_rank + 1) * ng] += s.double().to(sums.device)
        counts[layer, tp_rank * ng : (tp_rank + 1) * ng] += c.double().to(sums.device)
    if torch.distributed.is_initialized():
        both = torch.stack([sums, counts])
        torch.distributed.all_reduce(both, group=parallel_state.get_model_parallel_group())
        torch.distributed.all_reduce(both, group=parallel_state.get_data_parallel_group())
        sums, counts = both[0], both[1]
    state.reset_stats()
    return sums / counts.clamp(min=1.0)
