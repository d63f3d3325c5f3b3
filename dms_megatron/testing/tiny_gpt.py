"""A tiny Megatron ``GPTModel`` for CPU/gloo tests, plus batch, schedule and gradient-gathering helpers.

Run inside a spawned rank (see ``runner.run_distributed``) with the CPU shim installed. The model: hidden 64,
4 layers, 4 heads, 2 query groups (GQA), RMSNorm, SwiGLU, RoPE, vocab 128, no biases, untied embeddings,
fp32, every fusion off, our local (non-TE) spec with ``LocalNorm`` in every norm slot and as the final norm
(``families.local_layer_spec`` / ``decoder_block_spec``: sequence parallelism needs no patch).
``build_tiny_gpt`` loads name-seeded master weights by default, so every TP/PP layout holds exactly the same
full weights (Megatron's own CPU init only matches across TP, not across PP stages, whose layers are drawn
from a fresh generator).
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from dms_megatron.megatron.families import EXACT_DEFAULTS, decoder_block_spec, local_layer_spec

__all__ = [
    "HIDDEN",
    "MICRO_BATCH",
    "NUM_LAYERS",
    "SEQ_LEN",
    "VOCAB",
    "allreduce_tp_replicated_grads",
    "build_tiny_gpt",
    "forward_backward",
    "gather_full_grads",
    "gather_full_params",
    "global_param_name",
    "init_parallel",
    "load_master_weights",
    "make_batches",
    "merge_rank_grads",
    "tiny_gpt_config",
]

HIDDEN = 64
NUM_LAYERS = 4
NUM_HEADS = 4
NUM_QUERY_GROUPS = 2
FFN_HIDDEN = 128
VOCAB = 128
SEQ_LEN = 16
MICRO_BATCH = 2
MAX_SEQ_LEN = 64

_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.")


# ---------------------------------------------------------------------------------------------------------
# parallel state, config, model
# ---------------------------------------------------------------------------------------------------------


def init_parallel(tp: int, pp: int, *, seed: int) -> None:
    """(Re)initialise megatron's parallel state for TP x PP (DP = the rest) and seed its RNG tracker."""
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised; run inside runner.run_distributed")
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        create_gloo_process_groups=False,  # the default group is gloo already; saves ~a dozen groups
    )
    model_parallel_cuda_manual_seed(seed)  # routed to the CPU generator by the shim


def tiny_gpt_config(
    tp: int, pp: int, *, sequence_parallel: bool = False, num_layers: int = NUM_LAYERS, **overrides: Any
) -> TransformerConfig:
    """TransformerConfig of the tiny GPT (fp32, CPU init, no dropout, no fusions); ``overrides`` win."""
    kwargs: dict[str, Any] = {
        "num_layers": num_layers,
        "hidden_size": HIDDEN,
        "ffn_hidden_size": FFN_HIDDEN,
        "num_attention_heads": NUM_HEADS,
        "num_query_groups": NUM_QUERY_GROUPS,
        "normalization": "RMSNorm",
        "layernorm_epsilon": 1e-5,
        "gated_linear_unit": True,
        "activation_func": F.silu,
        "add_bias_linear": False,
        "add_qkv_bias": False,
        "tensor_model_parallel_size": tp,
        "pipeline_model_parallel_size": pp,
        "sequence_parallel": sequence_parallel,
        **EXACT_DEFAULTS,  # fp32, CPU init, no dropout, no fusions (shared with the package)
    }
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def build_tiny_gpt(
    tp: int,
    pp: int,
    *,
    seed: int,
    sequence_parallel: bool = False,
    master_weights: bool = True,
    num_layers: int = NUM_LAYERS,
    layer_spec: ModuleSpec | None = None,
    **config_overrides: Any,
) -> GPTModel:
    """Initialise parallel state for TP x PP, seed, and build this rank's stage of the tiny GPT.

    With ``master_weights`` (default) every parameter is then overwritten by this rank's shard of a full
    tensor drawn from a generator seeded by ``seed`` and the parameter's global name, so all layouts share
    weights.
    ``layer_spec`` defaults to ``families.local_layer_spec()`` (with sequence parallelism its norm slots
    must hold ``LocalNorm``); the final norm is a ``LocalNorm``.
    """
    if config_overrides.get("num_query_groups", NUM_QUERY_GROUPS) % tp:
        raise ValueError("num_query_groups must divide by tp (megatron replicates KV heads otherwise)")
    init_parallel(tp, pp, seed=seed)
    config = tiny_gpt_config(
        tp, pp, sequence_parallel=sequence_parallel, num_layers=num_layers, **config_overrides
    )
    spec = layer_spec if layer_spec is not None else local_layer_spec()
    model = GPTModel(
        config=config,
        transformer_layer_spec=decoder_block_spec(config, spec),
        vocab_size=VOCAB,
        max_sequence_length=MAX_SEQ_LEN,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
    )
    if master_weights:
        load_master_weights(model, seed)
    return model


# ---------------------------------------------------------------------------------------------------------
# names, shards, master weights
# ---------------------------------------------------------------------------------------------------------


def _layer_offset(model: GPTModel) -> int:
    offset = int(get_transformer_layer_offset(model.config))
    layers = getattr(model.decoder, "layers", [])
    if len(layers) and int(layers[0].layer_number) - 1 != offset:
        raise RuntimeError(f"layer offset {offset} disagrees with layer_number {layers[0].layer_number}")
    return offset


def global_param_name(local_name: str, layer_offset: int) -> str:
    """Map a stage-local name ``decoder.layers.{i}.…`` to the global layer index ``i + layer_offset``."""
    return _LAYER_RE.sub(lambda m: f"decoder.layers.{int(m.group(1)) + layer_offset}.", local_name, count=1)


def _tp_layout(param: torch.Tensor) -> tuple[int, int] | None:
    """(partition_dim, partition_stride) of a TP-sharded parameter, or None if it is replicated over TP."""
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return None
    if not getattr(param, "tensor_model_parallel", False):
        return None
    return int(param.partition_dim), int(getattr(param, "partition_stride", 1))


def _shard(full: torch.Tensor, dim: int, stride: int, rank: int, world: int) -> torch.Tensor:
    """This rank's shard: split into world*stride chunks along ``dim``, keep chunks rank, rank+world, …"""
    if full.shape[dim] % (world * stride):
        raise ValueError(f"dim {dim} of size {full.shape[dim]} does not split into {world}x{stride} parts")
    chunks = torch.chunk(full, world * stride, dim=dim)
    return torch.cat(chunks[rank::world], dim=dim)


def _unshard(shards: Sequence[torch.Tensor], dim: int, stride: int) -> torch.Tensor:
    """Inverse of ``_shard``: the full tensor is [part 0 of every rank; part 1 of every rank; …]."""
    per_rank = [torch.chunk(s, stride, dim=dim) for s in shards]
    return torch.cat([per_rank[r][k] for k in range(stride) for r in range(len(shards))], dim=dim)


def _master_tensor(name: str, shape: Sequence[int], seed: int) -> torch.Tensor:
    """Deterministic full tensor for a global parameter name (independent of TP/PP layout)."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**62))
    values = torch.randn(*shape, generator=gen, dtype=torch.float32)
    if len(shape) == 1:
        return 1.0 + 0.1 * values  # norm weights: near one, not exactly one
    return values * shape[-1] ** -0.5  # matrices: std 1/sqrt(fan_in)


def load_master_weights(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter with this rank's TP shard of its name-seeded full master tensor."""
    offset = _layer_offset(model)  # type: ignore[arg-type]
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    with torch.no_grad():
        for local_name, param in model.named_parameters():
            name = global_param_name(local_name, offset)
            layout = _tp_layout(param)
            shape = list(param.shape)
            if layout is not None:
                shape[layout[0]] *= tp_size
            full = _master_tensor(name, shape, seed)
            param.copy_(full if layout is None else _shard(full, layout[0], layout[1], tp_rank, tp_size))


# ---------------------------------------------------------------------------------------------------------
# data, schedule, gradients
# ---------------------------------------------------------------------------------------------------------


def make_batches(
    num_microbatches: int, *, seed: int = 1234, micro_batch_size: int = MICRO_BATCH, seq_len: int = SEQ_LEN
) -> list[dict[str, torch.Tensor]]:
    """Deterministic micro-batches: tokens, next-token labels, position ids, loss mask (first 2 tokens 0)."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(num_microbatches):
        stream = torch.randint(0, VOCAB, (micro_batch_size, seq_len + 1), generator=gen)
        loss_mask = torch.ones(micro_batch_size, seq_len)
        loss_mask[:, :2] = 0.0  # exercise masking: the first two positions do not count
        batches.append(
            {
                "tokens": stream[:, :-1].contiguous(),
                "labels": stream[:, 1:].contiguous(),
                "position_ids": torch.arange(seq_len).expand(micro_batch_size, seq_len).contiguous(),
                "loss_mask": loss_mask,
            }
        )
    return batches


def _loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
    """Mean token loss of one micro-batch (the schedule then divides by the number of micro-batches)."""
    mask = loss_mask.reshape(-1).float()
    loss = (output_tensor.float().reshape(-1) * mask).sum() / mask.sum()
    return loss, {"lm loss": loss.detach().clone()}


def _forward_step(data_iterator: Iterator[dict[str, torch.Tensor]], model: GPTModel) -> tuple[Any, Any]:
    batch = next(data_iterator)
    output = model(
        input_ids=batch["tokens"],
        position_ids=batch["position_ids"],
        attention_mask=None,  # causal mask built inside the attention
        labels=batch["labels"],
    )
    return output, partial(_loss_func, batch["loss_mask"])


def allreduce_tp_replicated_grads(model: torch.nn.Module) -> None:
    """Sum over TP the grads that each TP rank holds only a part of, as ``finalize_model_grads`` does.

    That is sequence-parallel params (norm weights under SP) and q/k layernorm weights; params tagged
    ``average_gradients_across_tp_domain`` are averaged. Needed because these tests run without Megatron DDP.
    """
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return
    group = parallel_state.get_tensor_model_parallel_group()
    config = model.config
    for name, param in model.named_parameters():
        grad = getattr(param, "main_grad", None)
        grad = param.grad if grad is None else grad
        if not param.requires_grad or grad is None:
            continue
        if getattr(param, "average_gradients_across_tp_domain", False):
            dist.all_reduce(grad, op=dist.ReduceOp.AVG, group=group)
        elif (config.sequence_parallel and getattr(param, "sequence_parallel", False)) or (
            config.qk_layernorm and ("q_layernorm" in name or "k_layernorm" in name)
        ):
            dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=group)


def run_schedule(
    model: torch.nn.Module,
    forward_step: Any,
    batches: Sequence[dict[str, torch.Tensor]],
    adjust_tensor_shapes_fn: Any = None,
) -> list[dict]:
    """One training pass of megatron's schedule (no-PP or 1F1B) over ``batches`` ``[b, s]``, grads reset
    first; returns the schedule's per-micro-batch loss dicts (empty off the last stage)."""
    model.train()
    model.zero_grad(set_to_none=True)
    micro_batch_size, seq_len = batches[0]["tokens"].shape
    extra = {} if adjust_tensor_shapes_fn is None else {"adjust_tensor_shapes_fn": adjust_tensor_shapes_fn}
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(batches),
        model=[model],
        num_microbatches=len(batches),
        seq_length=seq_len,
        micro_batch_size=micro_batch_size,
        forward_only=False,
        **extra,
    )


def forward_backward(
    model: GPTModel, batches: Sequence[dict[str, torch.Tensor]], num_microbatches: int
) -> list[float]:
    """Run megatron's forward-backward schedule (no-PP or 1F1B) over ``batches``; return per-micro-batch loss.

    Grads are reset first, then accumulated in ``param.grad`` (mean over micro-batches of the mean token
    loss); TP-partial grads are all-reduced afterwards. The list is empty on all but the last PP stage.
    """
    if len(batches) != num_microbatches:
        raise ValueError(f"{len(batches)} batches for {num_microbatches} micro-batches")
    losses = run_schedule(model, _forward_step, batches)
    allreduce_tp_replicated_grads(model)
    if not parallel_state.is_pipeline_last_stage():
        return []
    return [float(item["lm loss"]) for item in losses]


def _gather_full(model: torch.nn.Module, grads: bool) -> dict[str, torch.Tensor]:
    offset = _layer_offset(model)  # type: ignore[arg-type]
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    group = parallel_state.get_tensor_model_parallel_group()
    out: dict[str, torch.Tensor] = {}
    for local_name, param in model.named_parameters():
        if grads:
            tensor = getattr(param, "main_grad", None)
            tensor = param.grad if tensor is None else tensor
            if tensor is None:
                raise RuntimeError(f"parameter {local_name} has no gradient")
        else:
            tensor = param
        tensor = tensor.detach()
        layout = _tp_layout(param)
        if layout is not None:
            shards = [torch.empty_like(tensor) for _ in range(tp_size)]
            dist.all_gather(shards, tensor.contiguous(), group=group)
            tensor = _unshard(shards, layout[0], layout[1])
        out[global_param_name(local_name, offset)] = tensor.to("cpu", copy=True)
    return out


def gather_full_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """{global name: full gradient} for the parameters of this rank's PP stage, as CPU tensors.

    TP-sharded grads are all-gathered over the TP group (collective: call on every TP rank) and reassembled
    along ``partition_dim`` honouring ``partition_stride`` (SwiGLU fc1: stride 2, each rank holds
    [gate shard; up shard]); layer indices are made global with the stage's layer offset. Reads
    ``main_grad`` when present (Megatron DDP), else ``grad``; raises if a parameter has no gradient.
    """
    return _gather_full(model, grads=True)


def gather_full_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """{global name: full parameter} for this rank's PP stage, reassembled like ``gather_full_grads``."""
    return _gather_full(model, grads=False)


def merge_rank_grads(
    per_rank: Sequence[dict[str, torch.Tensor]], *, atol: float = 0.0
) -> dict[str, torch.Tensor]:
    """Union of per-rank ``gather_full_grads`` dicts (PP stages); replicas must agree within ``atol``."""
    merged: dict[str, torch.Tensor] = {}
    for rank, grads in enumerate(per_rank):
        for name, grad in grads.items():
            if name in merged:
                diff = (merged[name] - grad).abs().max().item()
                if diff > atol:
                    raise AssertionError(f"rank {rank} disagrees with a replica on {name}: {diff:.3g}")
            else:
                merged[name] = grad
    return merged
