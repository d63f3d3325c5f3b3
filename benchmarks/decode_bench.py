"""Decode throughput and KV-cache size of the batched engine: DMS vs the same weights with eviction off
(dense), same engine, same process, at a given context and batch size.

    python benchmarks/decode_bench.py --model runs/cr8/export --context 8192 --batch 1 32 --out bench.json
    python benchmarks/decode_bench.py --random-smollm2 --context 4096 --batch 1 8   # no checkpoint: a probe

For each (mode, batch): ``batch`` prompts of ``context - new_tokens`` tokens (consecutive windows of
``--text``, or random ids) are prefilled, then ``new_tokens`` tokens are decoded greedily for all rows
together. Reported: the engine's decode tokens/s over the whole generation (includes the first step at
a batch size, which runs eagerly, and the CUDA-graph capture of the second), the steady-state decode
step (median over the steps after those two, each step as the engine runs it: reserve, decode, tokens
to the host), prefill tokens/s, peak KV bytes held (tokens held x K+V x head dim x bytes, over all
layers and KV heads) and the bytes the engine had allocated (pool blocks in use + window rings),
memory CR, and the decode attention kernel alone (one layer's streams at the final lengths; with
``--backend fused`` the ring too; CUDA events, median of 50, launched eagerly).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def random_smollm2(device: str):
    import torch

    from dms_megatron.families import ModelArch
    from dms_megatron.inference.model import DMSCausalLM

    arch = ModelArch(
        family="llama", architecture="LlamaForCausalLM", num_layers=30, hidden_size=576,
        ffn_hidden_size=1536, num_attention_heads=9, num_query_groups=3, head_dim=64,
        vocab_size=49152, max_position_embeddings=8192,
        rope_theta=100000.0, norm_eps=1e-5, tie_word_embeddings=True, qkv_bias=False, qk_norm=False,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    w = {"model.embed_tokens.weight": torch.randn(49152, 576, generator=gen) * 0.02}
    w["model.norm.weight"] = torch.ones(576)
    shapes = {
        "self_attn.q_proj.weight": (576, 576), "self_attn.k_proj.weight": (192, 576),
        "self_attn.v_proj.weight": (192, 576), "self_attn.o_proj.weight": (576, 576),
        "mlp.gate_proj.weight": (1536, 576), "mlp.up_proj.weight": (1536, 576),
        "mlp.down_proj.weight": (576, 1536),
        "self_attn.dms_proj_alpha.weight": (3, 576),
    }  # fmt: skip
    for i in range(30):
        for name, shape in shapes.items():
            w[f"model.layers.{i}.{name}"] = torch.randn(*shape, generator=gen) * 0.02
        for name in ("input_layernorm", "post_attention_layernorm", "self_attn.dms_proj_alpha_norm"):
            w[f"model.layers.{i}.{name}.weight"] = torch.ones(576)
    # random adapter logits around +1.15 sigma: about 7 in 8 tokens evicted (roughly CR 8 beyond the window)
    dms = {
        "variant": "adapter",
        "decisions_per": "head",
        "window": 256,
        "logit_scale": 1.0,
        "logit_offset": -0.55,
    }
    model = DMSCausalLM(arch, {k: v.to(device=device, dtype=torch.bfloat16) for k, v in w.items()}, dms)
    return model


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _kernel_ms(cache, layer: int) -> float | None:
    import torch

    if cache.k_pool.device.type != "cuda":
        return None
    from dms_megatron.kernels.paged_decode import paged_decode_attention

    R, H = cache.rows, cache.H
    q = torch.randn(R * H, cache.g, cache.D, device=cache.k_pool.device, dtype=cache.k_pool.dtype)
    table, lengths = cache.table[layer].view(R * H, -1), cache.paged[layer].view(-1)
    if cache.fused:  # the fused kernel attends over the ring too: time it with the layer's full rings
        from dms_megatron.kernels.fused_decode import ring_paged_decode_attention

        ring = (cache.ring_k[layer].view(R * H, cache.W, -1), cache.ring_v[layer].view(R * H, cache.W, -1))
        full = torch.full_like(lengths, cache.W)

        def attend():
            ring_paged_decode_attention(q, cache.k_pool, cache.v_pool, table, lengths, *ring, full)
    else:

        def attend():
            paged_decode_attention(q, cache.k_pool, cache.v_pool, table, lengths, backend=cache.backend)

    times = []
    for i in range(60):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        attend()
        end.record()
        torch.cuda.synchronize()
        if i >= 10:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def run_one(
    model,
    prompts: list[list[int]],
    new_tokens: int,
    block_size: int,
    backend: str,
    prefill_chunk: int = 1024,
) -> dict:
    """Both decodes of ``prompts`` at one batch: the engine's own loop, then steady-state steps on the
    same rows prefilled again; ``prefill_chunk``: prompt tokens per prefill call."""
    import torch

    from dms_megatron.inference.batch_engine import BatchEngine
    from dms_megatron.inference.engine import Request

    L, H, D = model.arch.num_layers, model.hkv, model.d
    per_stream = (len(prompts[0]) + new_tokens) // block_size + 2
    blocks = len(prompts) * L * H * per_stream
    engine = BatchEngine(
        model,
        num_blocks=blocks,
        block_size=block_size,
        max_batch=len(prompts),
        backend=backend,
        prefill_chunk=prefill_chunk,
    )
    cache = engine.cache
    requests = [Request(p, max_new_tokens=new_tokens) for p in prompts]
    # prefill every row, then decode all rows together: the engine's own loop with a hook timing it
    _sync()
    t0 = time.perf_counter()
    results = engine.generate(requests)
    wall = time.perf_counter() - t0
    bad = [r.error for r in results if r.error]
    if bad:
        raise RuntimeError(f"generation failed: {bad[:2]}")
    held = sum(r.metrics["peak_kv_tokens"] for r in results)
    elem = cache.k_pool.element_size()
    prefill_s = sum(len(p) / r.metrics["prefill_tokens_per_s"] for p, r in zip(prompts, results, strict=True))
    out = {
        "batch": len(prompts),
        "prompt_tokens": len(prompts[0]),
        "new_tokens": new_tokens,
        "decode_tokens_per_s": engine.last_batch["decode_tokens_per_s"],
        "decode_step_ms": 1000 * len(prompts) / engine.last_batch["decode_tokens_per_s"],
        "prefill_tokens_per_s": sum(map(len, prompts)) / prefill_s,
        "peak_kv_tokens_held": held,
        "peak_kv_bytes_held": held * 2 * D * elem,
        "memory_cr": statistics.mean(r.metrics["memory_cr"] for r in results),
        "stream_cr_mean": statistics.mean(r.metrics["stream_cr_mean"] for r in results),
        "wall_s": wall,
    }
    # steady state: the same rows prefilled again, then decode steps timed after two warm-up steps (eager
    # + CUDA-graph capture), each step as the engine runs it (reserve, decode, tokens to the host)
    rows = [cache.add_row() for _ in prompts]
    for row, p in zip(rows, prompts, strict=True):
        cache.prefill_chunked(row, torch.tensor(p, device=model.device), prefill_chunk)
    out["allocated_kv_bytes"] = (
        (cache.allocated_blocks() * block_size + cache.rows * L * H * cache.W) * 2 * D * elem
    )
    out["paged_kernel_ms_per_layer"] = _kernel_ms(cache, L // 2)
    out["paged_tokens_per_stream_mean"] = float(cache.paged.float().mean())
    tokens = torch.tensor([p[-1] for p in prompts], device=model.device)
    times = []
    for i in range(max(new_tokens, 6)):
        _sync()
        t0 = time.perf_counter()
        cache.reserve()
        tokens = cache.decode(tokens).argmax(-1)
        tokens.tolist()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    out["steady_decode_step_ms"] = 1000 * statistics.median(times)
    out["steady_decode_tokens_per_s"] = len(prompts) / statistics.median(times)
    cache.remove_rows(rows)
    return out


def add_model_arguments(ap: argparse.ArgumentParser) -> None:
    """``--model`` / ``--random-smollm2``, ``--text`` and ``--device`` (shared with serve_bench.py)."""
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="exported HF folder with a dms block")
    src.add_argument(
        "--random-smollm2", action="store_true", help="random SmolLM2-135M-shaped weights (probe)"
    )
    ap.add_argument("--text", type=Path, help="text file for the prompts (default: random token ids)")
    ap.add_argument("--device", default="cuda", help="cuda (measurements) or cpu (a smoke run)")


def load_model_and_ids(args: argparse.Namespace, tokens: int, dtype=None):
    """The model (bf16 unless ``dtype``) and at least ``tokens`` prompt token ids (the text's, or random)."""
    import torch

    from dms_megatron.inference.model import DMSCausalLM

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            f"{Path(sys.argv[0]).name} measures GPU throughput: it needs CUDA (--device cpu: a smoke run)"
        )
    dtype = dtype or torch.bfloat16
    if args.random_smollm2:
        model = random_smollm2(args.device)
        model.w = {k: v.to(dtype) for k, v in model.w.items()}
    else:
        model = DMSCausalLM.from_pretrained(args.model, dtype=dtype, device=args.device)
        if model.dms is None:
            raise SystemExit(f"{args.model}: config.json has no dms block")
    if args.text:
        from transformers import AutoTokenizer

        ids = AutoTokenizer.from_pretrained(args.model)(args.text.read_text())["input_ids"]
    else:
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, model.arch.vocab_size, (tokens * 4,), generator=gen).tolist()
    return model, ids


def main(argv: list[str] | None = None) -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(ap)
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    prompt_len = args.context - args.new_tokens
    model, ids = load_model_and_ids(args, prompt_len)
    dms_block = model.dms
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    report = {"device": name, "context": args.context, "runs": []}
    # warm-up outside the timings: Triton compilation and lazy CUDA state would otherwise land in the
    # first measured run (on the H100 run of 2026-11-22 they did: DMS at batch 1 ran first)
    for mode in ("dms", "dense"):
        model.dms = dms_block if mode == "dms" else None
        run_one(model, [ids[:512]], 4, args.block_size, args.backend)
    for batch in args.batch:
        prompts = [
            (ids * (1 + prompt_len * (i + 1) // len(ids)))[i * 97 : i * 97 + prompt_len] for i in range(batch)
        ]
        for mode in ("dms", "dense"):
            model.dms = dms_block if mode == "dms" else None
            res = {"mode": mode, **run_one(model, prompts, args.new_tokens, args.block_size, args.backend)}
            print(json.dumps(res), flush=True)
            report["runs"].append(res)
            if args.device == "cuda":
                torch.cuda.empty_cache()
    model.dms = dms_block
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
