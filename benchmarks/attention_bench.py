"""Forward+backward time of the DMS attention backends vs PyTorch SDPA causal attention (CUDA).

Per-rank shapes: B=1, D=128, T=8192 by default, (Hq, Hkv) in {(5, 1), (32, 8)} (R1-Distill-Qwen-32B
and Qwen3-8B / Llama-3-8B at TP=8 and TP=1 respectively). bf16 inputs; the DMS bias gets a gradient.
Median of triton.testing.do_bench (CUDA events). Writes JSON (--out) and prints a table.

    python benchmarks/attention_bench.py --out results.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch
import torch.nn.functional as F


def _time_shape(Hq: int, Hkv: int, T: int, D: int, window: int, do_bench, dms_attention) -> list[dict]:
    q = torch.randn(1, Hq, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, Hkv, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, Hkv, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    relaxed = (torch.randn(1, Hkv, T, device="cuda") * 3).requires_grad_()
    g = torch.randn(1, Hq, T, D, device="cuda", dtype=torch.bfloat16)

    def sdpa():
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).backward(g)

    def dms_flex():
        dms_attention(q, k, v, relaxed, window, backend="flex").backward(g)

    def flex_no_bias():
        dms_attention(q, k, v, None, window, backend="flex").backward(g)

    rows = []
    for name, fn in (("sdpa_causal", sdpa), ("dms_flex", dms_flex), ("flex_causal_no_bias", flex_no_bias)):
        fn()  # compile / warm up
        torch.cuda.synchronize()
        ms = do_bench(fn, warmup=50, rep=300, return_mode="median")
        # causal attention FLOPs: fwd 2 matmuls x 2 flops x T^2/2 x D x Hq; bwd 2.5x fwd
        flops = 4 * (T * T / 2) * D * Hq * 3.5
        rows.append(
            {
                "Hq": Hq,
                "Hkv": Hkv,
                "T": T,
                "D": D,
                "kernel": name,
                "fwd_bwd_ms": ms,
                "tflops": flops / ms / 1e9,
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--shapes", default="5x1,32x8", help="comma-separated Hq x Hkv")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("attention_bench needs a CUDA GPU")
    from triton.testing import do_bench

    from dms_megatron.kernels import dms_attention

    T, D = args.seq, args.head_dim
    rows = []
    for shape in args.shapes.split(","):
        Hq, Hkv = (int(x) for x in shape.split("x"))
        rows += _time_shape(Hq, Hkv, T, D, args.window, do_bench, dms_attention)
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "window": args.window,
        "command": " ".join(sys.argv),
    }
    print(json.dumps(meta))
    print(f"{'Hq/Hkv':>7} {'kernel':>22} {'fwd+bwd ms':>11} {'TFLOP/s':>8} {'vs sdpa':>8}")
    for r in rows:
        base = next(x for x in rows if x["Hq"] == r["Hq"] and x["kernel"] == "sdpa_causal")["fwd_bwd_ms"]
        r["vs_sdpa"] = r["fwd_bwd_ms"] / base
        head = f"{r['Hq']:>4}/{r['Hkv']:<2} {r['kernel']:>22}"
        print(f"{head} {r['fwd_bwd_ms']:>11.3f} {r['tflops']:>8.1f} {r['vs_sdpa']:>7.2f}x")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
