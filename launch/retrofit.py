"""Retrofit a model with DMS: ``python launch/retrofit.py [overrides]`` (one process), or under
``torchrun`` / ``srun`` with one process per GPU. The only Hydra code of the project.

    python launch/retrofit.py experiment=smollm2_cr8 dms.target_cr=4 train.steps=300
    torchrun --nproc-per-node 8 launch/retrofit.py experiment=r1_qwen_32b_cr8 parallel.pp=1
    python launch/retrofit.py -m dms.target_cr=4,8        # a sweep, one run directory per job

Composes ``configs/`` (groups: model, dms, parallel, data, train, logging, experiment), validates it
into ``RetrofitConfig`` (unknown keys and bad values fail before any process group or GPU work), and
calls ``dms_megatron.training.run.run_retrofit``.
"""

from __future__ import annotations

import logging
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from dms_megatron.runtime import quiet_missing_accelerators  # noqa: E402

quiet_missing_accelerators()


@hydra.main(version_base="1.3", config_path="../configs", config_name="retrofit")
def main(cfg: DictConfig) -> dict:
    from dms_megatron.config import RetrofitConfig
    from dms_megatron.training.run import run_retrofit

    logging.getLogger("megatron").setLevel(logging.WARNING)
    container = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(container, dict)
    retrofit = RetrofitConfig.from_dict(container)
    summary = run_retrofit(retrofit, container, sys.argv)
    if int(os.environ.get("RANK", "0")) == 0:
        done = "finished" if summary["finished"] else "stopped (preempted)"
        print(
            f"retrofit {done} at step {summary['step']}: KD {summary['kd']:.4g}, "
            f"CR target {summary['cr_target']:.3g} / achieved {summary['cr_achieved']:.3g} "
            f"(window-adjusted {summary['cr_window_adjusted']:.3g}), {summary['wall_s']:.0f} s; "
            f"checkpoint {summary['checkpoint']}"
        )
    return summary


if __name__ == "__main__":
    main()
