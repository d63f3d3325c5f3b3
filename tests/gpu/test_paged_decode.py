"""Triton paged decode kernel == the torch reference (bf16 and fp32, empty / short / long streams, group
sizes 1-8), the fused ring + pages kernel == the unfused path, both bitwise repeatable with their splits
merged in the kernel (eager and CUDA-graph replays), the fused RMSNorm / RoPE == the torch
functions, and the batched engine on CUDA (split and fused kernels) == the same engine's CPU reference
path (greedy tokens)."""

from __future__ import annotations

import pytest
import torch

from dms_megatron.inference.batch_engine import BatchEngine
from dms_megatron.inference.engine import Request
from dms_megatron.kernels.paged_decode import paged_decode_attention
from tests.unit.test_inference_model import _with_dms, tiny  # noqa: F401  (module fixture)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    ("S", "g", "D", "bs"), [(3, 3, 64, 16), (64, 8, 128, 16), (7, 1, 64, 32), (200, 4, 64, 16)]
)
def test_triton_matches_reference(dtype, S, g, D, bs) -> None:
    gen = torch.Generator(device="cuda").manual_seed(S * 10 + g)
    nb = 4096
    kp = torch.randn(nb, bs, D, device="cuda", generator=gen).to(dtype)
    vp = torch.randn(nb, bs, D, device="cuda", generator=gen).to(dtype)
    lengths = torch.randint(0, 3000, (S,), device="cuda", generator=gen)
    lengths[0] = 0
    lengths[-1] = 1
    max_blocks = 3000 // bs + 1
    table = torch.randint(0, nb, (S, max_blocks), device="cuda", generator=gen).int()
    q = torch.randn(S, g, D, device="cuda", generator=gen).to(dtype)
    out, lse = paged_decode_attention(q, kp, vp, table, lengths, backend="triton")
    ref, ref_lse = paged_decode_attention(q, kp, vp, table, lengths, backend="reference")
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4  # fp32 pools: IEEE dot products
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    live = lengths > 0
    torch.testing.assert_close(lse[live], ref_lse[live], atol=tol, rtol=tol)
    assert torch.isinf(lse[~live]).all() and (out[~live] == 0).all()


@pytest.mark.parametrize("backend", ["triton", "fused", "auto"])
def test_engine_on_cuda_equals_cpu_reference(tiny, backend) -> None:  # noqa: F811
    cpu = _with_dms(tiny[1], "adapter", "head", 4)
    gpu = _with_dms(tiny[1], "adapter", "head", 4)
    gpu.w = {k: v.cuda() for k, v in cpu.w.items()}
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 96, (n,), generator=gen).tolist() for n in (3, 17, 40, 90)]
    requests = [Request(p, max_new_tokens=12) for p in prompts]
    a = BatchEngine(cpu, num_blocks=800, block_size=16, max_batch=3).generate(requests)
    engine = BatchEngine(gpu, num_blocks=800, block_size=16, max_batch=3, backend=backend)
    assert engine.cache.fused == (backend in ("fused", "auto"))  # auto: the fused step on CUDA
    b = engine.generate(requests)
    for x, y in zip(a, b, strict=True):
        assert x.error is None and y.error is None
        assert x.tokens == y.tokens
        assert x.metrics["tokens_held"] == y.metrics["tokens_held"]


def test_bf16_first_chunk_prefill_stays_close_to_the_fp32_cpu_reference(tiny) -> None:  # noqa: F811
    """A bf16 model's first prefill chunk runs the Triton attention on bf16 inputs (fp32 accumulation):
    its last-token logits stay within bf16 error of the fp32 CPU reference's, same top token."""
    from dms_megatron.inference.compressed_cache import CompressedKV

    cpu = _with_dms(tiny[1], "adapter", "head", 4)
    gpu = _with_dms(tiny[1], "adapter", "head", 4)
    gpu.w = {k: v.cuda().to(torch.bfloat16) for k, v in cpu.w.items()}
    ids = torch.randint(0, 96, (200,), generator=torch.Generator().manual_seed(7))
    a = CompressedKV(cpu, num_blocks=800, block_size=16)
    b = CompressedKV(gpu, num_blocks=800, block_size=16)
    ref = a.prefill(a.add_row(), ids, last_only=True)[0]
    got = b.prefill(b.add_row(), ids.cuda(), last_only=True)[0].float().cpu()
    cos = torch.nn.functional.cosine_similarity(ref, got, dim=0)
    assert cos > 0.995 and int(ref.argmax()) == int(got.argmax()), (
        float(cos),
        int(ref.argmax()),
        int(got.argmax()),
    )


def test_cuda_graph_steps_equal_eager_steps(tiny) -> None:  # noqa: F811
    from dms_megatron.inference.baseline_cache import BaselineKV
    from dms_megatron.inference.compressed_cache import CompressedKV

    model = _with_dms(tiny[1], "neuron", "head", 3)
    model.w = {k: v.cuda() for k, v in model.w.items()}
    ids = torch.randint(0, 96, (3, 40), generator=torch.Generator().manual_seed(9)).cuda()
    caches = [CompressedKV(model, 600, 16, cuda_graphs=flag) for flag in (False, True)]
    for cache in caches:
        for r in range(3):
            cache.prefill(cache.add_row(), ids[r, :10])
    for t in range(10, 40):
        outs = []
        for cache in caches:
            cache.reserve()
            outs.append(cache.decode(ids[:, t]).clone())
        torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    assert len(caches[1]._graphs) == 1 and torch.equal(caches[0].held(), caches[1].held())
    model.dms = None
    rows = [("streaming_llm", 2.0), ("tova", 3.0), ("h2o", 2.0)]
    base = [BaselineKV(model, rows, max_len=40, min_keep=4, cuda_graphs=flag) for flag in (False, True)]
    for t in range(40):
        a, b = (c.decode(ids[:, t]).clone() for c in base)
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    assert base[1]._graph is not None and torch.equal(base[0].held_mask, base[1].held_mask)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("S", "g", "D", "W"), [(3, 3, 64, 257), (64, 8, 128, 257), (200, 4, 64, 65)])
def test_fused_ring_and_pages_match_the_unfused_path(dtype, S, g, D, W) -> None:
    from dms_megatron.kernels.fused_decode import ring_paged_decode_attention
    from dms_megatron.kernels.paged_decode import merge_attention

    gen = torch.Generator(device="cuda").manual_seed(S + W)
    nb, bs = 4096, 16
    kp, vp = (torch.randn(nb, bs, D, device="cuda", generator=gen).to(dtype) for _ in range(2))
    lengths = torch.randint(0, 3000, (S,), device="cuda", generator=gen)
    lengths[0] = 0
    table = torch.randint(0, nb, (S, 3000 // bs + 1), device="cuda", generator=gen).int()
    rk, rv = (torch.randn(S, W, D, device="cuda", generator=gen).to(dtype) for _ in range(2))
    ring_len = torch.randint(1, W + 1, (S,), device="cuda", generator=gen)
    q = torch.randn(S, g, D, device="cuda", generator=gen).to(dtype)
    got = ring_paged_decode_attention(q, kp, vp, table, lengths, rk, rv, ring_len)
    paged = paged_decode_attention(q, kp, vp, table, lengths, backend="reference")
    scores = torch.einsum("sgd,swd->sgw", q.float(), rk.float()) / D**0.5
    scores = scores.masked_fill(
        ~(torch.arange(W, device="cuda")[None] < ring_len[:, None])[:, None], -torch.inf
    )
    ring = (torch.softmax(scores, -1) @ rv.float(), torch.logsumexp(scores, -1))
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(got, merge_attention([paged, ring]), atol=tol, rtol=tol)


@pytest.mark.parametrize("ring", [True, False])
def test_in_kernel_merge_is_deterministic_under_repetition(ring) -> None:
    """The last program of a stream to arrive merges its splits (one launch): over 200 launches with
    ~90 programs per stream (few streams, long pages) and over 200 CUDA-graph replays, every output is
    bitwise equal to the first launch's and every arrival counter is back to 0 (a lost or reordered
    partial would show as a changed bit or a wrong count)."""
    from dms_megatron.kernels import fused_decode

    gen = torch.Generator(device="cuda").manual_seed(11)
    S, g, D, nb, bs = 3, 5, 128, 4096, 16
    kp, vp = (torch.randn(nb, bs, D, device="cuda", generator=gen).bfloat16() for _ in range(2))
    lengths = torch.tensor([6000, 1, 3333], device="cuda")
    table = torch.randint(0, nb, (S, 6000 // bs + 1), device="cuda", generator=gen).int()
    rk, rv = (torch.randn(S, 257, D, device="cuda", generator=gen).bfloat16() for _ in range(2))
    ring_len = torch.tensor([257, 1, 100], device="cuda")
    q = torch.randn(S, g, D, device="cuda", generator=gen).bfloat16()

    def launch() -> torch.Tensor:
        if ring:
            return fused_decode.ring_paged_decode_attention(q, kp, vp, table, lengths, rk, rv, ring_len)
        return paged_decode_attention(q, kp, vp, table, lengths, backend="triton")[0]

    first = launch().clone()
    assert fused_decode.page_split_count(S, table.shape[1] * bs, q.device) > 32
    assert all(bool(launch().eq(first).all()) for _ in range(200))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = launch()
    for _ in range(200):
        graph.replay()
        assert torch.equal(out, first)
    torch.cuda.synchronize()
    assert all(int(t.abs().sum()) == 0 for t in fused_decode._ARRIVALS[q.device])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_norm_rotary_and_gate_equal_the_model_functions(dtype) -> None:
    """The fused decode path's one-kernel RMSNorm, RoPE and SiLU gate == the inference model's torch
    functions on the GPU: RoPE bit-exact in bf16 (each product rounded as torch rounds it), RMSNorm and
    the gate within one bf16 unit in the last place (another summation order, another exp)."""
    from dms_megatron.inference.model import _rms, _rope_table, _rotate
    from dms_megatron.kernels.fused_elementwise import rms_norm, rotary, silu_mul

    gen = torch.Generator(device="cuda").manual_seed(3)
    x = (torch.randn(64, 576, device="cuda", generator=gen) * 3).to(dtype)
    w = (1 + torch.randn(576, device="cuda", generator=gen) * 0.1).to(dtype)
    err = (rms_norm(x, w, 1e-5).float() - _rms(x, w, 1e-5).float()).abs().max().item()
    assert err <= (3e-2 if dtype == torch.bfloat16 else 1e-5), err
    cos, sin = _rope_table(100000.0, 64, 8192, torch.device("cuda"), dtype)
    pos = torch.randint(0, 8192, (64,), device="cuda", generator=gen)
    q = torch.randn(64, 9, 64, device="cuda", generator=gen).to(dtype)
    k = torch.randn(64, 3, 64, device="cuda", generator=gen).to(dtype)
    gq, gk = rotary(q, k, cos[pos], sin[pos])
    want_q, want_k = _rotate(q, cos[pos], sin[pos]), _rotate(k, cos[pos], sin[pos])
    if dtype == torch.bfloat16:
        assert torch.equal(gq, want_q) and torch.equal(gk, want_k)
    else:
        torch.testing.assert_close(gq, want_q, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(gk, want_k, atol=1e-6, rtol=1e-6)
    gate = (torch.randn(64, 1536, device="cuda", generator=gen) * 4).to(dtype)
    up = torch.randn(64, 1536, device="cuda", generator=gen).to(dtype)
    want = torch.nn.functional.silu(gate) * up
    tol = 2**-7 if dtype == torch.bfloat16 else 1e-5  # one bf16 ulp of the product's scale
    assert ((silu_mul(gate, up).float() - want.float()).abs() / want.float().abs().clamp(min=1)).max() <= tol
