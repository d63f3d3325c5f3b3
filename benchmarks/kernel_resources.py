"""Resources of the Triton DMS attention kernels on Hopper, found without a GPU.

Each kernel (forward, dK/dV, dQ) is compiled ahead of time for ``sm_90`` with the ptxas that ships with
Triton, at the launch settings the wrapper would use (``kernels.triton_dms._launch``, or ``--setting``
JSON overriding them), and its shared memory (dynamic, from Triton's metadata), registers per thread and
spill stack per thread (from ``cuobjdump -res-usage``) are printed. A setting needing more shared memory
than an H100 block may use cannot launch; a large stack means registers spilled to local memory (slow):
both show here before any GPU time is spent.

    python benchmarks/kernel_resources.py                      # defaults: bf16 / fp32, head dims 64 / 128
    python benchmarks/kernel_resources.py --dtypes fp32 --dims 128 --setting '{"fwd": {"blocks": [64, 32]}}'
    python benchmarks/kernel_resources.py --decode             # also the decode kernel (kernels.fused_decode)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

H100_SHARED_LIMIT = 232448  # bytes of shared memory one block may use on sm_90 (Triton's error message)
KERNELS = {"fwd": "_fwd_kernel", "dkdv": "_bwd_dkdv_kernel", "dq": "_bwd_dq_kernel"}
_FP32_POINTERS = {"LK", "LSE", "DELTA", "DLK"}
_INT_POINTERS = {"DS", "DE"}
_DESCRIPTORS = {"KD", "VD", "QD", "DOD"}
_FLOATS = {"qk_scale", "scale"}


def _signature(kernel, dtype: str, shares_fp32: bool, constants: dict) -> tuple[dict, dict]:
    """Triton signature and constexpr values of ``kernel`` for ``dtype`` ("bf16" / "fp16" / "fp32")
    tensors; dK / dV shares in fp32 when a GQA group's shares are summed after the kernel."""
    signature, constexprs = {}, {}
    for i, (name, param) in enumerate(zip(kernel.arg_names, kernel.params, strict=True)):
        if param.is_constexpr:
            signature[name], constexprs[(i,)] = "constexpr", constants[name]
        elif name in _DESCRIPTORS:  # no TMA: the descriptor arguments are None
            signature[name], constexprs[(i,)] = "constexpr", None
        elif name in _FP32_POINTERS or (name in ("DK", "DV_") and shares_fp32):
            signature[name] = "*fp32"
        elif name in _INT_POINTERS:
            signature[name] = "*i32"
        elif name[0].isupper() and name != "T":  # T: the sequence length
            signature[name] = f"*{dtype}"
        else:
            signature[name] = "fp32" if name in _FLOATS else "i32"
    return signature, constexprs


def _res_usage(cubin: bytes) -> dict:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", text)
    if not found:
        raise RuntimeError(f"no resource usage in cuobjdump's output: {text[-300:]}")
    return {"registers": int(found.group(1)), "stack_bytes": int(found.group(2))}


def kernel_resources(
    kernel: str,
    dtype: str,
    head_dim: int,
    setting: dict,
    groups: int = 4,
    bias: bool = True,
    docs: bool = False,
) -> dict:
    """Compile one kernel (``"fwd"``, ``"dkdv"``, ``"dq"``) for sm_90 at ``setting`` (``blocks`` and Triton's
    launch options) and return its shared memory, registers and spill stack."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dms_megatron.kernels import triton_dms

    fn = getattr(triton_dms, KERNELS[kernel])
    bm, bn = setting["blocks"]
    constants = {
        "HQ": groups, "G": groups, "D": head_dim, "DV": head_dim, "HAS_BIAS": bias, "HAS_DOCS": docs,
        "PRECISION": "ieee" if dtype == "fp32" else "tf32", "TMA": False, "BM": bm, "BN": bn,
    }  # fmt: skip
    signature, constexprs = _signature(fn, dtype, groups > 1, constants)
    options = {k: v for k, v in setting.items() if k in ("num_warps", "num_stages")}
    compiled = triton.compile(
        ASTSource(fn=fn, signature=signature, constexprs=constexprs),
        target=GPUTarget("cuda", 90, 32),
        options=options,
    )
    row = {"kernel": kernel, "dtype": dtype, "head_dim": head_dim, "setting": setting}
    row["shared_bytes"] = int(compiled.metadata.shared)
    row |= _res_usage(compiled.asm["cubin"])
    row["fits"] = row["shared_bytes"] <= H100_SHARED_LIMIT
    return row


_DECODE_POINTERS = {
    "TABLE": "*i32", "LENS": "*i32", "RLENS": "*i32", "ARRIVED": "*i32",
    "ACC": "*fp32", "M": "*fp32", "L": "*fp32", "OUT": "*fp32", "LSE": "*fp32",  # partials, results
}  # fmt: skip


def decode_resources(dtype: str, head_dim: int, ring: bool = True, block_size: int = 16) -> dict:
    """Compile ``fused_decode.decode_split_kernel`` (GQA groups up to 16, with the window ring or, as the
    paged triton backend, without it and writing log-sum-exp) for sm_90; its resources, plus what the PTX
    holds of the in-kernel merge's memory ordering: the arrival atomic's semantics, L1-bypassing loads of
    the other programs' partials, block barriers."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dms_megatron.kernels import fused_decode

    fn = fused_decode.decode_split_kernel
    constants = {
        "BLOCK_SIZE": block_size, "D": head_dim, "DV": head_dim, "BLOCK_G": 16, "HAS_RING": ring,
        "TILE": fused_decode.TOKENS_PER_TILE, "PRECISION": "ieee" if dtype == "fp32" else "tf32",
        "WRITE_LSE": not ring,
    }  # fmt: skip
    signature, constexprs = {}, {}
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params, strict=True)):
        if param.is_constexpr:
            signature[name], constexprs[(i,)] = "constexpr", constants[name]
        elif name in _DECODE_POINTERS:
            signature[name] = _DECODE_POINTERS[name]
        elif name in ("Q", "K", "V", "RK", "RV"):
            signature[name] = f"*{dtype}"
        else:
            signature[name] = "fp32" if name == "scale" else "i32"
    compiled = triton.compile(
        ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32)
    )
    ptx = compiled.asm["ptx"]
    row = {"kernel": "decode" if ring else "decode_no_ring", "dtype": dtype, "head_dim": head_dim}
    row["setting"] = {"block_size": block_size, "block_g": 16}
    row["shared_bytes"] = int(compiled.metadata.shared)
    row |= _res_usage(compiled.asm["cubin"])
    row["fits"] = row["shared_bytes"] <= H100_SHARED_LIMIT
    row["atomics"] = sorted(set(re.findall(r"atom\.[a-z0-9_.]+", ptx)))
    row["l1_bypassing_loads"] = len(re.findall(r"ld\.global\.cg", ptx))
    row["barriers"] = len(re.findall(r"\bbar(?:rier)?\.sync", ptx))
    return row


def default_rows(dtypes: list[str], dims: list[int], overrides: dict | None = None) -> list[dict]:
    """Every kernel at the wrapper's CUDA launch settings (plus ``overrides``, as LAUNCH_OVERRIDES)."""
    from dms_megatron.kernels import triton_dms

    rows = []
    for dtype in dtypes:
        for dim in dims:
            launch = triton_dms._launch(dim, dim, interpret=False, fp32=dtype == "fp32")
            for kernel in KERNELS:
                setting = {**launch[kernel], **(overrides or {}).get(kernel, {})}
                rows.append(kernel_resources(kernel, dtype, dim, setting))
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        f"{'dtype':>5} {'D':>4} {'kernel':>14} {'setting':<52} {'shared B':>9} {'regs':>5} {'stack B':>8}"
    ]
    for r in rows:
        setting = json.dumps(r["setting"], sort_keys=True)
        lines.append(
            f"{r['dtype']:>5} {r['head_dim']:>4} {r['kernel']:>14} {setting:<52} {r['shared_bytes']:>9} "
            f"{r['registers']:>5} {r['stack_bytes']:>8}{'' if r['fits'] else '  does not fit an H100'}"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", default="bf16,fp32", help="comma-separated: bf16, fp16, fp32")
    ap.add_argument("--dims", default="64,128", help="comma-separated head dims")
    ap.add_argument(
        "--setting", default=None, help="JSON per kernel overriding the defaults, as LAUNCH_OVERRIDES"
    )
    ap.add_argument("--out", default=None, help="JSON file")
    ap.add_argument("--decode", action="store_true", help="also the decode kernel (fused_decode)")
    args = ap.parse_args()
    overrides = json.loads(args.setting) if args.setting else None
    dtypes, dims = args.dtypes.split(","), [int(d) for d in args.dims.split(",")]
    rows = default_rows(dtypes, dims, overrides)
    if args.decode:
        rows += [decode_resources(t, d, ring) for t in dtypes for d in dims for ring in (True, False)]
    print(table(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)
    sys.exit(0 if all(r["fits"] for r in rows) else 1)


if __name__ == "__main__":
    main()
