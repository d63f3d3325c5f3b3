"""The frozen teacher's forward as a CUDA graph (``megatron/teacher_graph.py``) on a GPU: every replay
equals the teacher's own forward on micro-batches of different document layouts (the per-micro-batch
state the graph must recompute: document bounds, per-token rotary tables), in a handful of launches."""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch

TOKENS = 512  # per micro-batch: 2 rows of 256
VOCAB = 512


def _init_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=0, world_size=1)


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def teacher(request):
    from megatron.core.models.gpt import GPTModel

    from dms_megatron.megatron import apply_dms
    from dms_megatron.megatron.families import decoder_block_spec, local_layer_spec
    from dms_megatron.testing import tiny_gpt
    from dms_megatron.testing.tiny_dms import dms_test_config
    from dms_megatron.training.setup import teacher_dms_config

    _init_process_group()
    tiny_gpt.init_parallel(1, 1, seed=7)
    # head dim 64 (the Triton kernel's), 2 query heads per KV head
    config = tiny_gpt.tiny_gpt_config(
        1, 1, hidden_size=256, ffn_hidden_size=512, num_attention_heads=4, num_query_groups=2
    )
    dms = teacher_dms_config(dms_test_config(attention_backend="triton", window=32))
    model = GPTModel(
        config=config,
        transformer_layer_spec=decoder_block_spec(config, apply_dms(local_layer_spec(), dms)),
        vocab_size=VOCAB,
        max_sequence_length=TOKENS,
        pre_process=True,
        post_process=True,
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
    )
    model.requires_grad_(False)
    return model.to(device="cuda", dtype=request.param).eval()


def _micro_batch(seed: int) -> dict:
    from dms_megatron.testing.graph_stand_in import random_documents
    from dms_megatron.training.batches import pack_thd

    # 2 rows of 256; 2..10% of the positions start a document
    p = pack_thd(random_documents(seed, 2, TOKENS // 2, VOCAB, start_prob=0.02 * (seed + 1)), "cuda")
    return {
        "input_ids": p["input_ids"],
        "position_ids": p["position_ids"],
        "attention_mask": None,
        "packed_seq_params": p["packed_seq_params"],
    }


def test_replays_equal_the_teachers_own_forward(teacher):
    from dms_megatron.megatron.teacher_graph import TeacherGraph

    graph = TeacherGraph(teacher)
    docs = []
    for seed in range(5):
        kwargs = _micro_batch(seed)
        docs.append(kwargs["packed_seq_params"].cu_seqlens_q.numel() - 1)
        with torch.no_grad():
            want = teacher(**copy.deepcopy(kwargs))
        got = graph(None, **kwargs)
        diff = (got.float() - want.float()).abs().max().item()
        print(f"micro-batch {seed}: {docs[-1]} documents, max |graph - eager| = {diff:.3g}")
        assert torch.equal(got, want), diff
    assert len(set(docs)) > 1 and len(graph._graphs) == 1 and graph.replays == 5


def _launches(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = (
        "cudaLaunchKernel",
        "cuLaunchKernel",
        "cuLaunchKernelEx",
        "cudaLaunchKernelExC",
        "cudaGraphLaunch",
    )
    return sum(e.count for e in prof.key_averages() if e.key in names)


def test_a_replay_is_a_handful_of_launches(teacher):
    from dms_megatron.megatron.teacher_graph import TeacherGraph

    graph = TeacherGraph(teacher)
    kwargs = _micro_batch(0)
    graph(None, **kwargs)  # captures
    with torch.no_grad():
        eager = _launches(lambda: teacher(**copy.deepcopy(kwargs)))
    replay = _launches(lambda: graph(None, **_micro_batch(1)))
    print(f"launches per teacher forward: eager {eager}, graph replay {replay}")
    assert replay <= 12 and eager > 10 * replay
