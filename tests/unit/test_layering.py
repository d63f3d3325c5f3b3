"""The import rules of docs/architecture.md, checked in fresh interpreters."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
FRAMEWORKS = ("megatron", "hydra", "omegaconf", "wandb", "transformers")

# package -> top-level dms_megatron subpackages it may import (besides itself)
ALLOWED = {
    "core": set(),
    "kernels": {"core"},
    "megatron": {"core", "kernels", "config", "families"},
    "config": {"core", "families", "runtime"},
    "families": set(),
    "convert": {"core", "config", "families", "megatron", "runtime", "hf"},  # hf: installs modeling_dms.py
    "training": {"core", "kernels", "config", "families", "megatron", "convert", "runtime"},
    "inference": {"core", "kernels", "config", "families", "convert"},  # serves exported checkpoints
    "runtime": set(),
    "hf": set(),  # modeling_dms.py is copied into checkpoints: torch + transformers only
    "plan": {"families", "config"},  # the memory/throughput planner: arithmetic only
    "testing": {"core", "kernels", "config", "families", "megatron", "runtime"},  # tiny GPT harness
    "cli": {
        "core",
        "kernels",
        "config",
        "families",
        "megatron",
        "convert",
        "training",
        "inference",
        "runtime",
        "hf",
        "plan",
    },  # the command-line tools: the top layer (Hydra only here)
}


def test_every_subpackage_has_rules():
    found = {p.name for p in (ROOT / "dms_megatron").iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    found |= {p.stem for p in (ROOT / "dms_megatron").glob("*.py") if p.stem != "__init__"}
    assert found <= set(ALLOWED), f"no import rules for {sorted(found - set(ALLOWED))}"


def test_importing_core_loads_no_framework():
    code = (
        "import sys, dms_megatron.core; "
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {FRAMEWORKS!r}); print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", f"dms_megatron.core pulled in: {out.stdout}"


def _imports(path: pathlib.Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layers_import_only_downward(layer):
    base = ROOT / "dms_megatron" / layer
    files = sorted(base.rglob("*.py")) if base.is_dir() else [base.with_suffix(".py")]
    files = [f for f in files if f.exists()]
    for f in files:
        for name in _imports(f):
            parts = name.split(".")
            if parts[0] == "dms_megatron" and len(parts) > 1 and parts[1] != layer:
                assert parts[1] in ALLOWED[layer], f"{f.relative_to(ROOT)} imports {name}"
            if layer not in ("megatron", "convert", "training", "testing"):
                assert parts[0] != "megatron", f"{f.relative_to(ROOT)} imports megatron"
            if layer != "cli":
                assert parts[0] not in ("hydra", "omegaconf"), f"{f.relative_to(ROOT)}: Hydra only in cli/"


def test_importing_the_inference_engine_loads_no_megatron():
    code = (
        "import sys, dms_megatron.inference.engine; "
        "bad = ('megatron', 'hydra', 'omegaconf', 'wandb'); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", f"dms_megatron.inference pulled in: {out.stdout}"
