"""Checkpoint conversion CLI: HF <-> Megatron distributed checkpoints, and a bit-exact round-trip check.

    dms-convert import    --hf HF_DIR --out CKPT_DIR [--tp 2 --pp 2] [--dms-variant adapter]
    dms-convert export    --ckpt CKPT_DIR --out HF_OUT [--tp 1 --pp 1] [--tokenizer HF_DIR]
    dms-convert roundtrip --hf HF_DIR --work WORK_DIR [--tp 2 --pp 2]

Conversion is CPU work: without torchrun the CLI starts tp*pp local processes (gloo) itself; under
torchrun/srun it uses the given ranks. Outputs are written to a staging folder and renamed into place
when complete; a non-empty output is refused unless --force.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from dms_megatron.runtime import TORCH_DTYPES, free_port, quiet_upstream_noise

quiet_upstream_noise()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("import", "export", "roundtrip"):
        p = sub.add_parser(name)
        p.add_argument(
            "--tp", type=int, default=1, help="tensor-parallel size of the processes doing the work"
        )
        p.add_argument(
            "--pp", type=int, default=1, help="pipeline-parallel size of the processes doing the work"
        )
        p.add_argument("--force", action="store_true", help="overwrite a non-empty output folder")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        if name in ("import", "roundtrip"):
            p.add_argument(
                "--hf", required=True, help="Hugging Face model folder (config.json + safetensors)"
            )
            p.add_argument("--dtype", choices=sorted(TORCH_DTYPES), default="bf16")
            p.add_argument("--dms-variant", choices=["none", "neuron", "adapter"], default="none")
            p.add_argument("--dms-window", type=int, default=256)
        if name == "import":
            p.add_argument("--out", required=True, help="Megatron checkpoint folder to write")
        if name == "export":
            p.add_argument(
                "--ckpt", required=True, help="Megatron checkpoint folder (from import or training)"
            )
            p.add_argument("--out", required=True, help="HF folder to write")
            p.add_argument(
                "--tokenizer", default=None, help="copy tokenizer files from here (default: source)"
            )
        if name == "roundtrip":
            p.add_argument("--work", required=True, help="folder for the intermediate checkpoint and export")
    args = ap.parse_args(argv)
    if args.tp < 1 or args.pp < 1:
        ap.error("--tp and --pp must be >= 1")
    return args


def _dms(args: argparse.Namespace):
    from dms_megatron.config import DMSConfig

    if getattr(args, "dms_variant", "none") == "none":
        return None
    return DMSConfig(variant=args.dms_variant, window=args.dms_window)


def compare_hf_folders(a: str | Path, b: str | Path) -> list[str]:
    """Names of tensors that differ (missing, shape, dtype or any bit) between two HF folders."""
    from dms_megatron.convert.hf_io import HFReader

    ra, rb = HFReader(a), HFReader(b)
    bad = sorted(set(ra.names()) ^ set(rb.names()))
    for name in sorted(set(ra.names()) & set(rb.names())):
        x, y = ra.get(name), rb.get(name)
        if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x, y):
            bad.append(name)
    return bad


def work(rank: int, args: argparse.Namespace) -> None:
    from dms_megatron.convert.checkpoint import export_hf, import_hf

    progress = not args.quiet
    if args.cmd == "import":
        import_hf(
            args.hf, args.out, args.tp, args.pp, _dms(args), TORCH_DTYPES[args.dtype], args.force, progress
        )
    elif args.cmd == "export":
        export_hf(args.ckpt, args.out, args.tp, args.pp, args.tokenizer, args.force, progress)
    else:
        work_dir = Path(args.work)
        ckpt, out = work_dir / "megatron", work_dir / "hf_export"
        import_hf(args.hf, ckpt, args.tp, args.pp, _dms(args), TORCH_DTYPES[args.dtype], args.force, progress)
        export_hf(ckpt, out, args.tp, args.pp, None, args.force, progress)
        if rank == 0:
            bad = compare_hf_folders(args.hf, out)
            report = {"source": args.hf, "export": str(out), "tp": args.tp, "pp": args.pp, "mismatched": bad}
            print(json.dumps(report, indent=2))
            if bad:
                raise SystemExit(f"round trip is NOT bit-exact for {len(bad)} tensors")
            print("round trip bit-exact for every tensor")


def _spawned(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        work(rank, args)
    finally:
        torch.distributed.destroy_process_group()


def preflight(args: argparse.Namespace) -> None:
    """Validate the input of an import (or a round trip's import) before any rank starts."""
    from dms_megatron.convert.checkpoint import check_import

    if args.cmd == "export":
        return
    out = args.out if args.cmd == "import" else Path(args.work) / "megatron"
    try:
        check_import(args.hf, out, args.tp, args.pp, _dms(args), args.force)
    except (ValueError, FileExistsError, FileNotFoundError) as exc:
        raise SystemExit(f"error: {exc}") from None


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    world = args.tp * args.pp
    preflight(args)
    if "WORLD_SIZE" in os.environ:  # torchrun / srun with the rank variables set
        torch.distributed.init_process_group("gloo")
        if torch.distributed.get_world_size() != world:
            raise SystemExit(
                f"--tp {args.tp} --pp {args.pp} needs {world} processes, got {os.environ['WORLD_SIZE']}"
            )
        work(torch.distributed.get_rank(), args)
        torch.distributed.destroy_process_group()
        return
    torch.multiprocessing.spawn(_spawned, args=(world, free_port(), args), nprocs=world, join=True)


if __name__ == "__main__":
    main()
