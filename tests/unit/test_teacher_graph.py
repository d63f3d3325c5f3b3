"""TeacherGraph's bookkeeping on the CPU, with a stand-in capture (a replay re-runs the forward on the
static buffers and writes into the captured output): static inputs refilled per micro-batch, the packed
sequence's cu_seqlens padded and max lengths pinned, one graph per signature, eager past the limit.
The CUDA capture itself is tested in tests/gpu/test_teacher_graph.py."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from megatron.core.packed_seq_params import PackedSeqParams

from dms_megatron.megatron.teacher_graph import TeacherGraph
from dms_megatron.testing.graph_stand_in import random_documents
from dms_megatron.testing.graph_stand_in import rerun_capture as stand_in_capture
from dms_megatron.training.batches import pack_thd


class Toy(torch.nn.Module):
    """Reads everything a teacher stage may read; records what it was called with."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(50, 4)
        self.calls: list[PackedSeqParams] = []
        self.stage_input: torch.Tensor | None = None

    def set_input_tensor(self, x: torch.Tensor) -> None:
        self.stage_input = x

    def forward(self, input_ids, position_ids, attention_mask, packed_seq_params):
        p = packed_seq_params
        self.calls.append(p)
        # a cache a real stage keeps on the packed sequence (the rotary tables): must not outlive a call
        p._dms_token_freqs = getattr(p, "_dms_token_freqs", 0) + 1
        out = self.emb(input_ids) + position_ids.unsqueeze(-1) + p._dms_doc_ids.unsqueeze(-1)
        out = out + p._dms_positions.unsqueeze(-1) * 0.5 + p._dms_token_freqs
        if self.stage_input is not None:
            out = out + self.stage_input
        return out


def micro_batch(seed: int, b: int = 2, s: int = 12) -> dict:
    return pack_thd(random_documents(seed, b, s, vocab=50, start_prob=0.3), "cpu")


def call(graph_or_model, p: dict, stage_input=None):
    kwargs = {
        "input_ids": p["input_ids"],
        "position_ids": p["position_ids"],
        "attention_mask": None,
        "packed_seq_params": p["packed_seq_params"],
    }
    if isinstance(graph_or_model, TeacherGraph):
        return graph_or_model(stage_input, **kwargs)
    if stage_input is not None:
        graph_or_model.set_input_tensor(stage_input)
    return graph_or_model(**kwargs)


def eager(model: Toy, p: dict, stage_input=None) -> torch.Tensor:
    """The model's own forward on a copy of the micro-batch (the graph's call must see it untouched)."""
    saved = model.stage_input
    try:
        with torch.no_grad():
            return call(model, copy.deepcopy(p), stage_input)
    finally:
        model.stage_input = saved


def test_replays_equal_eager_over_micro_batches_of_different_documents():
    model = Toy()
    graph = TeacherGraph(model, capture=stand_in_capture)
    batches = [micro_batch(seed) for seed in range(5)]
    docs = {b["packed_seq_params"].cu_seqlens_q.numel() for b in batches}
    assert len(docs) > 1, "the micro-batches should hold different numbers of documents"
    outs = []
    for b in batches:
        want = eager(model, b)
        got = call(graph, b)
        assert torch.equal(got, want)
        outs.append(got)
    assert len(graph._graphs) == 1 and graph.replays == 5
    assert all(not o.requires_grad for o in outs)
    assert outs[0].data_ptr() != outs[1].data_ptr(), "each replay's output is a fresh copy"


def test_the_static_packed_sequence_is_padded_and_pinned():
    graph = TeacherGraph(Toy(), capture=stand_in_capture)
    b = micro_batch(3)
    call(graph, b)
    (entry,) = graph._graphs.values()
    static = entry.kwargs["packed_seq_params"]
    cu, tokens = b["packed_seq_params"].cu_seqlens_q, b["input_ids"].shape[-1]
    assert static.cu_seqlens_q is static.cu_seqlens_kv, "one buffer for the shared cu_seqlens"
    assert static.cu_seqlens_q.shape == (tokens + 1,)
    assert torch.equal(static.cu_seqlens_q[: cu.numel()], cu)
    assert bool((static.cu_seqlens_q[cu.numel() :] == tokens).all())
    assert static.max_seqlen_q == static.max_seqlen_kv == tokens
    assert static is not b["packed_seq_params"] and static.cu_seqlens_q is not cu
    # the incoming object is left as it was (the student reads it next)
    assert b["packed_seq_params"].max_seqlen_q < tokens and not hasattr(
        b["packed_seq_params"], "_dms_token_freqs"
    )


def test_a_new_shape_is_a_new_graph_and_past_the_limit_the_forward_runs_eagerly(caplog):
    model = Toy()
    graph = TeacherGraph(model, max_graphs=2, capture=stand_in_capture)
    for s in (12, 16, 12, 16):
        b = micro_batch(1, s=s)
        assert torch.equal(call(graph, b), eager(model, b))
    assert len(graph._graphs) == 2 and graph.replays == 4
    with caplog.at_level(logging.WARNING):
        for seed in range(2):
            b = micro_batch(seed, s=20)
            want = eager(model, b)
            assert torch.equal(call(graph, b), want)
    assert len(graph._graphs) == 2 and graph.replays == 4
    assert sum("more than 2 input signatures" in r.message for r in caplog.records) == 1, "logged once"


def test_an_argument_it_cannot_hold_runs_eagerly(caplog):
    model = Toy()
    graph = TeacherGraph(model, capture=stand_in_capture)
    b = micro_batch(4)
    del b["packed_seq_params"]._dms_positions
    with caplog.at_level(logging.WARNING), pytest.raises(AttributeError):  # the eager call ran: the toy
        call(graph, b)  # needs the positions
    assert not graph._graphs and "per-token document ids and positions" in caplog.text


def test_a_later_pipeline_stage_replays_on_a_static_input():
    model = Toy()
    graph = TeacherGraph(model, capture=stand_in_capture)
    for seed in range(3):
        b = micro_batch(seed)
        x = torch.randn(b["input_ids"].shape[-1], 4)
        want = eager(model, b, stage_input=x)
        got = call(graph, b, stage_input=x)
        assert torch.equal(got, want)
    (entry,) = graph._graphs.values()
    assert model.stage_input is entry.stage_input, "the model reads the static stage input"


def test_a_failed_capture_names_the_switch():
    def broken(fn, pool):
        raise RuntimeError("operation not permitted when stream is capturing")

    graph = TeacherGraph(Toy(), capture=broken)
    with pytest.raises(RuntimeError, match=r"train\.teacher_cuda_graph=false"):
        call(graph, micro_batch(0))
