"""Rank-side jobs for DistillationStage: student (DMS) + teacher in one megatron schedule."""

from __future__ import annotations

from typing import Any

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel

from dms_megatron.megatron import apply_dms, attach_dms_pipeline, dms_compression_loss
from dms_megatron.megatron.distill import DistillationStage, adjust_distill_p2p_shapes
from dms_megatron.megatron.families import decoder_block_spec, local_layer_spec
from dms_megatron.megatron.kd import vocab_parallel_kd_loss
from dms_megatron.megatron.teacher_graph import TeacherGraph
from dms_megatron.testing import tiny_gpt
from dms_megatron.testing.graph_stand_in import random_documents, rerun_capture
from dms_megatron.testing.tiny_dms import TARGET_FRACTION, dms_test_config


def _gpt(config, spec) -> GPTModel:
    model = GPTModel(
        config=config,
        transformer_layer_spec=decoder_block_spec(config, spec),
        vocab_size=tiny_gpt.VOCAB,
        max_sequence_length=64,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
    )
    tiny_gpt.load_master_weights(model, 7)
    return model


def distill_job(
    rank: int,
    world: int,
    tp: int,
    pp: int,
    sp: bool,
    teacher: str,
    dms_kwargs: dict[str, Any],
    teacher_graph: bool = False,
) -> dict:
    tiny_gpt.init_parallel(tp, pp, seed=7)
    config = tiny_gpt.tiny_gpt_config(tp, pp, sequence_parallel=sp)
    spec = local_layer_spec()
    student = _gpt(config, apply_dms(spec, dms_test_config(**dms_kwargs)))
    state = attach_dms_pipeline(student)
    stage = DistillationStage(
        student,
        _gpt(config, spec) if teacher == "separate" else None,
        teacher_graph=teacher_graph,
        graph_capture=rerun_capture if teacher_graph else None,  # the CPU stand-in for the CUDA capture
    )
    batches = tiny_gpt.make_batches(2)
    counter = iter(range(2))

    def loss_func(batch, output):
        kd = vocab_parallel_kd_loss(output, stage.teacher_logits, mask=batch["loss_mask"].bool())
        valid = torch.ones_like(batch["loss_mask"], dtype=torch.bool)
        cmp = dms_compression_loss(stage.student, valid, TARGET_FRACTION, tiny_gpt.NUM_LAYERS, 2)
        return kd + cmp, {"kd": kd.detach().clone(), "cmp": cmp.detach().clone()}

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        state.micro_batch = next(counter)
        out = model(input_ids=batch["tokens"], position_ids=batch["position_ids"], attention_mask=None)
        return out, lambda output: loss_func(batch, output)

    out = tiny_gpt.run_schedule(stage, forward_step, batches, adjust_distill_p2p_shapes if pp > 1 else None)
    tiny_gpt.allreduce_tp_replicated_grads(stage.student)
    teacher_grads = [] if stage.teacher is None else [p.grad for p in stage.teacher.parameters()]
    return {
        "graph_replays": stage._graph.replays if stage._graph is not None else 0,
        "losses": [{k: float(v) for k, v in d.items()} for d in out] if out else [],
        # teacher mode: the adapter is unused, so it has no gradient to gather
        "grads": {} if dms_kwargs.get("teacher_mode") else tiny_gpt.gather_full_grads(stage.student),
        "teacher_grads_none": all(g is None for g in teacher_grads),
        "trainable": sorted(n for n, p in stage.named_parameters() if p.requires_grad),
    }


def teacher_graph_job(rank: int, world: int) -> dict:
    """The separate teacher (DMS layers in teacher mode) through TeacherGraph's static buffers (padded
    cu_seqlens, pinned max lengths, per-token ids refilled) vs its own forward, micro-batch by micro-batch."""
    import copy

    from dms_megatron.training.batches import pack_thd
    from dms_megatron.training.setup import teacher_dms_config

    tiny_gpt.init_parallel(1, 1, seed=7)
    config = tiny_gpt.tiny_gpt_config(1, 1)
    teacher = _gpt(config, apply_dms(local_layer_spec(), teacher_dms_config(dms_test_config())))
    teacher.requires_grad_(False)
    teacher.eval()
    graph = TeacherGraph(teacher, capture=rerun_capture)
    diffs, docs = [], []
    for seed in range(4):
        p = pack_thd(
            random_documents(seed, tiny_gpt.MICRO_BATCH, tiny_gpt.SEQ_LEN, tiny_gpt.VOCAB, start_prob=0.25),
            "cpu",
        )
        kwargs = {
            "input_ids": p["input_ids"],
            "position_ids": p["position_ids"],
            "attention_mask": None,
            "packed_seq_params": p["packed_seq_params"],
        }
        with torch.no_grad():
            want = teacher(**copy.deepcopy(kwargs))
        got = graph(None, **kwargs)
        diffs.append(float((got - want).abs().max()))
        docs.append(p["packed_seq_params"].cu_seqlens_q.numel() - 1)
    return {"diffs": diffs, "docs": docs, "graphs": len(graph._graphs), "replays": graph.replays}
