"""pytest setup for the Megatron CPU harness tests (tests/megatron).

This directory deliberately has no ``__init__.py``: megatron-core's ``megatron`` is a namespace package,
and a regular package ``tests/megatron`` could shadow it. pytest (prepend import mode) puts this directory on
``sys.path``, so the helpers import as top-level modules (``runner``, ``dms_jobs``); spawned
ranks inherit that ``sys.path``. All distributed work runs in spawned ranks; this process never initialises
``torch.distributed`` and does not keep the CPU shim on (``test_patches.py`` enters and leaves it). The
ranks are pooled for the session (see ``runner``), stopped after the last test here or at the end of the
session (``_stop_pooled_ranks``).
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))  # also works under --import-mode=importlib

_HAVE_MEGATRON = importlib.util.find_spec("megatron.core") is not None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test in this directory ``megatron``; skip them if megatron-core is not installed."""
    skip = pytest.mark.skip(reason="megatron-core is not installed")
    for item in items:
        if _HERE in item.path.resolve().parents:
            item.add_marker(pytest.mark.megatron)
            if not _HAVE_MEGATRON:
                item.add_marker(skip)


def _shutdown_pool() -> None:
    runner = sys.modules.get("runner")  # imported by the tests that ran jobs; nothing to stop otherwise
    if runner is not None:
        runner.shutdown_pool()


@pytest.fixture(scope="session", autouse=True)
def _stop_pooled_ranks() -> Iterator[None]:
    """Stop runner's pooled rank processes when the session ends (also after failures and Ctrl-C)."""
    yield
    _shutdown_pool()


def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """Stop the pooled ranks after this directory's last test: in ``pytest tests`` they would sit idle
    (~0.8 GB each) through the other directories' tests."""
    if nextitem is None or _HERE not in nextitem.path.resolve().parents:
        _shutdown_pool()


@pytest.fixture(autouse=True)
def _no_distributed_in_pytest_process() -> Iterator[None]:
    """Fail a test that initialised torch.distributed in the pytest process (use runner.run_distributed)."""
    yield
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        pytest.fail("torch.distributed was initialised in the pytest process; run it in spawned ranks")
