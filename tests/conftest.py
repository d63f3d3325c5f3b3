"""Session-wide pytest setup: the header names the versions this run tests (CI logs show which
transformers the remote-code tests ran under: the locked one, or the oldest supported one layered over
it by ``make test-transformers-oldest``)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

REPORTED = ("torch", "megatron-core", "transformers", "huggingface-hub", "tokenizers", "safetensors")


def pytest_report_header() -> str:
    found = []
    for name in REPORTED:
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            found.append(f"{name} (not installed)")
    return "dms_megatron stack: " + ", ".join(found)
