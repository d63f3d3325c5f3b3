"""Where a decode step of the batched engine spends its time (torch profiler, CUDA), on random
SmolLM2-135M-shaped weights: ``python benchmarks/profile_decode.py [--context N] [--batch B]``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.decode_bench import _random_smollm2
    from dms_megatron.inference.compressed_cache import CompressedKV

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    model = _random_smollm2("cuda")
    cache = CompressedKV(model, num_blocks=args.batch * 90 * (args.context // 16 + 4), block_size=16)
    ids = torch.randint(0, 49152, (args.context + 64,), device="cuda")
    for _ in range(args.batch):
        row = cache.add_row()
        cache.prefill(row, ids[: args.context])
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
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=30, max_name_column_width=40))
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=40))


if __name__ == "__main__":
    main()
