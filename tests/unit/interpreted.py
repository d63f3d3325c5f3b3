"""Run a kernel-check script under the Triton interpreter in a fresh Python (no side effect here: the
interpreter must never be switched on in the test process itself)."""

from __future__ import annotations

import os


def run_interpreted(script: str, *args: object) -> dict:
    """Run ``tests/unit/<script>`` in a fresh interpreter (the kernels under ``TRITON_INTERPRET=1``)
    and return the JSON report it prints last; the script's stderr on failure."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(here.parents[1])}
    res = subprocess.run(
        [sys.executable, str(here / script), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=here.parents[1],
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])
