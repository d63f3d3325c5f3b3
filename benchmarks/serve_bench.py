"""Serving throughput at a fixed KV memory budget: DMS vs the same weights with eviction off (dense), same
engine (``BatchEngine``), same process.

    python benchmarks/serve_bench.py --model exports/cr8 --text held_out.txt --out serve.json
    python benchmarks/serve_bench.py --random-smollm2 --prompt-lengths 4096 --kv-budget-gib 2   # a probe

For every (prompt length, KV budget, mode): ``--requests`` prompts (windows of ``--text`` at distinct
offsets, or random ids) + ``--new-tokens`` generated greedily (no stop token: every request generates
the same number; ``--dense-requests``: fewer for the dense runs), all submitted at once to an engine
whose KV memory is the budget (window rings of ``--max-batch`` rows + block pool; admission by the
blocks requests really hold, preemption when the pool runs out). Reported: requests finished, the most
rows decoding at once and the mean per step, decode tokens/s over the run, time per output token (the
decode step, p50 / p99), prefill tokens/s, memory CR, preemptions, queue time, wall time; then DMS /
dense ratios. ``--equal-batch B``: also both modes at batch B with a pool large enough for dense
(``decode_bench.run_one``: per-step latency at equal batch). A prompt length the model's context
cannot hold is reported as skipped, unless ``--past-context``: then the model serves it with RoPE
positions past its trained context (a throughput and memory probe: what it generates there is not
meaningful, and each such row is marked ``past_trained_context``). Progress (every
``--progress-every`` prefills, and request 0's tokens) is printed as it goes, and ``--out`` is
rewritten after every row (``complete`` once all ran), so a run
cut by a time limit keeps what it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def fixed_budget_run(model, prompts: list[list[int]], new_tokens: int, budget_gib: float, args) -> dict:
    from dms_megatron.inference.batch_engine import BatchEngine
    from dms_megatron.inference.engine import Request

    engine = BatchEngine(
        model,
        block_size=args.block_size,
        max_batch=args.max_batch,
        backend=args.backend,
        kv_budget_gib=budget_gib,
        prefill_chunk=args.prefill_chunk,
        on_token=_progress(len(prompts), new_tokens, getattr(args, "progress_every", 32)),
    )
    t0 = time.perf_counter()
    results = engine.generate([Request(p, max_new_tokens=new_tokens) for p in prompts])
    wall = time.perf_counter() - t0
    done = [r for r in results if r.error is None]
    b = engine.last_batch
    prefill_s = sum(
        len(p) / r.metrics["prefill_tokens_per_s"]
        for p, r in zip(prompts, results, strict=True)
        if r.error is None
    )
    return {
        "requests": len(prompts),
        "finished": len(done),
        "errors": sorted({r.error for r in results if r.error})[:3],
        "peak_rows": b["peak_rows"],
        "mean_rows_per_decode_step": b["mean_rows_per_decode_step"],
        "decode_tokens_per_s": b["decode_tokens_per_s"],
        "tpot_ms_p50": b["decode_step_ms_p50"],
        "tpot_ms_p99": b["decode_step_ms_p99"],
        "prefill_tokens_per_s": sum(len(p) for p, r in zip(prompts, results, strict=True) if r.error is None)
        / max(prefill_s, 1e-9),
        "memory_cr": statistics.mean(r.metrics["memory_cr"] for r in done) if done else None,
        "kv_budget_bytes": b["kv_budget_bytes"],
        "pool_blocks": b["pool_blocks"],
        "peak_pool_blocks_used": b["peak_pool_blocks_used"],
        "preemptions": b["preemptions"],
        "queue_s_mean": b["queue_s_mean"],
        "wall_s": wall,
        "output_tokens_per_s_wall": len(done) * new_tokens / wall,
    }


def _progress(requests: int, new_tokens: int, every: int):
    """An ``on_token`` callback printing (flushed) every ``every`` prefills done and every ``every``
    tokens of the first request, so a run cut by a time limit shows where its time went."""
    t0 = time.perf_counter()
    tokens = [0] * requests  # streamed per request: the first one comes right after its prefill
    prefilled = 0

    def on_token(index: int, token: int, live_cr: float) -> None:
        nonlocal prefilled
        tokens[index] += 1
        if not every:
            return
        if tokens[index] == 1:
            prefilled += 1
            if prefilled % every == 0 or prefilled == requests:
                print(f"  [{time.perf_counter() - t0:7.1f} s] prefilled {prefilled}/{requests}", flush=True)
        elif index == 0 and tokens[0] % every == 0:
            print(
                f"  [{time.perf_counter() - t0:7.1f} s] request 0: {tokens[0]}/{new_tokens} tokens "
                f"(live memory CR {live_cr:.2f})",
                flush=True,
            )

    return on_token


def main(argv: list[str] | None = None) -> None:
    import torch
    from decode_bench import add_model_arguments, load_model_and_ids

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(ap)
    ap.add_argument("--prompt-lengths", type=int, nargs="+", default=[8192, 16384])
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--kv-budget-gib", type=float, nargs="+", default=[8.0, 32.0])
    ap.add_argument("--requests", type=int, default=96, help="requests per run, all submitted at once")
    ap.add_argument(
        "--dense-requests",
        type=int,
        default=None,
        help="requests of the dense runs (default --requests): the first N of the same prompts; dense "
        "holds a few rows at a time, so more requests only add waves of the same step",
    )
    ap.add_argument("--max-batch", type=int, default=128, help="rows decoding at once at most")
    ap.add_argument("--equal-batch", type=int, default=32, help="also both modes at this batch (0: skip)")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument(
        "--prefill-chunk", type=int, default=1024, help="prompt tokens per prefill call (engine default)"
    )
    ap.add_argument("--backend", default="auto")
    ap.add_argument(
        "--progress-every", type=int, default=32, help="print every N prefills / tokens (0: quiet)"
    )
    ap.add_argument(
        "--past-context",
        action="store_true",
        help="serve prompts longer than the model's context (RoPE extrapolated; throughput and memory only)",
    )
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    model, ids = load_model_and_ids(
        args, max(args.prompt_lengths) + args.new_tokens, getattr(torch, args.dtype)
    )
    benchmark(model, ids, args)  # writes --out after every row: a run cut by a time limit keeps its rows


def _save(report: dict, args: argparse.Namespace) -> None:
    out = getattr(args, "out", None)
    if out:
        Path(out).write_text(json.dumps(report, indent=2) + "\n")


def benchmark(model, ids: list[int], args: argparse.Namespace) -> dict:
    """Every (prompt length, budget, mode) run and the equal-batch pairs of ``main`` on a loaded model
    (the report is rewritten to ``args.out``, when set, after every row)."""
    import torch
    from decode_bench import run_one

    dms_block = model.dms
    report: dict = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "command": " ".join(sys.argv),
        "model": getattr(args, "model", None) or "random-smollm2",
        "dms": None if dms_block is None else dataclasses.asdict(dms_block),
        "runs": [],
        "equal_batch": [],
        "complete": False,  # True once every row ran (the file is rewritten after each row)
    }
    context = model.arch.max_position_embeddings
    longest = max(args.prompt_lengths) + args.new_tokens
    if getattr(args, "past_context", False) and longest > context:
        model.extend_context(longest)
        report["past_context"] = {"trained_context": context, "served_up_to": longest}
        print(f"serving up to {longest} positions past the trained context of {context}", flush=True)
    for mode in ("dms", "dense"):  # warm-up: Triton compilation and lazy CUDA state outside the timings
        model.dms = dms_block if mode == "dms" else None
        run_one(model, [ids[: min(256, context - 8)]], 4, args.block_size, args.backend)  # + 6 timed steps
    for length in args.prompt_lengths:
        if length + args.new_tokens > model.arch.max_position_embeddings:
            report["runs"].append(
                {"prompt_tokens": length, "skipped": f"beyond the model context ({context})"}
            )
            print(f"prompt {length}: skipped (model context {context})", flush=True)
            continue
        stride = max(1, (len(ids) - length) // max(args.requests, 1))
        prompts = [
            (ids * (1 + (length + i * stride) // len(ids)))[i * stride : i * stride + length]
            for i in range(args.requests)
        ]
        mode_prompts = {"dms": prompts, "dense": prompts[: args.dense_requests or len(prompts)]}
        for budget in args.kv_budget_gib:
            pair = {}
            for mode in ("dms", "dense"):
                model.dms = dms_block if mode == "dms" else None
                try:
                    res = fixed_budget_run(model, mode_prompts[mode], args.new_tokens, budget, args)
                except ValueError as exc:  # a budget too small for one row of this mode
                    res = {"skipped": str(exc)}
                row = {"mode": mode, "prompt_tokens": length, "kv_budget_gib": budget, **res}
                if length + args.new_tokens > context:
                    row["past_trained_context"] = True
                print(json.dumps(row), flush=True)
                report["runs"].append(row)
                _save(report, args)
                pair[mode] = row
                if args.device == "cuda":
                    torch.cuda.empty_cache()
            # a ratio only where both decoded (a dense row too large for the budget finishes nothing)
            if all(r.get("decode_tokens_per_s") for r in pair.values()):
                ratio = {
                    "prompt_tokens": length,
                    "kv_budget_gib": budget,
                    "decode_tokens_per_s_dms_over_dense": pair["dms"]["decode_tokens_per_s"]
                    / pair["dense"]["decode_tokens_per_s"],
                    "peak_rows_dms_over_dense": pair["dms"]["peak_rows"] / max(pair["dense"]["peak_rows"], 1),
                }
                print(json.dumps(ratio), flush=True)
                report["runs"].append(ratio)
                _save(report, args)
        if args.equal_batch:
            for mode in ("dms", "dense"):
                model.dms = dms_block if mode == "dms" else None
                res = run_one(
                    model,
                    prompts[: args.equal_batch],
                    args.new_tokens,
                    args.block_size,
                    args.backend,
                    args.prefill_chunk,
                )
                row = {"mode": mode, **res}
                print(json.dumps(row), flush=True)
                report["equal_batch"].append(row)
                _save(report, args)
    model.dms = dms_block
    report["complete"] = True
    _save(report, args)
    return report


if __name__ == "__main__":
    main()
