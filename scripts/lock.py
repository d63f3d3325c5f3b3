"""Write the dependency locks: ``constraints.txt`` and ``constraints-transformers-oldest.txt``.

    python scripts/lock.py            # or: make lock
    python scripts/lock.py --compare  # how the running environment differs from constraints.txt
    python scripts/lock.py --keep     # add what pyproject.toml newly needs, every existing pin unchanged

``constraints.txt`` pins every package, direct and indirect, that ``pip install -e ".[dev,assets]"``
installs: pip resolves the ranges of ``pyproject.toml`` (plus ``LOCK_PINS``) to the newest versions the
package index offers, as if nothing were installed (``--dry-run --ignore-installed --report``), and the
result is written sorted, one ``name==version`` per line. ``make setup`` and CI install with it, so two
machines get the same environment; the package metadata keeps its ranges for users who install the
package into their own environment.

``constraints-transformers-oldest.txt`` is the second, small environment CI tests the exported remote code
in: the same resolution with transformers at the oldest release the remote code supports
(``OLDEST_TRANSFORMERS`` of ``dms_megatron/hf/modeling_dms.py``), keeping only the packages whose version
differs from the main lock. ``make test-transformers-oldest`` installs them (``--no-deps``) into
``.venv-transformers-oldest/`` and puts that folder first on ``PYTHONPATH`` over the locked venv.

The locks are for Linux x86_64 and Python 3.12 (CI and the GPU machines). Regenerate them after a change
of ``pyproject.toml`` or ``LOCK_PINS``, or to move to newer releases on purpose (``make test-latest``
shows first what newer releases would do). ``--keep`` resolves with the current locks as constraints, so a
new dependency (and what it pulls in) is added at the newest release that fits while every package
already locked keeps its version.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAIN_LOCK = ROOT / "constraints.txt"
OLDEST_LOCK = ROOT / "constraints-transformers-oldest.txt"
EXTRAS = "dev,assets"
# torch as on the GPU machines (torch 2.11.0+cu130): the CPU suite and the GPU runs use the same release
LOCK_PINS = ("torch==2.11.0",)
TOOLS = ("pip",)  # locked too: bootstrap upgrades the venv's pip to the locked one first
PROJECT = "dms-megatron"


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def oldest_transformers() -> str:
    """The remote code's declared oldest transformers (one source: modeling_dms.py)."""
    text = (ROOT / "dms_megatron" / "hf" / "modeling_dms.py").read_text()
    found = re.search(r'^OLDEST_TRANSFORMERS = "([^"]+)"', text, re.M)
    if found is None:
        raise SystemExit("OLDEST_TRANSFORMERS not found in dms_megatron/hf/modeling_dms.py")
    return found[1]


def resolve(*extra: str, keep: dict[str, str] | None = None) -> dict[str, str]:
    """``{normalised name: version}`` of everything pip would install for the project plus ``extra``;
    ``keep``: versions pip must use for those packages (constraints)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        pip = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--quiet"]
        resolve_only = ["--dry-run", "--ignore-installed", "--report", str(report)]
        if keep:
            held = Path(tmp) / "keep.txt"
            held.write_text("".join(f"{name}=={version}\n" for name, version in keep.items()))
            resolve_only += ["-c", str(held)]
        cmd = [*pip, *resolve_only, "-e", f".[{EXTRAS}]", *TOOLS, *LOCK_PINS, *extra]
        subprocess.run(cmd, cwd=ROOT, check=True)
        items = json.loads(report.read_text())["install"]
    pins = {_norm(i["metadata"]["name"]): i["metadata"]["version"] for i in items}
    pins.pop(_norm(PROJECT), None)
    return dict(sorted(pins.items()))


def _write(path: Path, pins: dict[str, str], header: str) -> None:
    lines = [f"# {line}".rstrip() for line in header.strip().splitlines()]
    path.write_text("\n".join([*lines, *(f"{name}=={version}" for name, version in pins.items())]) + "\n")
    print(f"wrote {path.relative_to(ROOT)} ({len(pins)} packages)")


def read_lock(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[_norm(name)] = version
    return pins


def compare() -> int:
    """Print how the running environment differs from constraints.txt (the drift a re-lock would bring)."""
    from importlib.metadata import distributions

    installed = {_norm(d.metadata["Name"]): d.version for d in distributions()}
    locked = read_lock(MAIN_LOCK)
    rows = [
        (name, locked.get(name, "-"), installed.get(name, "-"))
        for name in sorted(set(locked) | set(installed))
        if locked.get(name) != installed.get(name) and name != _norm(PROJECT)
    ]
    print(f"{len(rows)} packages differ from constraints.txt (locked -> installed here):")
    for name, was, now in rows:
        print(f"  {name:40s} {was:>16s} -> {now}")
    return 0


def main() -> None:
    args = sys.argv[1:]
    if args == ["--compare"]:
        raise SystemExit(compare())
    if args not in ([], ["--keep"]):
        raise SystemExit("usage: python scripts/lock.py [--compare | --keep]")
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    if python != "3.12":
        raise SystemExit(f"lock with Python 3.12 (the project's interpreter), not {python}")
    held = held_oldest = None
    if args == ["--keep"]:
        held = read_lock(MAIN_LOCK)
        overlaid = read_lock(OLDEST_LOCK)  # free in the oldest resolution: it picks them again
        held_oldest = {n: v for n, v in held.items() if n not in overlaid}
    main_pins = resolve(keep=held)
    oldest = oldest_transformers()
    oldest_pins = resolve(f"transformers=={oldest}", keep=held_oldest)
    overlay = {n: v for n, v in oldest_pins.items() if main_pins.get(n) != v}
    if overlay.get("transformers") != oldest:
        raise SystemExit(f"the oldest resolution did not pick transformers {oldest}: {overlay}")
    source = "Generated by `make lock` (scripts/lock.py); do not edit by hand."
    _write(
        MAIN_LOCK,
        main_pins,
        f"""
Complete lock of dms_megatron[{EXTRAS}] for Python 3.12 on Linux x86_64: every direct and indirect
dependency. `make setup` and CI install with `-c constraints.txt`.
Inputs: the ranges of pyproject.toml, and {", ".join(LOCK_PINS)}.
{source}
""",
    )
    _write(
        OLDEST_LOCK,
        overlay,
        f"""
The packages that differ from constraints.txt when transformers is at the oldest release the exported
remote code supports ({oldest}). `make test-transformers-oldest` installs them (--no-deps) into
.venv-transformers-oldest/, layered over the locked .venv.
{source}
""",
    )


if __name__ == "__main__":
    main()
