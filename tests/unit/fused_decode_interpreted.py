"""Runs the fused ring + pages decode kernel (``kernels.fused_decode``) under the Triton interpreter on
CPU and prints, as JSON, its largest error against the unfused reference composition (paged reference,
torch attention over the ring, ``merge_attention``) for seeded cases, and the errors of the one-kernel
RMSNorm / RoPE (``kernels.fused_elementwise``) against the model's torch functions; started by
``test_fused_decode.py`` in a fresh interpreter."""

from __future__ import annotations

import json
import math
import random
import sys

import interpreter_setup  # noqa: F401  (TRITON_INTERPRET=1 before any kernel exists)
import torch

from dms_megatron.kernels import fused_decode
from dms_megatron.kernels.fused_decode import page_split_count, ring_paged_decode_attention
from dms_megatron.kernels.paged_decode import merge_attention, paged_decode_attention, paged_decode_reference


def reference(q, k_pool, v_pool, table, lengths, ring_k, ring_v, ring_lengths) -> torch.Tensor:
    scale = 1.0 / math.sqrt(q.shape[-1])
    paged = paged_decode_reference(q, k_pool, v_pool, table, lengths, scale)
    W = ring_k.shape[1]
    scores = torch.einsum("sgd,swd->sgw", q.float(), ring_k.float()) * scale
    valid = torch.arange(W)[None] < ring_lengths[:, None]
    scores = scores.masked_fill(~valid[:, None], -math.inf)
    lse = torch.logsumexp(scores, -1)
    ring = (torch.softmax(scores, -1).nan_to_num(0.0) @ ring_v.float(), lse)
    return merge_attention([paged, ring])


def case(seed: int, dtype: torch.dtype) -> dict:
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    S, G = rng.randint(1, 5), rng.choice([1, 3, 5])
    D, DV = rng.choice([16, 32]), rng.choice([16, 32])
    bs, W = rng.choice([4, 16]), rng.choice([1, 5, 17, 70])
    lengths = torch.tensor([rng.choice([0, rng.randint(1, 300)]) for _ in range(S)])
    ring_lengths = torch.tensor([rng.randint(1, W) for _ in range(S)])
    per_stream = math.ceil(int(lengths.max()) / bs) + 1
    blocks = torch.randperm(S * per_stream, generator=gen).int().view(S, per_stream)
    k_pool = torch.randn(S * per_stream, bs, D, generator=gen).to(dtype)
    v_pool = torch.randn(S * per_stream, bs, DV, generator=gen).to(dtype)
    ring_k = torch.randn(S, W, D, generator=gen).to(dtype)
    ring_v = torch.randn(S, W, DV, generator=gen).to(dtype)
    q = torch.randn(S, G, D, generator=gen).to(dtype)
    args = (q, k_pool, v_pool, blocks, lengths, ring_k, ring_v, ring_lengths)
    got = ring_paged_decode_attention(*args)
    want = reference(*args)
    # the output rounded as it is stored (the engine's model dtype) == the fp32 output rounded by torch
    rounded = ring_paged_decode_attention(*args, out_dtype=torch.float16)
    rounded_equal = rounded.dtype == torch.float16 and torch.equal(rounded, got.to(torch.float16))
    # the split path (paged_decode's triton backend: the same kernel without the ring) vs its reference
    scale = 1.0 / math.sqrt(D)
    split = paged_decode_attention(q, k_pool, v_pool, blocks, lengths, scale, backend="triton")
    split_ref = paged_decode_reference(q, k_pool, v_pool, blocks, lengths, scale)
    live = lengths > 0
    split_err = max(
        float((split[0] - split_ref[0]).abs().max()),
        float((split[1][live] - split_ref[1][live]).abs().max()) if bool(live.any()) else 0.0,
    )
    return {
        "S": S, "G": G, "D": D, "DV": DV, "block_size": bs, "W": W,
        "page_splits": page_split_count(S, blocks.shape[1] * bs, q.device),
        "counters_zero_after": counters_zero(),
        "lengths": lengths.tolist(), "ring_lengths": ring_lengths.tolist(),
        "max_abs_error": float((got - want).abs().max()),
        "fp16_output_equals_rounded_fp32": rounded_equal,
        "split_path_max_abs_error": split_err,
        "split_path_empty_ok": bool(torch.isinf(split[1][~live]).all() and (split[0][~live] == 0).all()),
    }  # fmt: skip


def counters_zero() -> bool:
    """Whether every arrival counter the kernel has used is back to 0 (ready for the next launch)."""
    return all(int(t.abs().sum()) == 0 for t in fused_decode._ARRIVALS.get(torch.device("cpu"), []))


def single_split_case(seed: int) -> dict:
    """Enough streams for one program each (no ring): the program writes output and log-sum-exp itself."""
    gen = torch.Generator().manual_seed(seed)
    S, G, D, bs = 9, 3, 16, 4
    lengths = torch.randint(0, 40, (S,), generator=gen)
    lengths[0] = 0
    blocks = torch.randperm(S * 10, generator=gen).int().view(S, 10)
    k_pool, v_pool = torch.randn(S * 10, bs, D, generator=gen), torch.randn(S * 10, bs, D, generator=gen)
    q = torch.randn(S, G, D, generator=gen)
    out, lse = paged_decode_attention(q, k_pool, v_pool, blocks, lengths, 0.25, backend="triton")
    want, want_lse = paged_decode_reference(q, k_pool, v_pool, blocks, lengths, 0.25)
    live = lengths > 0
    return {
        "page_splits": page_split_count(S, 40, q.device),
        "max_abs_error": float((out - want).abs().max()),
        "lse_max_abs_error": float((lse[live] - want_lse[live]).abs().max()),
        "empty_ok": bool(torch.isinf(lse[~live]).all() and (out[~live] == 0).all()),
    }


def tiny_dms_llama(window: int):
    """A tiny adapter-variant DMS Llama (3 layers, 4 query / 2 KV heads, head dim 16)."""
    import tempfile
    from pathlib import Path

    import transformers as tf

    from tests.unit.test_inference_model import _with_dms

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, initializer_range=0.1,
    )  # fmt: skip
    folder = Path(tempfile.mkdtemp())
    tf.LlamaForCausalLM(cfg).save_pretrained(folder)
    return _with_dms(folder, "adapter", "head", window)


def commit_cases(model, seeds: range) -> list[dict]:
    """The decode commit kernel (``kernels.ring_commit``) against ``CompressedKV``'s torch path on random
    cache states (positions before, at and past the ring size, random flags, page counts and pools, with
    and without decisions): every state tensor must come out bit-identical."""
    from dms_megatron.inference.compressed_cache import CompressedKV
    from dms_megatron.kernels.ring_commit import commit_decode_token

    names = ("ring_k", "ring_v", "ring_flag", "table", "paged", "k_pool", "v_pool")
    rows = []
    for seed in seeds:
        rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
        cache = CompressedKV(model, num_blocks=96, block_size=4)
        R = rng.randint(1, 4)
        for _ in range(R):
            cache.add_row()
        W, H, D = cache.W, cache.H, cache.D
        seen = [rng.choice([0, 1, W - 1, W, W + rng.randint(1, 40)]) for _ in range(R)]
        cache.seen.copy_(torch.tensor(seen))
        cache.ring_k.copy_(torch.randn(cache.ring_k.shape, generator=gen))
        cache.ring_v.copy_(torch.randn(cache.ring_v.shape, generator=gen))
        cache.ring_flag.copy_(torch.rand(cache.ring_flag.shape, generator=gen) < 0.5)
        cache.paged.copy_(torch.randint(0, 13, cache.paged.shape, generator=gen, dtype=torch.int32))
        cache.reserve()  # a block for every stream's next page slot, as the engine does before a step
        cache.k_pool.copy_(torch.randn(cache.k_pool.shape, generator=gen))
        cache.v_pool.copy_(torch.randn(cache.v_pool.shape, generator=gen))
        layer = rng.randrange(cache.L)
        kv = torch.randn(R, H, 2 * D, generator=gen)  # k and v as strided views, as a merged GEMM gives
        k, v = kv[..., :D], kv[..., D:]
        logits = None if seed % 3 == 0 else torch.randn(R, H, generator=gen)
        before = {n: getattr(cache, n).clone() for n in names}
        cache._commit(layer, k, v, logits, *cache._moves())
        want = {n: getattr(cache, n).clone() for n in names}
        for n in names:
            getattr(cache, n).copy_(before[n])
        commit_decode_token(
            k, v, logits, cache.seen, cache.ring_k[layer], cache.ring_v[layer], cache.ring_flag[layer],
            cache.table[layer], cache.paged[layer], cache.k_pool, cache.v_pool,
        )  # fmt: skip
        rows.append({
            "seed": seed, "W": W, "rows": R, "logits": logits is not None, "seen": cache.seen.tolist(),
            "changed": sorted(n for n in names if not torch.equal(before[n], want[n])),
            "mismatch": sorted(n for n in names if not torch.equal(getattr(cache, n), want[n])),
        })  # fmt: skip
    return rows


def engine_case(model) -> dict:
    """The batch engine with the fused kernels against the same engine with the reference backend: a tiny
    adapter-variant Llama (window 4), two prompts decoded together."""
    from dms_megatron.inference.batch_engine import BatchEngine
    from dms_megatron.inference.compressed_cache import CompressedKV
    from dms_megatron.inference.engine import Request

    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 96, (n,), generator=gen).tolist() for n in (6, 17)]
    tokens = {}
    for backend in ("reference", "fused"):
        engine = BatchEngine(
            model, num_blocks=200, block_size=4, max_batch=3, prefill_chunk=8, backend=backend
        )
        tokens[backend] = [
            r.tokens for r in engine.generate([Request(p, max_new_tokens=10) for p in prompts])
        ]
    logits = {}
    for backend in ("reference", "fused"):  # the same rows decoded step by step: logits of every step
        cache = CompressedKV(model, 200, 4, backend=backend)
        rows = [cache.add_row() for _ in prompts]
        for row, p in zip(rows, prompts, strict=True):
            cache.prefill(row, torch.tensor(p))
        step = torch.tensor([p[-1] for p in prompts])
        out = []
        for _ in range(5):
            cache.reserve()
            lg = cache.decode(step)
            out.append(lg.clone())
            step = lg.argmax(-1)
        logits[backend] = torch.stack(out)
    return {
        "same_tokens": tokens["reference"] == tokens["fused"],
        "max_logit_error": float((logits["reference"] - logits["fused"]).abs().max()),
    }


def elementwise_case(dtype: torch.dtype, weight_dtype: torch.dtype) -> dict:
    """The one-kernel RMSNorm, RoPE and SiLU gate (``kernels.fused_elementwise``) against the torch
    compositions of the inference model: hidden sizes on and off a power of two, a 3-D input (the q/k
    norms of Qwen3)."""
    from dms_megatron.inference.model import _rms, _rope_table, _rotate
    from dms_megatron.kernels.fused_elementwise import rms_norm, rotary, silu_mul

    gen = torch.Generator().manual_seed(11)
    errs = {}
    for shape in [(5, 576), (3, 64), (4, 3, 16)]:
        x = (torch.randn(*shape, generator=gen) * 3).to(dtype)
        w = (1 + torch.randn(shape[-1], generator=gen) * 0.1).to(weight_dtype)
        got, want = rms_norm(x, w, 1e-5), _rms(x, w, 1e-5)
        assert got.dtype == want.dtype and got.shape == want.shape
        errs[f"rms_norm {shape}"] = float((got.double() - want.double()).abs().max())
    cos, sin = _rope_table(10000.0, 64, 128, torch.device("cpu"), dtype)
    pos = torch.tensor([0, 5, 127])
    q = torch.randn(3, 6, 64, generator=gen).to(dtype)
    k = torch.randn(3, 2, 64, generator=gen).to(dtype)
    gq, gk = rotary(q, k, cos[pos], sin[pos])
    errs["rotary q"] = float((gq.double() - _rotate(q, cos[pos], sin[pos]).double()).abs().max())
    errs["rotary k"] = float((gk.double() - _rotate(k, cos[pos], sin[pos]).double()).abs().max())
    gate = (torch.randn(7, 300, generator=gen) * 4).to(dtype)
    up = torch.randn(7, 300, generator=gen).to(dtype)
    got = silu_mul(gate, up)
    errs["silu_mul"] = float((got.double() - (torch.nn.functional.silu(gate) * up).double()).abs().max())
    return errs


def main() -> None:
    n = int(sys.argv[1])
    report = {
        "fp32": [case(i, torch.float32) for i in range(n)],
        "fp16": [case(100 + i, torch.float16) for i in range(2)],
    }
    # a stream with no pages and an empty ring: zeros (the engine never has one: the ring holds the new token)
    none = torch.zeros(1, dtype=torch.long)
    pool, ring = torch.zeros(1, 4, 16), torch.zeros(1, 3, 16)
    table = torch.zeros(1, 1, dtype=torch.int32)
    z = ring_paged_decode_attention(torch.randn(1, 2, 16), pool, pool, table, none, ring, ring, none)
    report["empty_stream_is_zero"] = bool((z == 0).all())
    report["single_split"] = single_split_case(7)
    model = tiny_dms_llama(4)
    report["engine"] = engine_case(model)
    report["commit"] = commit_cases(model, range(6)) + commit_cases(tiny_dms_llama(0), range(6, 10))
    report["elementwise"] = {
        "fp32": elementwise_case(torch.float32, torch.float32),
        "fp16": elementwise_case(torch.float16, torch.float16),
        "fp16 x, fp32 weight": elementwise_case(torch.float16, torch.float32),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
