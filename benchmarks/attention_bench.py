"""Forward and forward+backward time of the DMS attention kernels vs PyTorch SDPA causal attention (CUDA).

Kernels, one process, same inputs: ``dms_triton`` (the fused kernel), ``dms_split`` (cuDNN over the
old keys + FlashAttention-2 band, merged; ``dms_split_flash``: FlashAttention-2 for both),
``dms_flex`` (FlexAttention with the DMS bias), ``flex_causal`` (FlexAttention without the bias),
``dms_triton_tma`` / ``dms_triton_tma_fwd`` / ``dms_triton_tma_bwd`` (the fused kernel with its tiles loaded
through tensor descriptors, TMA on Hopper: every kernel / the forward only / the backward kernels only),
``dms_split_docs`` / ``flash_docs`` (the split with the DMS bias / FlashAttention-2 causal, both over the
sequence packed as documents of ``--doc-length`` tokens: the training batches' layout; compare the two),
``sdpa_default`` (SDPA, its own backend choice) and ``sdpa_flash`` (SDPA restricted to its flash
backend). Per-rank shapes (Hq, Hkv, D):
(5, 1, 128) R1-Distill-Qwen-32B at TP=8, (4, 1, 128) Qwen3-32B-like at TP=8, (32, 8, 128) 8B at TP=1,
(9, 3, 64) SmolLM2-135M; T in 4K, 8K, 32K by default. bf16 inputs; the DMS kernels take the log-keep bias
as the training step gives it (``--bias-from relaxed``: computed from relaxed logits inside each call, as
rows before 2026-12-08 did); the bias gets a gradient.
Median of ``triton.testing.do_bench`` (CUDA events). Beside each forward + backward time, the host's
time to issue one call (``host_issue_ms``: no synchronisation, the GPU still busy with earlier calls): where
it reaches 80% of the device time the row is marked ``host-bound`` -- the GPU waited for the launches, so the
time measures the Python / launch path rather than the kernels (``fwd_host_ms``: the forward alone; for the
fused kernel also the forward + backward time with
its Triton launches skipped, ``fwd_bwd_host_no_launch_ms``: the rest is Triton's launching);
``fwd_bwd_kernel_ms`` (the torch profiler's GPU time of the call's kernels) measures the kernels alone.
Prints a table (ratios to ``sdpa_default``) and writes JSON (--out).

    python benchmarks/attention_bench.py --out results.json
    python benchmarks/attention_bench.py --shapes 5x1x128 --seqs 8192 --kernels dms_triton,sdpa_default
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

KERNELS = (
    "sdpa_default",
    "sdpa_flash",
    "dms_triton",
    "dms_triton_tma",
    "dms_triton_tma_fwd",
    "dms_triton_tma_bwd",
    "dms_split",
    "dms_split_flash",
    "dms_flex",
    "flex_causal",
    "dms_split_docs",
    "flash_docs",
)
SHAPES = "5x1x128,4x1x128,32x8x128,9x3x64"
# the fused kernel under other launch settings (kernels.triton_dms.LAUNCH_OVERRIDES while timed)
TRITON_VARIANTS = {
    "dms_triton_tma": {kernel: {"tma": True} for kernel in ("fwd", "dkdv", "dq")},
    "dms_triton_tma_fwd": {"fwd": {"tma": True}},
    "dms_triton_tma_bwd": {kernel: {"tma": True} for kernel in ("dkdv", "dq")},
}


@contextlib.contextmanager
def triton_variant(name: str):
    """The launch settings of kernel ``name`` (``TRITON_VARIANTS``) in force inside the block."""
    overrides = TRITON_VARIANTS.get(name)
    if not overrides:
        yield
        return
    from dms_megatron.kernels import triton_dms

    triton_dms.LAUNCH_OVERRIDES.update(overrides)
    try:
        yield
    finally:
        triton_dms.LAUNCH_OVERRIDES.clear()


def _causal_flops(Hq: int, T: int, D: int, backward: bool) -> float:
    """Matmul FLOPs of causal attention: forward 2 matmuls x 2 flops x T^2/2 x D x Hq; backward 2.5x."""
    fwd = 4 * (T * T / 2) * D * Hq
    return fwd * (3.5 if backward else 1.0)


def packed_doc_ids(T: int, doc_length: int, device: str = "cuda") -> torch.Tensor:
    """[T] ids of documents of ``doc_length`` tokens (the last one shorter), with the host copy the
    batch packer attaches (so the split lays them out without a device sync)."""
    from dms_megatron.kernels.split_attention import with_host_copy

    return with_host_copy(torch.arange(T) // max(1, doc_length), device)


HOST_BOUND = 0.8  # host issue time / device time from which a row measures the host


def host_issue_ms(fn: Callable[[], object], calls: int = 20, sync: Callable[[], None] | None = None) -> float:
    """Median wall time (ms) the host takes to issue one ``fn()`` call, the calls back to back without a
    synchronisation in between (``sync`` once before and after, e.g. ``torch.cuda.synchronize``); few
    enough calls that the launch queue does not fill and block the host."""
    sync = sync or (lambda: None)
    sync()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    sync()
    times.sort()
    return 1e3 * times[len(times) // 2]


@contextlib.contextmanager
def no_triton_launches(module):
    """Inside the block every Triton kernel of ``module`` is launched as a no-op (outputs left unwritten),
    so that timing a call measures the host's work around the launches: the wrapper, allocations,
    autograd. Its kernels must be compiled already (nothing compiles while they are swapped out)."""
    from triton.runtime.jit import JITFunction

    class _Skipped:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    kernels = {name: fn for name, fn in vars(module).items() if isinstance(fn, JITFunction)}
    try:
        for name in kernels:
            setattr(module, name, _Skipped())
        yield
    finally:
        for name, fn in kernels.items():
            setattr(module, name, fn)


def kernel_ms(fn: Callable[[], object], calls: int = 10) -> float:
    """GPU time (ms) of the kernels one ``fn()`` call runs, from the torch profiler (the sum of every op's
    self device time over ``calls`` calls, divided by ``calls``): the call's cost without the host's, which
    a host-bound row's wall time hides."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in prof.key_averages()) / calls / 1e3


def _kernel_fns(
    name: str, q, k, v, relaxed, window: int, dms_attention, doc_ids=None, log_keep=None
) -> Callable[[], torch.Tensor]:
    """``log_keep``: ``(bias, bias over the packed documents)`` given to the DMS kernels instead of the
    relaxed logits (as the training step passes them, from the decisions kernel), or None."""

    def dms(backend: str, docs: bool = False) -> Callable[[], torch.Tensor]:
        ids = doc_ids if docs else None
        if log_keep is None:
            return lambda: dms_attention(q, k, v, relaxed, window, doc_ids=ids, backend=backend)
        lk = log_keep[1] if docs else log_keep[0]
        return lambda: dms_attention(q, k, v, None, window, doc_ids=ids, backend=backend, log_keep=lk)

    if name == "sdpa_default":
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    if name == "sdpa_flash":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def flash():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

        return flash
    if name == "dms_triton" or name in TRITON_VARIANTS:
        return dms("triton")
    if name == "dms_split":
        return dms("split")
    if name == "dms_split_flash":  # the split with FlashAttention-2 for the old keys too

        def split_flash():
            from dms_megatron.core.shift import shifted_log_keep
            from dms_megatron.kernels.split_attention import dms_attention_split

            bias = shifted_log_keep(relaxed) if log_keep is None else log_keep[0]
            return dms_attention_split(q, k, v, bias, window, old_engine="flash")

        return split_flash
    if name == "dms_split_docs":
        return dms("split", docs=True)
    if name == "flash_docs":
        return lambda: dms_attention(q, k, v, None, window, doc_ids=doc_ids, backend="split")
    if name == "dms_flex":
        return dms("flex")
    if name == "flex_causal":
        return lambda: dms_attention(q, k, v, None, window, backend="flex")
    raise ValueError(f"unknown kernel {name!r}; choose from {KERNELS}")


def time_shape(
    Hq: int,
    Hkv: int,
    D: int,
    T: int,
    window: int,
    kernels: list[str],
    do_bench,
    dms_attention,
    doc_length: int = 2048,
    bias_from: str = "log_keep",
) -> list[dict]:
    """Rows of every kernel at one shape; the DMS kernels get the log-keep bias (``bias_from="log_keep"``,
    as in the training step) or compute it from the relaxed logits inside the call (``"relaxed"``)."""
    q = torch.randn(1, Hq, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, Hkv, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, Hkv, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    relaxed = (torch.randn(1, Hkv, T, device="cuda") * 3).requires_grad_()
    g = torch.randn(1, Hq, T, D, device="cuda", dtype=torch.bfloat16)
    doc_ids = packed_doc_ids(T, doc_length)
    log_keep = None
    if bias_from == "log_keep":
        from dms_megatron.kernels.bias import shifted_bias

        log_keep = tuple(shifted_bias(relaxed.detach(), ids).requires_grad_() for ids in (None, doc_ids))
    rows = []
    for name in kernels:
        with triton_variant(name):
            fn = _kernel_fns(name, q, k, v, relaxed, window, dms_attention, doc_ids, log_keep)
            row = _time_kernel(name, fn, Hq, Hkv, D, T, g, do_bench)
        if name.endswith("_docs"):
            row["doc_length"] = doc_length
        rows.append(row)
        for x in (q, k, v, relaxed, *(log_keep or ())):
            x.grad = None
    return rows


def _time_kernel(name, fwd, Hq, Hkv, D, T, g, do_bench) -> dict:
    """One kernel's row: forward and forward + backward times, host issue time (for the fused kernel also
    without its launches), TFLOP/s (or its error)."""
    row: dict = {"Hq": Hq, "Hkv": Hkv, "D": D, "T": T, "kernel": name}
    try:
        with torch.no_grad():
            fwd()  # compile / warm up
        fwd().backward(g)
        torch.cuda.synchronize()
    except Exception as exc:  # e.g. a backend this GPU / shape does not support: recorded, not timed
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        return row

    def fwd_only(fwd=fwd):
        with torch.no_grad():
            fwd()

    def fwd_bwd(fwd=fwd):
        fwd().backward(g)

    row["fwd_ms"] = do_bench(fwd_only, warmup=25, rep=200, return_mode="median")
    row["fwd_bwd_ms"] = do_bench(fwd_bwd, warmup=25, rep=200, return_mode="median")
    row["fwd_host_ms"] = host_issue_ms(fwd_only, sync=torch.cuda.synchronize)
    row["fwd_bwd_host_ms"] = host_issue_ms(fwd_bwd, sync=torch.cuda.synchronize)
    row["host_bound"] = row["fwd_bwd_host_ms"] >= HOST_BOUND * row["fwd_bwd_ms"]
    if name == "dms_triton" or name in TRITON_VARIANTS:
        from dms_megatron.kernels import triton_dms

        with no_triton_launches(triton_dms):
            row["fwd_bwd_host_no_launch_ms"] = host_issue_ms(fwd_bwd, sync=torch.cuda.synchronize)
    row["fwd_bwd_kernel_ms"] = kernel_ms(fwd_bwd)
    row["fwd_tflops"] = _causal_flops(Hq, T, D, False) / row["fwd_ms"] / 1e9
    row["fwd_bwd_tflops"] = _causal_flops(Hq, T, D, True) / row["fwd_bwd_ms"] / 1e9
    return row


def add_ratios(rows: list[dict], baseline: str = "sdpa_default") -> None:
    """Ratios to ``baseline`` (``*_vs_sdpa``); the packed-document kernels to ``flash_docs``
    (``*_vs_flash_docs``: the same documents without eviction)."""
    for r in rows:
        base_name, key = ("flash_docs", "flash_docs") if r["kernel"].endswith("_docs") else (baseline, "sdpa")
        base = next(
            (x for x in rows if (x["Hq"], x["Hkv"], x["D"], x["T"]) == (r["Hq"], r["Hkv"], r["D"], r["T"])
             and x["kernel"] == base_name and "error" not in x),
            None,
        )  # fmt: skip
        if base is None or "error" in r:
            continue
        r[f"fwd_vs_{key}"] = r["fwd_ms"] / base["fwd_ms"]
        r[f"fwd_bwd_vs_{key}"] = r["fwd_bwd_ms"] / base["fwd_bwd_ms"]
        if r.get("fwd_bwd_kernel_ms") and base.get("fwd_bwd_kernel_ms"):
            r[f"fwd_bwd_kernel_vs_{key}"] = r["fwd_bwd_kernel_ms"] / base["fwd_bwd_kernel_ms"]


def table(rows: list[dict]) -> str:
    lines = [
        f"{'Hq/Hkv/D':>10} {'T':>6} {'kernel':>13} {'fwd ms':>8} {'x sdpa':>7} {'fwd+bwd ms':>11} "
        f"{'x sdpa':>7} {'TFLOP/s':>8} {'host ms':>8} {'no-launch':>9} {'kernel ms':>9} {'x sdpa':>7}   "
        "(*_docs: x flash_docs; TFLOP/s of dense causal; host ms: issuing one fwd+bwd; no-launch: the same "
        "with the Triton launches skipped; kernel ms: its kernels' GPU time)"
    ]
    for r in rows:
        head = f"{r['Hq']:>4}/{r['Hkv']}/{r['D']:<3} {r['T']:>6} {r['kernel']:>13}"
        if "error" in r:
            lines.append(f"{head}  {r['error']}")
            continue
        nan = float("nan")
        key = "flash_docs" if r["kernel"].endswith("_docs") else "sdpa"
        lines.append(
            f"{head} {r['fwd_ms']:>8.3f} {r.get(f'fwd_vs_{key}', nan):>6.2f}x {r['fwd_bwd_ms']:>11.3f} "
            f"{r.get(f'fwd_bwd_vs_{key}', nan):>6.2f}x {r['fwd_bwd_tflops']:>8.1f} "
            f"{r.get('fwd_bwd_host_ms', nan):>8.3f} {r.get('fwd_bwd_host_no_launch_ms', nan):>9.3f} "
            f"{r.get('fwd_bwd_kernel_ms', nan):>9.3f} "
            f"{r.get(f'fwd_bwd_kernel_vs_{key}', nan):>6.2f}x{'  host-bound' if r.get('host_bound') else ''}"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", default="4096,8192,32768", help="comma-separated sequence lengths")
    ap.add_argument("--shapes", default=SHAPES, help="comma-separated Hq x Hkv x D")
    ap.add_argument("--kernels", default=",".join(KERNELS), help=f"comma-separated, from {KERNELS}")
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--doc-length", type=int, default=2048, help="tokens per document of the *_docs kernels")
    ap.add_argument(
        "--bias-from",
        choices=("log_keep", "relaxed"),
        default="log_keep",
        help="the DMS kernels take the log-keep bias, as the training step gives it (default), or compute "
        "it from relaxed logits inside each call (logsigmoid + shift, forward and backward; as rows before "
        "2026-12-08 did)",
    )
    ap.add_argument("--out", default=None, help="JSON file for the rows and the run's metadata")
    ap.add_argument(
        "--deadline", type=float, default=None, help="seconds: no shape starts after this (rows so far kept)"
    )
    args = ap.parse_args()
    kernels = args.kernels.split(",")
    unknown = sorted(set(kernels) - set(KERNELS))
    if unknown:
        sys.exit(f"error: unknown kernels {unknown}; choose from {KERNELS}")
    if not torch.cuda.is_available():
        sys.exit("error: attention_bench needs a CUDA GPU")
    from triton.testing import do_bench

    from dms_megatron.kernels import dms_attention

    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "window": args.window,
        "doc_length": args.doc_length,
        "bias_from": args.bias_from,
        "command": " ".join(sys.argv),
    }
    print(json.dumps(meta), flush=True)
    rows: list[dict] = []
    start = time.time()
    for T in (int(x) for x in args.seqs.split(",")):
        for shape in args.shapes.split(","):
            if args.deadline is not None and time.time() - start > args.deadline:
                print(f"skipped {shape} T={T}: past the deadline", file=sys.stderr, flush=True)
                meta.setdefault("skipped", []).append(f"{shape} T={T}")
                continue
            Hq, Hkv, D = (int(x) for x in shape.split("x"))
            new = time_shape(
                Hq, Hkv, D, T, args.window, kernels, do_bench, dms_attention, args.doc_length, args.bias_from
            )
            add_ratios(new)
            rows += new
            print(table(new).split("\n", 1)[1], f"   [{time.time() - start:.0f} s]", flush=True)
            if args.out:  # after every shape: a run cut by a time limit keeps what it measured
                with open(args.out, "w") as f:
                    json.dump({"meta": meta, "rows": rows}, f, indent=2)
    print(table(rows))


if __name__ == "__main__":
    main()
