"""Where a decode step of the batched engine spends its time (torch profiler, CUDA), on random
SmolLM2-135M-shaped weights: ``python benchmarks/profile_decode.py [--context N] [--batch B]``.

``--count-ops`` (CPU or CUDA, eager): the non-view torch ops and Triton launches of one decode step, by
the function of ours that issued them; on CUDA also the kernels launched per step. A kernel-fusion
change shows up here first, also on CPU (the Triton kernels under the interpreter):
``TRITON_INTERPRET=1 python benchmarks/profile_decode.py --device cpu --context 512 --batch 2 --count-ops
--backend fused``."""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VIEWS = {"view", "unsqueeze", "squeeze", "select", "permute", "t", "transpose", "slice", "expand", "alias"}
VIEWS |= {"_unsafe_view", "reshape", "as_strided", "detach", "split", "unbind", "split_with_sizes"}


def count_ops(step) -> tuple[Counter, Counter]:
    """Non-view torch ops of one call of ``step``: by op name, and by the dms_megatron function that
    issued them (the innermost frame in our package). A Triton kernel launch counts as one op
    (``triton:<kernel>``); the torch ops the Triton interpreter runs inside a kernel are not counted, so
    the count on CPU matches the launches a GPU would see."""
    import contextlib

    import triton.runtime.interpreter as interpreter
    import triton.runtime.jit as jit
    from torch.utils._python_dispatch import TorchDispatchMode

    by_op, by_site = Counter(), Counter()
    inside = [0]

    def site() -> str:
        ours = [f for f in traceback.extract_stack() if "dms_megatron" in f.filename]
        return f"{ours[-1].filename.split('dms_megatron/')[-1]}:{ours[-1].name}" if ours else "other"

    class _Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name not in VIEWS and not inside[0]:
                by_op[name] += 1
                by_site[site()] += 1
            return func(*args, **(kwargs or {}))

    def counted(run):
        def launch(self, *args, **kwargs):
            if not kwargs.get("warmup") and not inside[0]:
                by_op[f"triton:{getattr(self, '__name__', None) or self.fn.__name__}"] += 1
                by_site[site()] += 1
            inside[0] += 1
            try:
                return run(self, *args, **kwargs)
            finally:
                inside[0] -= 1

        return launch

    with contextlib.ExitStack() as undo:
        for cls in (jit.JITFunction, interpreter.InterpretedFunction):
            undo.callback(setattr, cls, "run", cls.run)
            cls.run = counted(cls.run)
        with _Count():
            step()
    return by_op, by_site


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":  # the Triton kernels on CPU: the tests' interpreter fix
        sys.path.insert(0, str(ROOT))
        import tests.unit.interpreter_setup  # noqa: F401
    import torch
    from decode_bench import random_smollm2
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from dms_megatron.inference.compressed_cache import CompressedKV

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--no-graphs", action="store_true")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--count-ops", action="store_true", help="ops (and CUDA kernels) per decode step")
    ap.add_argument(
        "--baseline-rows", type=int, default=0, help="also time BaselineKV steps with this many rows"
    )
    ap.add_argument("--backend", default="auto", help="CompressedKV decode backend: auto, triton, fused, ...")
    args = ap.parse_args()
    dev = args.device
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    model = random_smollm2(dev)
    if args.baseline_rows:
        from dms_megatron.inference.baseline_cache import BaselineKV

        base = copy.copy(model)
        base.dms = None
        rows = [("tova", 4.0), ("h2o", 8.0), ("streaming_llm", 4.0)] * args.baseline_rows
        for graphs in (True, False):  # the evaluation's CUDA-graph step, then eager (kernels counted)
            bkv = BaselineKV(base, rows[: args.baseline_rows], max_len=args.context + 8, cuda_graphs=graphs)
            toks = torch.zeros(args.baseline_rows, dtype=torch.long, device=dev)
            for _ in range(3):
                bkv.decode(toks)
            sync()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                bkv.decode(toks)
            sync()
            ms = (time.perf_counter() - t0) / args.steps * 1000
            kind = "CUDA graph" if graphs and dev == "cuda" else "eager"
            print(f"baseline step ({kind}): {ms:.2f} ms ({args.baseline_rows} rows, max_len {args.context})")
            if dev == "cuda" and not graphs:
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    bkv.decode(toks)
                    sync()
                gpu = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
                busy = sum(e.device_time for e in gpu) / 1000
                print(f"baseline step (eager): {len(gpu)} CUDA kernels, {busy:.2f} ms of kernel time")
            del bkv
    cache = CompressedKV(
        model,
        num_blocks=args.batch * 90 * (args.context // 16 + 4),
        block_size=16,
        cuda_graphs=not (args.no_graphs or args.count_ops),  # counting needs the eager step
        backend=args.backend,
    )
    ids = torch.randint(0, 49152, (args.context + 64,), device=dev)
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
    if args.count_ops:
        by_op, by_site = count_ops(step)
        launches = sum(v for k, v in by_op.items() if k.startswith("triton:"))
        total = sum(by_op.values())
        print(
            f"ops per decode step (eager, backend {cache.backend}): {total} = {total - launches} torch ops "
            f"(non-view) + {launches} Triton launches"
        )
        print("by function:", ", ".join(f"{k} {v}" for k, v in by_site.most_common()))
        print("by op:", ", ".join(f"{k} {v}" for k, v in by_op.most_common(25)))
        if dev == "cuda":
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                step()
            kernels = sum(1 for e in prof.events() if e.device_type == DeviceType.CUDA)
            print(f"CUDA kernels per decode step (eager): {kernels}")
        return
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    print(f"decode step: {(time.perf_counter() - t0) / args.steps * 1000:.2f} ms (batch {args.batch})")
    if args.no_profile or dev != "cuda":
        return
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=30, max_name_column_width=40))
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=40))


if __name__ == "__main__":
    main()
