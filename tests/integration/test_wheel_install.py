"""The package installs like a tool: the wheel carries the code and the Hydra configs, and every
``[project.scripts]`` entry point answers ``--help`` from another directory, importing the installed
copy (not this checkout)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _scripts() -> list[str]:
    return sorted(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])


def test_wheel_installs_and_every_entry_point_answers_help(tmp_path: Path) -> None:
    # built from a copy: setuptools builds inside the source tree, and a build/ left in the checkout
    # would feed stale modules into later wheels
    src = tmp_path / "src"
    shutil.copytree(ROOT / "dms_megatron", src / "dms_megatron", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    wheels = tmp_path / "wheels"
    build = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "-q",
        "--no-deps",
        "--no-build-isolation",
        "-w",
        str(wheels),
    ]
    subprocess.run([*build, str(src)], check=True, capture_output=True, timeout=300)
    (wheel,) = wheels.glob("dms_megatron-*.whl")
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    site = Path(
        subprocess.check_output(
            [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
        ).strip()
    )
    # the dependencies (torch, megatron-core, ...) come from this interpreter's site-packages, after the
    # venv's own: a path line, so this checkout's editable-install hook is not run there
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = [sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-index"]
    subprocess.run([*install, str(wheel)], check=True, capture_output=True, timeout=300)
    where = subprocess.run(
        [py, "-c", "import dms_megatron.cli as c; print(c.__file__); print(c.CONFIG_DIR)"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert all(p.startswith(str(env_dir)) for p in where), where
    assert (Path(where[1]) / "experiment" / "smollm2_cr4.yaml").is_file()
    env = dict(os.environ, PYTHONPATH="")
    names = _scripts()
    assert {
        "dms-retrofit",
        "dms-convert",
        "dms-preprocess",
        "dms-evaluate",
        "dms-generate",
        "dms-plan",
    } <= set(names)
    for name in names:
        out = subprocess.run(
            [env_dir / "bin" / name, "--help"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, f"{name} --help: {out.stderr[-2000:]}"
        text = out.stdout.lower()
        assert "usage" in text or "powered by hydra" in text or "pipeline" in text, (
            f"{name}: {out.stdout[:500]}"
        )
    # the retrofit's config composes from the installed package
    out = subprocess.run(
        [env_dir / "bin" / "dms-retrofit", "--print-config=dms.window", "experiment=smollm2_cr4"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0 and out.stdout.strip() == "256", out.stderr[-2000:]
