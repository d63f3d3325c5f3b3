"""``benchmarks/host_overhead.py`` on the CPU: Triton's real JIT with a stand-in driver (kernels compiled
for sm_90, nothing launched), run in a fresh interpreter (the driver it installs must not leak into
other tests). The JIT path costs the host more than skipping every launch, and per launch of the
forward kernel the binder alone less than the JIT run, calling the compiled kernel less than either."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[2]


def test_host_time_splits_into_launch_path_and_the_rest() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"PYTHONPATH": str(ROOT)}
    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "host_overhead.py"), "--calls", "200"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(res.stdout.strip().splitlines()[-1])
    assert rows["fwd_kernel_parameters"] == 37
    assert rows["jit"] > rows["no_triton"] > 0, rows
    assert rows["fwd_launch_jit"] > rows["fwd_launch_binder"] > rows["fwd_launch_compiled"] > 0, rows
