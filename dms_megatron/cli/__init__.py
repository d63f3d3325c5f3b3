"""The command-line tools (``[project.scripts]`` in pyproject.toml): ``dms-retrofit``, ``dms-convert``,
``dms-preprocess``, ``dms-evaluate``, ``dms-generate``, ``dms-plan``, ``dms-demo``. The only layer that
imports Hydra; nothing in the package imports it. ``launch/*.py`` in a source checkout are shims that
call the same ``main`` (``torchrun launch/retrofit.py`` and the Slurm scripts use them).
"""

from __future__ import annotations

from pathlib import Path

# the Hydra config tree, shipped inside the package (``configs/`` at the repository root links here)
CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")
