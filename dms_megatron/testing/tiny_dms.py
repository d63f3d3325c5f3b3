"""The tiny GPT with DMS at any TP / PP / SP layout, run through megatron's schedule with loss = vocab-
parallel KD against fixed teacher logits + the exact global compression loss: the shared body of the
plugin's parity tests (``tests/megatron/dms_jobs.py``) and ``benchmarks/train_parity.py`` (GPUs).
Runs inside a rank with a process group (``tests/megatron/runner.py`` on CPU, torchrun on GPUs).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from megatron.core import parallel_state

from dms_megatron.config import DMSConfig
from dms_megatron.megatron import adjust_p2p_shapes, dms_compression_loss
from dms_megatron.megatron.kd import vocab_parallel_kd_loss
from dms_megatron.testing import tiny_gpt

TARGET_FRACTION = 0.6  # the compression loss's target fraction of evicted decisions


def dms_test_config(**overrides: Any) -> DMSConfig:
    """Logit scale/offset/tau chosen so the tiny random model makes mixed, non-saturated decisions."""
    base: dict[str, Any] = {
        "variant": "adapter",
        "window": 3,
        "logit_scale": 1.0,
        "logit_offset": 0.0,
        "tau": 1.0,
        "attention_backend": "reference",
        "target_cr": 4.0,
        "cr_ramp_steps": 10,
    }
    base.update(overrides)
    return DMSConfig(**base)


def teacher_logits(micro_batch: int, seed: int = 99) -> torch.Tensor:
    """Fixed full-vocabulary teacher logits ``[b, s, V]`` for a micro-batch."""
    gen = torch.Generator().manual_seed(seed * 1000 + micro_batch)
    return torch.randn(tiny_gpt.MICRO_BATCH, tiny_gpt.SEQ_LEN, tiny_gpt.VOCAB, generator=gen) * 2


def _vocab_shard(full: torch.Tensor) -> torch.Tensor:
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    n = full.shape[-1] // tp
    return full[..., rank * n : (rank + 1) * n]


def _loss_func(model, mb: int, batch, num_kv_heads: int, output: torch.Tensor):
    teacher = _vocab_shard(teacher_logits(mb)).to(output.device)
    kd = vocab_parallel_kd_loss(output, teacher, mask=batch["loss_mask"].bool())
    valid = torch.ones_like(batch["loss_mask"], dtype=torch.bool)
    cmp = dms_compression_loss(model, valid, TARGET_FRACTION, tiny_gpt.NUM_LAYERS, num_kv_heads)
    loss = kd + cmp
    return loss, {"kd": kd.detach().clone(), "cmp": cmp.detach().clone(), "loss": loss.detach().clone()}


def run_dms_schedule(model, batches, state, num_kv_heads: int) -> list[dict[str, float]]:
    counter = iter(range(len(batches)))

    def forward_step(data_iterator, model_chunk):
        batch = next(data_iterator)
        mb = next(counter)
        state.micro_batch = mb
        out = model_chunk(input_ids=batch["tokens"], position_ids=batch["position_ids"], attention_mask=None)
        return out, partial(_loss_func, model_chunk, mb, batch, num_kv_heads)

    pp = parallel_state.get_pipeline_model_parallel_world_size()
    out = tiny_gpt.run_schedule(model, forward_step, batches, adjust_p2p_shapes if pp > 1 else None)
    tiny_gpt.allreduce_tp_replicated_grads(model)
    return (
        [{k: float(v) for k, v in d.items()} for d in out] if parallel_state.is_pipeline_last_stage() else []
    )
