"""Runs the Triton DMS attention under the Triton interpreter on CPU and prints, as JSON, the largest
error of its output and of its four gradients against the float64 reference, for a seeded set of shapes.

Started by ``test_triton_attention.py`` in a fresh interpreter (``interpreter_setup``: the interpreter
must be on before the kernels are defined).
"""

from __future__ import annotations

import json
import random
import sys

import interpreter_setup  # noqa: F401  (TRITON_INTERPRET=1 before any kernel exists)
import torch

from dms_megatron.core.attention import dms_attention_reference
from dms_megatron.kernels import dms_attention, triton_dms


def cases(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        T = rng.randint(17, 70)
        window = [0, 1, rng.randint(2, 40), T + 5][i % 4]
        out.append(
            {
                "B": rng.choice([1, 2]),
                "Hkv": rng.choice([1, 2]),
                "g": rng.choice([1, 2, 3]),
                "T": T,
                "D": rng.choice([16, 32]),
                "Dv": rng.choice([16, 32]),
                "window": window,
                "docs": i % 3 == 1,
                "bias": i % 5 != 4,
                "seed": seed * 100 + i,
            }
        )
    return out


def errors(case: dict, dtype: torch.dtype = torch.float32) -> tuple[list[float], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(case["seed"])
    B, Hkv, T = case["B"], case["Hkv"], case["T"]
    Hq = Hkv * case["g"]
    q = torch.randn(B, Hq, T, case["D"], generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, T, case["D"], generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, T, case["Dv"], generator=g, dtype=torch.float64)
    if case.get("strided"):  # Megatron's layout: [B, T, H, D] storage seen as [B, H, T, D]
        q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    relaxed = torch.randn(B, Hkv, T, generator=g, dtype=torch.float64) * 3 if case["bias"] else None
    doc_ids = None
    if case["docs"]:
        cuts = torch.randint(1, T, (3,), generator=g)
        doc_ids = (torch.arange(T)[None, :] >= cuts[:, None]).sum(0)  # contiguous runs, some empty
    dout = torch.randn(B, Hq, T, case["Dv"], generator=g, dtype=torch.float64)
    leaves = [x for x in (q, k, v, relaxed) if x is not None]
    for x in leaves:
        x.requires_grad_(True)
    ref = dms_attention_reference(q, k, v, relaxed, case["window"], doc_ids=doc_ids)
    ref_grads = torch.autograd.grad(ref, leaves, dout)
    xs = [x.detach().to(dtype if x is not relaxed else torch.float32).requires_grad_(True) for x in leaves]
    if case.get("strided"):
        assert not any(x.is_contiguous() for x in xs[:3])
    rel = xs[3] if relaxed is not None else None
    out = dms_attention(xs[0], xs[1], xs[2], rel, case["window"], doc_ids=doc_ids, backend="triton")
    grads = torch.autograd.grad(out, xs, dout.to(dtype))
    errs = [float((out.double() - ref).abs().max())]
    errs += [float((a.double() - b).abs().max()) for a, b in zip(grads, ref_grads, strict=True)]
    return errs, [out.detach(), *grads]


def cuda_tile_cases(seed: int) -> list[tuple[int, dict]]:
    """(head-dim class, case) pairs at the CUDA defaults' tiles: lengths off their 64 / 128 grid, GQA
    groups of 1, 4 and 5, documents, and the window kinds (0, 1, a band, >= T)."""
    rng = random.Random(seed)
    out = []
    for i, (width, window) in enumerate([(128, 64), (128, 1), (64, 0), (64, None)]):
        T = rng.randint(150, 400)
        case = {"B": 1, "Hkv": 1, "g": [5, 1, 4, 5][i], "T": T, "D": width, "Dv": width,
                "window": T + 1 if window is None else window, "docs": i != 2, "bias": True,
                "seed": seed * 100 + i}  # fmt: skip
        out.append((width, case))
    return out


def main() -> None:
    n, seed, n_other, n_repeat = (int(x) for x in sys.argv[1:5])
    report: dict = {"default_blocks": [], "other_blocks": [], "fp16": []}
    for i, case in enumerate(cases(n, seed)):
        errs, first = errors(case)
        row = {"case": case, "errors": errs}
        if i < n_repeat:  # run again: bitwise the same
            _, again = errors(case)
            row["bitwise_repeat"] = all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
        report["default_blocks"].append(row)
    # the GPU tilings' shape: query and key blocks of different sizes in each kernel
    # the CUDA defaults' tiles (64 x 64 up to 128 x 128, key block wider than query block in dK/dV)
    report["cuda_blocks"] = []
    for width, case in cuda_tile_cases(seed + 3):
        tiles = {kernel: {"blocks": o["blocks"]} for kernel, o in triton_dms._CUDA_LAUNCH[width].items()}
        triton_dms.LAUNCH_OVERRIDES.update(tiles)
        report["cuda_blocks"].append({"case": case, "errors": errors(case)[0]})
    triton_dms.LAUNCH_OVERRIDES.clear()
    # the fp32 inputs' CUDA tiles
    triton_dms.LAUNCH_OVERRIDES.update(
        {k: {"blocks": o["blocks"]} for k, o in triton_dms._FP32_LAUNCH.items()}
    )
    report["fp32_blocks"] = [{"case": case, "errors": errors(case)[0]} for case in cases(3, seed + 5)]
    triton_dms.LAUNCH_OVERRIDES.clear()
    other = {"fwd": (32, 16), "dkdv": (16, 32), "dq": (32, 16)}
    triton_dms.LAUNCH_OVERRIDES.update({kernel: {"blocks": blocks} for kernel, blocks in other.items()})
    for case in cases(n_other, seed + 1):
        report["other_blocks"].append({"case": case, "errors": errors(case)[0]})
    # tiles loaded through tensor descriptors (TMA on Hopper), contiguous and strided inputs
    report["tma"] = []
    described = []
    plain = triton_dms._descriptors

    def counting(setting, rows, *tensors):
        descs = plain(setting, rows, *tensors)
        described.append(all(d is not None for d in descs))
        return descs

    triton_dms._descriptors = counting
    triton_dms.LAUNCH_OVERRIDES.update(
        {k: {**o, "tma": True} for k, o in triton_dms.LAUNCH_OVERRIDES.items()}
    )
    for i, case in enumerate(cases(n_other, seed + 4)):
        case["strided"] = i % 2 == 1
        if case["strided"]:  # two heads and more than one row: the layout really differs
            case["Hkv"] = 2
        described.clear()
        errs = errors(case)[0]
        report["tma"].append(
            {"case": case, "errors": errs, "described": len(described) == 3 and all(described)}
        )
    triton_dms._descriptors = plain
    triton_dms.LAUNCH_OVERRIDES.clear()
    for case in cases(2, seed + 2):
        report["fp16"].append({"case": case, "errors": errors(case, torch.float16)[0]})
    print(json.dumps(report))


if __name__ == "__main__":
    main()
