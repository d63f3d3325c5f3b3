"""Where the host's time goes when it issues one DMS Triton attention forward + backward, on a CPU.

The fused attention's short calls were host-bound on H100 hosts (docs/benchmarks.md); this splits the
host's work without a GPU. Triton is given a stand-in driver: kernels compile for sm_90 with Triton's
own JIT (binder, specialisation, cache) and its launcher records nothing and launches nothing, so the
timings are everything but the GPU driver's own launch call. Rows (median microseconds per call,
inputs 1 x 5 x 64 x 128 bf16 queries, 1 KV head, the log-keep bias given):

- ``no_triton``: forward + backward with every Triton launch of ``kernels.triton_dms`` skipped (the
  autograd function, the wrapper, allocations, autograd's own work);
- ``jit``: the same through Triton's JIT launch path (4 launches: forward, dQ, dK/dV, group sums);
- per launch of the forward kernel (37 parameters): ``JITFunction.run`` on a compiled kernel, its
  binder alone (binding + specialisation), and calling the compiled kernel directly.

    python benchmarks/host_overhead.py [--calls 2000] [--out host_overhead.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch


class _Utils:
    def load_binary(self, name, kernel, shared, device):
        return 1, 1, 0, 0, 1024  # module, function, registers, spills, max threads

    def get_device_properties(self, device):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132}


class StandInDriver:
    """Triton's active driver: compiles for sm_90; the compiled kernels' launcher does nothing."""

    utils = _Utils()

    def __init__(self) -> None:
        self.launcher_cls = lambda src, metadata: lambda *args: None

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int) -> int:
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)


def median_us(fn, calls: int) -> float:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1e6, 2)


def measure(calls: int = 2000) -> dict:
    """The rows of the module docstring, in microseconds."""
    os.environ.pop("TRITON_INTERPRET", None)
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    driver.set_active(StandInDriver())
    from attention_bench import no_triton_launches

    from dms_megatron.kernels import dms_attention, triton_dms

    triton_dms.require_triton_device = lambda *args, **kwargs: None  # CPU tensors; nothing launches
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 64, 128, generator=gen).bfloat16().requires_grad_() for h in (5, 1, 1))
    lk = torch.randn(1, 1, 64, generator=gen).requires_grad_()
    g = torch.randn(1, 5, 64, 128, generator=gen).bfloat16()

    def attention() -> None:
        dms_attention(q, k, v, None, 16, backend="triton", log_keep=lk).backward(g)

    captured: dict = {}
    run = JITFunction.run

    def capture(self, *args, **kwargs):  # the forward kernel's arguments, as the wrapper passes them
        if self is triton_dms._fwd_kernel:
            captured.update(
                args=args, kwargs={k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
            )
        return run(self, *args, **kwargs)

    JITFunction.run = capture
    attention()  # compiles the four kernels for sm_90
    JITFunction.run = run
    rows = {"jit": median_us(attention, calls)}
    with no_triton_launches(triton_dms):
        rows["no_triton"] = median_us(attention, calls)
    fwd, args, kwargs = triton_dms._fwd_kernel, captured["args"], captured["kwargs"]
    compiled = fwd[(1, 5)](*args, **kwargs)
    bound = fwd.device_caches[0][4](*args, **kwargs)[0]
    rows["fwd_launch_jit"] = median_us(lambda: fwd[(1, 5)](*args, **kwargs), 10 * calls)
    rows["fwd_launch_binder"] = median_us(lambda: fwd.device_caches[0][4](*args, **kwargs), 10 * calls)
    rows["fwd_launch_compiled"] = median_us(
        lambda: compiled.run(1, 5, 1, 0, compiled.function, compiled.packed_metadata, None, None, None,
                             *bound.values()),
        10 * calls,
    )  # fmt: skip
    rows["fwd_kernel_parameters"] = len(fwd.arg_names)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--out", default=None, help="JSON file")
    args = ap.parse_args()
    rows = measure(args.calls)
    print(json.dumps(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
