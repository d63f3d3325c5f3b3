"""Training batches: megatron GPT dataset blends, the step -> sample mapping, and THD packing."""

from __future__ import annotations

import itertools

import torch

from dms_megatron.training.batches import (
    StepSlice,
    _token_count,
    build_gpt_dataset,
    doc_starts,
    pack_thd,
    step_micro_batches,
)
from dms_megatron.training.data import write_token_documents


def _dataset(tmp_path, name: str, low: int, high: int, n_docs: int = 60) -> str:
    gen = torch.Generator().manual_seed(low)
    docs = [
        torch.randint(low, high, (int(n),), generator=gen).tolist() for n in torch.randint(3, 30, (n_docs,))
    ]
    write_token_documents(tmp_path / name, docs, 96, 2, name)
    return str(tmp_path / name)


def test_blend_draws_from_both_datasets_by_weight(tmp_path) -> None:
    a, b = _dataset(tmp_path, "a", 10, 40), _dataset(tmp_path, "b", 50, 90)
    ds = build_gpt_dataset([a, b], [1.0, 3.0], 16, 200, 0, 96, 2, tmp_path / "cache")
    tokens = torch.stack([ds[i]["tokens"] for i in range(200)])
    assert tokens.shape == (200, 16)
    from_a = ((tokens >= 10) & (tokens < 40)).sum().item()
    from_b = ((tokens >= 50) & (tokens < 90)).sum().item()
    assert 2.0 < from_b / from_a < 4.5  # weights 1 : 3
    # a re-made dataset under the same prefix gets a new index cache
    before = {p.name for p in (tmp_path / "cache").iterdir()}
    _dataset(tmp_path, "a", 10, 40, n_docs=61)
    build_gpt_dataset([a, b], [1.0, 3.0], 16, 200, 0, 96, 2, tmp_path / "cache")
    assert len({p.name for p in (tmp_path / "cache").iterdir()} - before) == 1


def test_an_unweighted_blend_repeats_its_datasets_when_one_epoch_is_short(tmp_path) -> None:
    a, b = _dataset(tmp_path, "a", 10, 40), _dataset(tmp_path, "b", 50, 90, n_docs=180)
    one_epoch = len(build_gpt_dataset([a, b], None, 16, 4, 0, 96, 2, tmp_path / "cache"))
    ds = build_gpt_dataset([a, b], None, 16, 3 * one_epoch, 0, 96, 2, tmp_path / "cache")
    assert len(ds) >= 3 * one_epoch
    tokens = torch.stack([ds[i]["tokens"] for i in range(3 * one_epoch)])
    from_a = ((tokens >= 10) & (tokens < 40)).sum().item()
    from_b = ((tokens >= 50) & (tokens < 90)).sum().item()
    assert 2.0 < from_b / from_a < 4.5  # mixed by size: b holds about three times a's tokens


def test_token_count_reads_the_index(tmp_path) -> None:
    info = write_token_documents(tmp_path / "c", [list(range(10, 10 + n)) for n in range(3, 60)], 96, 2, "c")
    assert _token_count(tmp_path / "c") == info.num_tokens == sum(n + 1 for n in range(3, 60))


def test_step_slices_cover_each_global_batch_once() -> None:
    seen = []
    for rank in range(2):
        sl = StepSlice(global_batch_size=8, micro_batch_size=2, dp_rank=rank, dp_size=2)
        assert sl.num_microbatches == 2
        seen += [i for mb in sl.indices(3) for i in mb]
    assert sorted(seen) == list(range(24, 32))


def test_pack_thd_restarts_positions_at_documents(tmp_path) -> None:
    ds = build_gpt_dataset([_dataset(tmp_path, "a", 10, 40)], None, 16, 8, 0, 96, 2, tmp_path / "cache")
    (mb,) = step_micro_batches(ds, StepSlice(2, 2), 0)
    packed = pack_thd(mb, "cpu")
    cu = packed["packed_seq_params"].cu_seqlens_q.tolist()
    starts = doc_starts(mb["position_ids"]).reshape(-1).nonzero().reshape(-1).tolist()
    assert cu == [*starts, 32] and 16 in cu  # every document start and the second sequence's start
    tokens = mb["tokens"].reshape(-1)
    for a, z in itertools.pairwise(cu):
        assert packed["position_ids"][0, a:z].tolist() == list(range(z - a))
        assert (tokens[a : z - 1] != 2).all()  # EOS only ends a document
    assert packed["samples"] == 2 and packed["input_ids"].shape == (1, 32)
