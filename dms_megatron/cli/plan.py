"""Plan a retrofit run's GPU memory and step time before launching it (no GPU, no training).

    dms-plan experiment=r1_qwen_32b_cr8 --nodes 32 --gpus-per-node 8
    dms-plan experiment=smollm2_paper --json
    dms-plan model=qwen3_8b parallel.tp=4 parallel.pp=2 data.seq_length=16384 --dp 4 \\
        parallel.recompute=full
    dms-plan --hf-config /path/to/config.json parallel.tp=8 --dp 2

Positional ``key=value`` arguments are Hydra overrides of ``configs/retrofit.yaml``, composed and
validated exactly as ``dms-retrofit`` does (``RetrofitConfig``). The flags set what the training
config does not hold: the world size (``--nodes`` x ``--gpus-per-node``, or ``--dp``; default DP 1),
the norm implementation and the planner's assumptions
(``dms_megatron.plan.Assumptions``). The math is in ``dms_megatron/plan/``; docs/cluster.md walks
through it.

Exit status: 0 the plan fits (a warning on stderr when it is tight), 2 it does not fit (the report names
settings that would; ``--warn-only`` turns this into a warning and exit 0), 1 invalid configuration.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

from dms_megatron.cli import CONFIG_DIR
from dms_megatron.plan import (
    NORMS,
    Assumptions,
    format_plan,
    make_plan,
    plan_input_from_config,
)

ASSUMPTION_HELP = {
    "gpu_memory_gib": "GPU memory per device (H100 80GB: 79.6 GiB)",
    "fragmentation": "allocator overhead as a fraction of the allocated peak",
    "runtime_reserve_gib": "CUDA context and NCCL buffers outside the allocator",
    "warn_fraction": "warn when the plan uses more than this share of GPU memory",
    "kl_fp32_buffers": "fp32 [tokens, V/tp] buffers alive at the KD loss's peak",
    "working_layers": "backward working set, in layers of activations",
    "peak_tflops": "dense bf16 peak per GPU (H100 SXM: 989)",
    "matmul_efficiency": "achieved fraction of peak on GEMMs",
    "attention_efficiency": "achieved fraction of peak in DMS FlexAttention",
    "tp_bus_gbs": "tensor-parallel collective bus bandwidth, GB/s",
    "dp_bus_gbs": "data-parallel collective bus bandwidth, GB/s",
    "hbm_gbs": "GPU memory bandwidth, GB/s (H100 SXM: 3350)",
    "kd_bytes_per_logit": "memory traffic of the KD loss per [token, vocab/tp] logit, forward + backward "
    "(kd_backend=torch)",
    "kd_bytes_per_logit_triton": "the same with kd_backend=triton (the default on GPUs)",
    "optimizer_bytes_per_param": "memory traffic of the optimizer step per trainable parameter (GPU / DP)",
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="dms-plan",
        description="Per-GPU memory and step-time plan of a DMS retrofit run.",
        epilog="Positional key=value arguments are Hydra overrides (e.g. experiment=r1_qwen_32b_cr8).",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of configs/retrofit.yaml")
    world = parser.add_mutually_exclusive_group()
    world.add_argument("--dp", type=int, help="data-parallel size (default 1, or from --nodes)")
    world.add_argument("--nodes", type=int, help="nodes; DP = nodes x gpus-per-node / (TP x PP)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8; caps TP)")
    parser.add_argument(
        "--norm",
        choices=NORMS,
        default="torch",
        help="torch (the trainer's LocalNorm, fp32 weights), fused (bf16 norm weights or TE: not a "
        "trainer option yet)",
    )
    parser.add_argument(
        "--hf-config", type=Path, help="a Hugging Face config.json instead of model.hf_config"
    )
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("--warn-only", action="store_true", help="exit 0 even when the plan does not fit")
    defaults = Assumptions()
    for f in fields(Assumptions):
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            type=type(getattr(defaults, f.name)),
            default=getattr(defaults, f.name),
            help=f"{ASSUMPTION_HELP[f.name]} (default {getattr(defaults, f.name)})",
        )
    return parser.parse_intermixed_args(argv)  # overrides may come after flags


def compose(overrides: list[str], hf_config: Path | None):
    """configs/retrofit.yaml + overrides -> validated RetrofitConfig (no training is started)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from dms_megatron.config import RetrofitConfig

    with initialize_config_dir(version_base="1.3", config_dir=CONFIG_DIR):
        cfg = hydra_compose(config_name="retrofit", overrides=overrides)
    container = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(container, dict)
    if hf_config is not None:
        container["model"]["hf_config"] = json.loads(hf_config.read_text())
        container["model"]["name"] = hf_config.parent.name or hf_config.stem
    return RetrofitConfig.from_dict(container)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = compose(args.overrides, args.hf_config)
        model_parallel = cfg.parallel.tp * cfg.parallel.pp
        if args.nodes is not None:
            world = args.nodes * args.gpus_per_node
            if world % model_parallel:
                raise ValueError(
                    f"{args.nodes} nodes x {args.gpus_per_node} GPUs = {world} is not a multiple of "
                    f"TP x PP = {model_parallel}"
                )
            dp = world // model_parallel
        else:
            dp = 1 if args.dp is None else args.dp
        asm = Assumptions(**{f.name: getattr(args, f.name) for f in fields(Assumptions)})
        inp = plan_input_from_config(cfg, dp=dp, norm=args.norm)
        plan = make_plan(inp, asm, max_tp=args.gpus_per_node)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # Hydra's composition errors (unknown group or key)
        if type(exc).__module__.split(".")[0] in ("hydra", "omegaconf"):
            print(f"error: {exc}", file=sys.stderr)
            return 1
        raise
    print(json.dumps(plan.to_dict(), indent=2) if args.json else format_plan(plan))
    worst = plan.worst
    if not plan.fits:
        fixes = "; ".join(s.change for s in plan.suggestions) or "more GPUs"
        verb = "warning" if args.warn_only else "refused"
        print(
            f"{verb}: the plan needs {worst.reserved / 2**30:.1f} GiB on pipeline stage {worst.stage}, more "
            f"than the {asm.gpu_memory_gib:g} GiB of one GPU. Would fit: {fixes}",
            file=sys.stderr,
        )
        return 0 if args.warn_only else 2
    if plan.status == "tight":
        print(
            f"warning: the plan uses {worst.reserved / plan.capacity:.0%} of GPU memory on stage "
            f"{worst.stage} "
            "(estimates are +-10%)",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
