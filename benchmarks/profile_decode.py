"""Where a decode step of the batched engine spends its time (torch profiler, CUDA), on random
SmolLM2-135M-shaped weights: ``python benchmarks/profile_decode.py [--context N] [--batch B]``."""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.decode_bench import random_smollm2
    from dms_megatron.inference.compressed_cache import CompressedKV

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--no-graphs", action="store_true")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument(
        "--baseline-rows", type=int, default=0, help="also time BaselineKV steps with this many rows"
    )
    args = ap.parse_args()
    model = random_smollm2("cuda")
    if args.baseline_rows:
        from dms_megatron.inference.baseline_cache import BaselineKV

        base = copy.copy(model)
        base.dms = None
        rows = [("tova", 4.0), ("h2o", 8.0), ("streaming_llm", 4.0)] * args.baseline_rows
        bkv = BaselineKV(base, rows[: args.baseline_rows], max_len=args.context + 8)
        toks = torch.zeros(args.baseline_rows, dtype=torch.long, device="cuda")
        for _ in range(3):
            bkv.decode(toks)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            bkv.decode(toks)
        torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) / args.steps * 1000
        print(f"baseline step: {ms:.2f} ms ({args.baseline_rows} rows, max_len {args.context})")
    cache = CompressedKV(
        model,
        num_blocks=args.batch * 90 * (args.context // 16 + 4),
        block_size=16,
        cuda_graphs=not args.no_graphs,
    )
    ids = torch.randint(0, 49152, (args.context + 64,), device="cuda")
    for _ in range(args.batch):
        row = cache.add_row()
        cache.prefill(row, ids[: args.context - 64])  # room for the decode steps
    tok = ids[: args.batch].clone()

    def step() -> None:
        cache.reserve()
        logits = cache.decode(tok)
        logits.argmax(-1).tolist()

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    print(f"decode step: {(time.perf_counter() - t0) / args.steps * 1000:.2f} ms (batch {args.batch})")
    if args.no_profile:
        return
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=30, max_name_column_width=40))
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=40))


if __name__ == "__main__":
    main()
