"""The batched (GPU) engine on CPU: its tensor cache equals the per-token reference path and the dense
oracle (logits, held tokens per stream), for both variants, chunked prefill, multi-turn, mixed-length
continuous batching (sampling, stop tokens and bad requests: tests/unit/test_inference_engine.py);
admission by the blocks requests really hold, preemption and KV budgets; the paged decode reference
equals plain attention."""

from __future__ import annotations

import math

import pytest
import torch

from dms_megatron.inference.batch_engine import BatchEngine
from dms_megatron.inference.compressed_cache import CompressedKV, kv_bytes
from dms_megatron.inference.engine import Request
from dms_megatron.inference.model import DMSCausalLM
from dms_megatron.kernels.paged_decode import merge_attention, paged_decode_attention
from tests.unit.test_inference_engine import _greedy_oracle
from tests.unit.test_inference_model import _with_dms, tiny  # noqa: F401  (module fixture)


def _expected_held(decisions, T: int, window: int) -> torch.Tensor:
    """Tokens a stream holds after T tokens: the last window + 1, and older ones not evicted."""
    return torch.tensor(
        [
            [
                sum(1 for p in range(T) if p >= T - 1 - window or not dec[h, p + 1])
                for h in range(dec.shape[0])
            ]
            for dec in decisions
        ]
    )


@pytest.mark.parametrize(
    ("variant", "per", "window"), [("adapter", "head", 4), ("adapter", "layer", 0), ("neuron", "head", 3)]
)
def test_decode_equals_dense_oracle_and_holds_what_decisions_predict(tiny, variant, per, window) -> None:  # noqa: F811
    model = _with_dms(tiny[1], variant, per, window)
    ids = torch.randint(0, 96, (50,), generator=torch.Generator().manual_seed(2))
    dense, decisions = model.forward_dense(ids)
    cache = CompressedKV(model, num_blocks=400, block_size=4)
    row = cache.add_row()
    first = cache.prefill(row, ids[:7])
    torch.testing.assert_close(first, dense[:7], atol=1e-4, rtol=1e-4)
    for t in range(7, len(ids)):
        cache.reserve()
        torch.testing.assert_close(cache.decode(ids[t : t + 1])[0], dense[t], atol=1e-4, rtol=1e-4)
    held = cache.held()[:, row]
    assert torch.equal(held, _expected_held(decisions, len(ids), window))
    assert held.sum() < 0.8 * len(ids) * held.numel()  # memory really shrank
    # pages hold exactly the kept tokens: block capacity used <= held tokens rounded up per stream + 1 block
    assert cache.allocated_blocks() <= int(((held + 3) // 4 + 1).sum())
    cache.remove_rows([row])
    assert cache.allocated_blocks() == 0


@pytest.mark.parametrize("chunk", [1, 3, 8, 64])
def test_chunked_prefill_decode_and_second_turn(tiny, chunk) -> None:  # noqa: F811
    model = _with_dms(tiny[1], "adapter", "head", 4)
    ids = torch.randint(0, 96, (60,), generator=torch.Generator().manual_seed(3))
    dense, decisions = model.forward_dense(ids)
    cache = CompressedKV(model, num_blocks=400, block_size=4)
    row = cache.add_row()
    out = [cache.prefill(row, ids[s : min(s + chunk, 30)]) for s in range(0, 30, chunk)]  # turn 1
    for t in range(30, 40):  # decode
        cache.reserve()
        out.append(cache.decode(ids[t : t + 1]))
    out += [cache.prefill(row, ids[s : min(s + chunk, 60)]) for s in range(40, 60, chunk)]  # turn 2
    torch.testing.assert_close(torch.cat(out), dense, atol=1e-4, rtol=1e-4)
    assert torch.equal(cache.held()[:, row], _expected_held(decisions, 60, 4))


def test_rows_of_different_lengths_decode_together(tiny) -> None:  # noqa: F811
    model = _with_dms(tiny[1], "neuron", "head", 3)
    gen = torch.Generator().manual_seed(4)
    seqs = [torch.randint(0, 96, (n,), generator=gen) for n in (12, 23, 41)]
    cache = CompressedKV(model, num_blocks=600, block_size=4)
    for s in seqs:
        cache.prefill(cache.add_row(), s[:-8])
    for i in range(8):
        cache.reserve()
        logits = cache.decode(torch.stack([s[len(s) - 8 + i] for s in seqs]))
        for r, s in enumerate(seqs):
            dense, _ = model.forward_dense(s[: len(s) - 7 + i])
            torch.testing.assert_close(logits[r], dense[-1], atol=1e-4, rtol=1e-4)
    cache.remove_rows([1])  # the middle row leaves; the others keep their state
    cache.reserve()
    logits = cache.decode(torch.tensor([7, 9]))
    for r, s in enumerate([seqs[0], seqs[2]]):
        dense, _ = model.forward_dense(torch.cat([s, torch.tensor([[7, 9][r]])]))
        torch.testing.assert_close(logits[r], dense[-1], atol=1e-4, rtol=1e-4)


def test_no_dms_block_is_the_dense_model(tiny) -> None:  # noqa: F811
    model = _with_dms(tiny[1], "adapter", "head", 4)
    model.dms = None
    ids = torch.randint(0, 96, (20,), generator=torch.Generator().manual_seed(6))
    dense, _ = model.forward_dense(ids)
    cache = CompressedKV(model, num_blocks=100, block_size=4)
    row = cache.add_row()
    cache.prefill(row, ids[:10])
    for t in range(10, 20):
        cache.reserve()
        torch.testing.assert_close(cache.decode(ids[t : t + 1])[0], dense[t], atol=1e-4, rtol=1e-4)
    assert torch.equal(cache.held()[:, row], torch.full((3, 2), 20))


def test_continuous_batching_matches_the_oracle_and_frees_everything(tiny) -> None:  # noqa: F811
    model = _with_dms(tiny[1], "adapter", "head", 4)
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 96, (n,), generator=gen).tolist() for n in (3, 17, 40, 9, 26)]
    streamed: list[tuple[int, int]] = []
    engine = BatchEngine(
        model, num_blocks=300, block_size=4, max_batch=2, prefill_chunk=8,
        on_token=lambda i, tok, cr: streamed.append((i, tok)),
    )  # fmt: skip
    lengths = [8, 3, 6, 8, 5]
    results = engine.generate([Request(p, max_new_tokens=n) for p, n in zip(prompts, lengths, strict=True)])
    for p, n, r in zip(prompts, lengths, results, strict=True):
        assert r.finish_reason == "length" and r.error is None
        assert r.tokens == _greedy_oracle(model, p, n)
        assert r.metrics["stream_cr_mean"] >= r.metrics["memory_cr"] >= 1.0
        assert r.metrics["peak_kv_tokens"] > 0
    assert sorted(streamed) == sorted((i, t) for i, r in enumerate(results) for t in r.tokens)
    assert engine.cache.allocated_blocks() == 0 and engine.cache.rows == 0
    assert engine.last_batch["decode_tokens"] == sum(lengths) - len(lengths)


def test_paged_decode_reference_and_merge_equal_plain_attention() -> None:
    gen = torch.Generator().manual_seed(0)
    S, g, D, bs, nb = 5, 3, 16, 4, 40
    kp, vp = torch.randn(nb, bs, D, generator=gen), torch.randn(nb, bs, D, generator=gen)
    lengths = torch.tensor([0, 1, 7, 13, 4])
    table = torch.randperm(nb, generator=gen)[: S * 5].view(S, 5).int()
    q = torch.randn(S, g, D, generator=gen)
    out, lse = paged_decode_attention(q, kp, vp, table, lengths, backend="reference")
    ring_k, ring_v = torch.randn(S, 3, D, generator=gen), torch.randn(S, 3, D, generator=gen)
    rs = torch.einsum("sgd,swd->sgw", q, ring_k) / math.sqrt(D)
    merged = merge_attention([(out, lse), (torch.softmax(rs, -1) @ ring_v, torch.logsumexp(rs, -1))])
    for s in range(S):
        n = int(lengths[s])
        slots = torch.arange(n)
        k = torch.cat([kp[table[s, slots // bs].long(), slots % bs], ring_k[s]])
        v = torch.cat([vp[table[s, slots // bs].long(), slots % bs], ring_v[s]])
        ref = torch.softmax(q[s] @ k.t() / math.sqrt(D), -1) @ v
        torch.testing.assert_close(merged[s], ref, atol=1e-5, rtol=1e-5)
    assert torch.isinf(lse[0]).all() and (out[0] == 0).all()
    with pytest.raises(ValueError, match="needs CUDA"):
        paged_decode_attention(q, kp, vp, table, lengths, backend="triton")


def _queue_of_prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(5)
    return [torch.randint(0, 96, (n,), generator=gen).tolist() for n in (40, 36, 44, 30, 38, 42)]


def test_admission_by_compressed_size_preempts_and_keeps_every_token(tiny) -> None:  # noqa: F811
    """A pool too small for all rows: requests queue, the youngest row is preempted when a decode step
    finds no block, and every request still gives the oracle's tokens, streamed once each. The DMS
    model holds fewer blocks per request, so the same pool runs more rows at once than the dense one."""
    prompts = _queue_of_prompts()
    reports = {}
    for name, model in (
        ("dms", _with_dms(tiny[1], "adapter", "head", 4)),
        ("dense", DMSCausalLM.from_pretrained(tiny[1])),
    ):
        streamed: list[tuple[int, int]] = []
        engine = BatchEngine(
            model, num_blocks=120, block_size=4, max_batch=6, prefill_chunk=16,
            on_token=lambda i, tok, cr, streamed=streamed: streamed.append((i, tok)),
        )  # fmt: skip
        results = engine.generate([Request(p, max_new_tokens=12) for p in prompts])
        for p, r in zip(prompts, results, strict=True):
            assert r.finish_reason == "length", r.error
            assert r.tokens == _greedy_oracle(model, p, 12)
            assert r.metrics["queue_s"] >= 0 and r.metrics["kv_blocks"] > 0
        assert sorted(streamed) == sorted((i, t) for i, r in enumerate(results) for t in r.tokens)
        batch = engine.last_batch
        assert batch["peak_pool_blocks_used"] <= batch["pool_blocks"] == 120
        assert batch["preemptions"] == sum(r.metrics["preemptions"] for r in results) >= 1
        assert batch["admissions"] == len(prompts) + batch["preemptions"]
        assert engine.cache.allocated_blocks() == 0 and engine.cache.rows == 0
        reports[name] = (batch, [r.metrics["kv_blocks"] for r in results])
    (dms, dms_blocks), (dense, dense_blocks) = reports["dms"], reports["dense"]
    assert sum(dms_blocks) < sum(dense_blocks)
    assert (
        dms["peak_rows"] > dense["peak_rows"]
        and dms["mean_rows_per_decode_step"] > dense["mean_rows_per_decode_step"]
    )


def test_a_request_that_cannot_fit_alone_fails_and_the_others_run(tiny) -> None:  # noqa: F811
    model = DMSCausalLM.from_pretrained(tiny[1])  # dense: 40+ tokens per stream need more than 60 blocks
    prompts = [*_queue_of_prompts()[:2], [1, 2, 3]]
    results = BatchEngine(model, num_blocks=60, block_size=4, max_batch=4).generate(
        [Request(p, max_new_tokens=12) for p in prompts]
    )
    assert [r.finish_reason for r in results] == ["error", "error", "length"]
    assert "does not fit" in results[0].error
    assert results[2].tokens == _greedy_oracle(model, prompts[2], 12)


def test_kv_budget_pays_the_rings_then_the_pool(tiny) -> None:  # noqa: F811
    model = _with_dms(tiny[1], "adapter", "head", 4)
    block, ring = kv_bytes(model, 4)
    streams, w = 3 * 2, 5
    assert block == 2 * 4 * 16 * 4 and ring == streams * w * (2 * 16 * 4 + 1)  # fp32, head dim 16
    budget = 0.001  # GiB
    engine = BatchEngine(model, block_size=4, max_batch=3, kv_budget_gib=budget)
    assert engine.cache.num_blocks == int((budget * 2**30 - 3 * ring) // block)
    assert engine.kv_budget_bytes <= budget * 2**30
    with pytest.raises(ValueError, match="lower max_batch"):
        BatchEngine(model, block_size=4, max_batch=5000, kv_budget_gib=budget)
    with pytest.raises(ValueError, match="exactly one"):
        BatchEngine(model, num_blocks=10, kv_budget_gib=budget)


@pytest.mark.parametrize(("variant", "window"), [("adapter", 4), ("neuron", 3), (None, 0)])
def test_first_chunk_through_the_fused_attention_equals_the_oracle(tiny, variant, window) -> None:  # noqa: F811
    """A fresh row's first chunk goes through ``kernels.dms_attention`` (hard decisions as an infinite
    bias); it gives the dense oracle's logits at every position, and so does the materialised path that
    a later chunk takes."""
    model = _with_dms(tiny[1], variant or "adapter", "head", window)
    if variant is None:
        model.dms = None  # the dense model: plain causal attention, everything held
    ids = torch.randint(0, 96, (60,), generator=torch.Generator().manual_seed(4))
    dense, decisions = model.forward_dense(ids)
    if variant is not None:
        evicted = torch.stack([d[:, 1:].float().mean() for d in decisions])
        assert 0.05 < float(evicted.mean()) < 0.95, "decisions should be mixed for a meaningful test"
    fresh = CompressedKV(model, num_blocks=400, block_size=4)
    torch.testing.assert_close(fresh.prefill(fresh.add_row(), ids), dense, atol=1e-4, rtol=1e-4)
    chunked = CompressedKV(model, num_blocks=400, block_size=4)
    row = chunked.add_row()
    chunked.prefill(row, ids[:1])  # one token first: the other 59 take the materialised path
    torch.testing.assert_close(chunked.prefill(row, ids[1:]), dense[1:], atol=1e-4, rtol=1e-4)
    assert torch.equal(fresh.held(), chunked.held())


def test_prefill_pages_blocks_in_one_write_and_a_full_pool_raises_without_leaking(tiny) -> None:  # noqa: F811
    from dms_megatron.inference.paged_cache import CacheFullError

    model = _with_dms(tiny[1], "adapter", "head", 2)
    ids = torch.randint(0, 96, (40,), generator=torch.Generator().manual_seed(5))
    cache = CompressedKV(model, num_blocks=300, block_size=4)
    row = cache.add_row()
    last = cache.prefill(row, ids, last_only=True)
    torch.testing.assert_close(last, model.forward_dense(ids)[0][-1:], atol=1e-4, rtol=1e-4)
    table = cache.table[:, row]  # [L, H, max_blocks]
    owned = table[table >= 0]
    assert owned.numel() == cache.allocated_blocks() == len(set(owned.tolist()))  # distinct, none lost
    # each stream owns exactly the blocks up to the one of its next free page slot, and no other
    upto = (cache.paged[:, row] // 4).long()  # [L, H]
    slots = torch.arange(table.shape[-1])
    assert torch.equal(table >= 0, slots <= upto[..., None])
    # a pool too small for the prompt's pages: CacheFullError naming the row, the pool unchanged
    small = CompressedKV(model, num_blocks=model.arch.num_layers * model.hkv + 2, block_size=4)
    row = small.add_row()
    with pytest.raises(CacheFullError) as err:
        small.prefill(row, ids)
    assert err.value.rows == [row]
    assert int((small.table >= 0).sum()) == small.allocated_blocks()  # the failed layer took nothing
    small.remove_rows([row])
    assert small.allocated_blocks() == 0


def test_auto_decode_backend_is_the_fused_step_on_cuda() -> None:
    """``auto``: the fused decode step on CUDA where its kernel takes the head dim, the split Triton path
    otherwise (head dims off the power-of-two grid), the reference on CPU; a named backend is kept."""
    from dms_megatron.inference.compressed_cache import decode_backend

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert decode_backend(cuda, 16, 64) == "fused" and decode_backend(cuda, 16, 128) == "fused"
    assert decode_backend(cuda, 16, 80) in ("triton", "flash_attn")
    assert decode_backend(cpu, 16, 64) == "reference"
    assert decode_backend(cuda, 16, 64, "triton") == "triton"
