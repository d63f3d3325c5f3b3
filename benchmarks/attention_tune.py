"""Launch settings of the fused Triton DMS training attention (``kernels.triton_dms``), swept on a GPU.

For each shape (Hq x Hkv x D at sequence length T, bf16, window 256, the DMS bias with its gradient):
the forward, the dK/dV kernel and the dQ kernel each get a list of candidate settings (query block x
key block, ``num_warps``, ``num_stages``); one kernel's setting changes at a time while the other two
keep the defaults. Each candidate is checked against the default settings' output and gradients (a
candidate whose results differ beyond bf16 tolerance is recorded as wrong and never chosen) and timed
forward only (forward candidates) or forward + backward (backward candidates), median of
``triton.testing.do_bench``. Then the best candidate of each kernel together, against the defaults and
SDPA's default causal attention of the same shape. Prints a table, writes JSON (--out); ``--deadline``
(seconds) stops starting candidates and keeps what was measured.

    python benchmarks/attention_tune.py --shapes 5x1x128,9x3x64 --seqs 8192 --out tune.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
import time

import torch
import torch.nn.functional as F

KERNELS = ("fwd", "dkdv", "dq")
# (query block, key block) candidates per kernel, crossed with num_warps and each kernel's num_stages
# (dK/dV with 1: one bf16 case went wrong at one pipelined tiling, see triton_dms._CUDA_LAUNCH)
BLOCKS = {
    "fwd": [(128, 64), (128, 128), (64, 64), (128, 32)],
    "dkdv": [(64, 64), (32, 128), (64, 128), (32, 64)],
    "dq": [(128, 32), (64, 32), (128, 64), (64, 64)],
}
STAGES = {"fwd": (3, 4), "dkdv": (1, 3), "dq": (2, 3)}
WARPS = (4, 8)
TOLERANCE = 2e-2  # relative error vs the default settings' result, bf16


def candidates(kernel: str, head_dim: int, tma: bool = False) -> list[dict]:
    """Settings to try for one kernel; large tiles are left out at head dims above 128 (shared memory).
    With ``tma`` each setting also with its tiles loaded through tensor descriptors."""
    out = []
    for blocks, warps, stages in itertools.product(BLOCKS[kernel], WARPS, STAGES[kernel]):
        if head_dim > 128 and blocks[0] * blocks[1] > 64 * 64:
            continue
        out.append({"blocks": blocks, "num_warps": warps, "num_stages": stages})
        if tma:
            out.append({"blocks": blocks, "num_warps": warps, "num_stages": stages, "tma": True})
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def tune_shape(
    Hq: int,
    Hkv: int,
    D: int,
    T: int,
    window: int,
    do_bench,
    deadline: float,
    device: str = "cuda",
    tma: bool = False,
) -> dict:
    """Sweep one shape (see the module docstring); each kernel gets an equal share of the time left
    before ``deadline`` (``time.monotonic()`` seconds)."""
    from dms_megatron.kernels import triton_dms

    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (
        torch.randn(1, h, T, D, device=device, dtype=torch.bfloat16, generator=gen).requires_grad_()
        for h in (Hq, Hkv, Hkv)
    )
    log_keep = (-torch.rand(1, Hkv, T, device=device, generator=gen) * 4).requires_grad_()
    g = torch.randn(1, Hq, T, D, device=device, dtype=torch.bfloat16, generator=gen)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    leaves = (q, k, v, log_keep)

    def run() -> list[torch.Tensor]:
        for x in leaves:
            x.grad = None
        out = triton_dms.dms_attention_triton(q, k, v, log_keep, window)
        out.backward(g)
        return [out.detach(), *(x.grad.detach().clone() for x in leaves)]

    def fwd_only():
        with torch.no_grad():
            triton_dms.dms_attention_triton(q, k, v, log_keep, window)

    def fwd_bwd():
        triton_dms.dms_attention_triton(q, k, v, log_keep, window).backward(g)

    def measure(overrides: dict, timed) -> dict:
        triton_dms.LAUNCH_OVERRIDES.clear()
        triton_dms.LAUNCH_OVERRIDES.update(overrides)
        try:
            got = run()
            sync()
        except Exception as exc:  # e.g. out of shared memory at this tiling
            return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
        errs = [_rel(a, b) for a, b in zip(got, reference, strict=True)]
        row = {"max_rel_err": max(errs), "ok": max(errs) < TOLERANCE}
        row["ms"] = do_bench(timed, warmup=10, rep=100, return_mode="median")
        return row

    triton_dms.LAUNCH_OVERRIDES.clear()
    reference = run()
    sync()
    sdpa = {
        "fwd_ms": do_bench(lambda: _sdpa(q, k, v, None), warmup=10, rep=100, return_mode="median"),
        "fwd_bwd_ms": do_bench(lambda: _sdpa(q, k, v, g), warmup=10, rep=100, return_mode="median"),
    }
    result: dict = {"Hq": Hq, "Hkv": Hkv, "D": D, "T": T, "window": window, "sdpa_default": sdpa}
    default = {"fwd_ms": measure({}, fwd_only)["ms"], "fwd_bwd_ms": measure({}, fwd_bwd)["ms"]}
    result["default"] = default
    best: dict = {}
    for i, kernel in enumerate(KERNELS):
        rows = []
        share = time.monotonic() + (deadline - time.monotonic()) / (len(KERNELS) - i)
        for cand in candidates(kernel, D, tma):
            if time.monotonic() > share:
                result["cut_by_deadline"] = True
                break
            row = {**cand, **measure({kernel: cand}, fwd_only if kernel == "fwd" else fwd_bwd)}
            rows.append(row)
            print(json.dumps({"shape": f"{Hq}x{Hkv}x{D}", "T": T, "kernel": kernel, **row}), flush=True)
        result[kernel] = rows
        good = [r for r in rows if r.get("ok")]
        if good:
            fastest = min(good, key=lambda r: r["ms"])
            best[kernel] = {
                x: fastest[x] for x in ("blocks", "num_warps", "num_stages", "tma") if x in fastest
            }
    chosen = {"settings": best}
    if best:
        for timed, key in ((fwd_only, "fwd_ms"), (fwd_bwd, "fwd_bwd_ms")):
            row = measure(best, timed)
            chosen[key] = row.get("ms")
            chosen["max_rel_err"] = row.get("max_rel_err")
    result["best"] = chosen
    triton_dms.LAUNCH_OVERRIDES.clear()
    return result


def _sdpa(q, k, v, g):
    if g is None:
        with torch.no_grad():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).backward(g)


def summary(r: dict) -> str:
    s, d, b = r["sdpa_default"], r["default"], r["best"]
    head = f"{r['Hq']}/{r['Hkv']}/{r['D']} T={r['T']}"
    lines = [
        f"{head}: SDPA fwd {s['fwd_ms']:.3f} ms, fwd+bwd {s['fwd_bwd_ms']:.3f} ms",
        f"{head}: default fwd {d['fwd_ms']:.3f} ms ({d['fwd_ms'] / s['fwd_ms']:.2f}x), fwd+bwd "
        f"{d['fwd_bwd_ms']:.3f} ms ({d['fwd_bwd_ms'] / s['fwd_bwd_ms']:.2f}x)",
    ]
    if b.get("fwd_bwd_ms"):
        lines.append(
            f"{head}: best fwd {b['fwd_ms']:.3f} ms ({b['fwd_ms'] / s['fwd_ms']:.2f}x), fwd+bwd "
            f"{b['fwd_bwd_ms']:.3f} ms ({b['fwd_bwd_ms'] / s['fwd_bwd_ms']:.2f}x), err "
            f"{b['max_rel_err']:.1e}; settings {json.dumps(b['settings'])}"
        )
    for kernel in KERNELS:
        bad = [x for x in r.get(kernel, []) if x.get("ok") is False]
        if bad:
            lines.append(f"{head}: {kernel}: {len(bad)} settings gave wrong results: {json.dumps(bad)}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="5x1x128,9x3x64", help="comma-separated Hq x Hkv x D")
    ap.add_argument("--seqs", default="8192", help="comma-separated sequence lengths")
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument(
        "--deadline", type=float, default=1e6, help="seconds for the sweep, shared by shape and kernel"
    )
    ap.add_argument("--out", default=None, help="JSON file")
    ap.add_argument("--tma", action="store_true", help="each candidate also with TMA tile loads")
    ap.add_argument(
        "--settings-out",
        default=None,
        help="JSON file for the first shape's best settings (step_throughput.py --triton-launch)",
    )
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: attention_tune needs a CUDA GPU")
    from triton.testing import do_bench

    deadline = time.monotonic() + args.deadline
    report: dict = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "command": " ".join(sys.argv),
        "shapes": [],
    }
    todo = list(itertools.product(args.shapes.split(","), args.seqs.split(",")))
    for n, (shape, seq) in enumerate(todo):  # each shape gets an equal share of the time left
        Hq, Hkv, D = (int(x) for x in shape.split("x"))
        shape_deadline = time.monotonic() + (deadline - time.monotonic()) / (len(todo) - n)
        result = tune_shape(Hq, Hkv, D, int(seq), args.window, do_bench, shape_deadline, tma=args.tma)
        report["shapes"].append(result)
        print(summary(result), flush=True)
        if args.settings_out and n == 0 and result["best"]["settings"]:
            with open(args.settings_out, "w") as f:
                json.dump(result["best"]["settings"], f, indent=2)
        if args.out:  # after every shape: a cut run keeps what it measured
            with open(args.out, "w") as f:
                json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
