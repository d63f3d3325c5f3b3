"""Retrofit a model with DMS: ``dms-retrofit [overrides]`` (one process), or under
``torchrun`` / ``srun`` with one process per GPU. The only Hydra code of the project.

    dms-retrofit experiment=smollm2_cr4 dms.target_cr=6 train.steps=300
    dms-retrofit -v experiment=smollm2_cr4  # also show the known upstream warnings
    torchrun --nproc-per-node 8 launch/retrofit.py experiment=r1_qwen_32b_cr8 parallel.pp=1
    dms-retrofit -m dms.target_cr=4,8        # a sweep, one run directory per job
    dms-retrofit --print-config experiment=r1_qwen_32b_cr8 dms.target_cr=4
    dms-retrofit --print-config=run_dir experiment=r1_qwen_32b_cr8
    dms-retrofit --world-size=256 --print-config experiment=r1_qwen_32b_cr8  # also check the layout fits

Composes ``configs/`` (groups: model, dms, parallel, data, train, logging, experiment), validates it
into ``RetrofitConfig`` (unknown keys and bad values fail before any process group or GPU work), and
calls ``dms_megatron.training.run.run_retrofit``, which first prints what it is about to run (model,
layout, recipe, memory-CR target, run dir). Known, harmless torch/megatron warnings are hidden
(``dms_megatron.runtime.quiet_upstream_noise``, each with its reason); ``-v`` shows them.

``--print-config`` composes and validates the same config with Hydra's compose API, prints it resolved
as YAML (``--print-config=KEY``: one value, e.g. ``run_dir``) and exits without starting anything; the
Slurm scripts use it for ``DRY_RUN=1`` and to find the run directory. (Hydra's own ``--cfg job --resolve``
prints the composed config too, but does not validate it.) ``--world-size=N`` also checks that N
processes fit the layout (a multiple of TP x PP, the global batch a multiple of micro batch x DP).
"""

from __future__ import annotations

import json
import logging
import os
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from dms_megatron.cli import CONFIG_DIR
from dms_megatron.runtime import SHOW_UPSTREAM_ENV, quiet_upstream_noise

VERBOSE_FLAGS = ("-v", "--verbose")  # ours, taken out before Hydra parses the command line


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="retrofit")
def retrofit(cfg: DictConfig) -> dict:
    from dms_megatron.config import RetrofitConfig
    from dms_megatron.training.run import run_retrofit

    logging.getLogger("megatron").setLevel(logging.WARNING)
    container = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(container, dict)
    retrofit = RetrofitConfig.from_dict(container)
    summary = run_retrofit(retrofit, container, sys.argv)
    if int(os.environ.get("RANK", "0")) == 0:
        done = "finished" if summary["finished"] else "stopped (preempted)"
        if summary["kd"] is None:  # resumed from the final checkpoint (e.g. a requeued job): no step ran
            print(f"retrofit {done} at step {summary['step']}: no step to run, {summary['wall_s']:.0f} s")
        else:
            print(
                f"retrofit {done} at step {summary['step']}: KD {summary['kd']:.4g}, "
                f"memory CR at {summary['cr_context']} tokens: target {summary['cr_target']:.3g} / reached "
                f"{summary['cr_memory']:.3g} (decision rate {summary['cr_decision_rate']:.3g}), "
                f"{summary['wall_s']:.0f} s; "
                f"checkpoint {summary['checkpoint']}"
            )
    return summary


PRINT_CONFIG = "--print-config"
WORLD_SIZE = "--world-size"


def print_config(args: list[str]) -> int:
    """``--print-config[=KEY] [overrides]``: the validated, resolved config of a run with these overrides
    as YAML (or the value at the dotted ``KEY``) on stdout; errors on stderr with exit status 2."""
    import yaml
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from dms_megatron.config import RetrofitConfig

    key = None
    world_size = None
    overrides = []
    for arg in args:
        if arg == PRINT_CONFIG:
            continue
        if arg.startswith(PRINT_CONFIG + "="):
            key = arg.split("=", 1)[1]
        elif arg.startswith(WORLD_SIZE + "="):
            value = arg.split("=", 1)[1]
            if not value.isdigit():
                print(f"error: {arg}: expected a positive integer", file=sys.stderr)
                return 2
            world_size = int(value)
        elif arg in ("-m", "--multirun") or arg.startswith("--"):
            print(f"error: {arg} cannot be combined with {PRINT_CONFIG}", file=sys.stderr)
            return 2
        else:
            overrides.append(arg)
    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose(config_name="retrofit", overrides=overrides)
        container = OmegaConf.to_container(cfg, resolve=True)
        assert isinstance(container, dict)
        retrofit = RetrofitConfig.from_dict(container)
        if world_size is not None:
            retrofit.check_world_size(world_size)
        missing = object()
        value = (
            container if key is None else OmegaConf.select(OmegaConf.create(container), key, default=missing)
        )
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if value is missing:
        print(f"error: {key} is not a key of the composed config", file=sys.stderr)
        return 2
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value)
    if isinstance(value, dict | list):
        print(yaml.safe_dump(value, sort_keys=False), end="")
    else:  # a string as it is (a path for the Slurm scripts), other scalars as YAML/JSON (null, true, 4.0)
        print(value if isinstance(value, str) else json.dumps(value))
    return 0


def main() -> None:
    """``dms-retrofit``: ``-v`` and ``--print-config`` are ours; everything else goes to Hydra."""
    if any(a in VERBOSE_FLAGS for a in sys.argv[1:]):
        os.environ[SHOW_UPSTREAM_ENV] = "1"  # also for the ranks torchrun starts from this command line
        sys.argv = [a for a in sys.argv if a not in VERBOSE_FLAGS]
    quiet_upstream_noise()
    if any(a == PRINT_CONFIG or a.startswith(PRINT_CONFIG + "=") for a in sys.argv[1:]):
        sys.exit(print_config(sys.argv[1:]))
    retrofit()


if __name__ == "__main__":
    main()
