"""The patch table (``dms_megatron/megatron/patches``): every entry checks out on the installed stack, the
check fails loudly on a changed target, and the context managers put back every original object.

These tests enter and leave ``cpu_training()`` / ``cpu_megatron()`` in the pytest process itself (no rank
needed): what they check is that nothing is left behind.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Iterable
from typing import Any

import pytest
import torch

from dms_megatron.megatron import patches
from dms_megatron.megatron.patches import (
    Patch,
    PatchTargetError,
    all_patches,
    apply_patch,
    apply_patches,
    check_patch_targets,
    is_applied,
)

needs_cpu_only = pytest.mark.skipif(
    torch.cuda.is_available(), reason="the CPU modes are for CPU-only machines"
)


def _attributes(entries: Iterable[Patch]) -> dict[tuple[int, str], tuple[Any, Any]]:
    """(owner, name) -> (what getattr returns, the owner's own attribute or a marker if inherited)."""
    out = {}
    for patch in entries:
        owner, name = patches._owner_and_name(patch)
        out[(id(owner), name)] = (getattr(owner, name), vars(owner).get(name, patches._MISSING))
    return out


def _assert_same(before: dict[tuple[int, str], tuple[Any, Any]], after: dict) -> None:
    changed = [
        key[1] for key, (got, own) in before.items() if after[key][0] is not got or after[key][1] is not own
    ]
    assert not changed, f"not restored: {changed}"


def test_every_patch_module_declares_its_entries() -> None:
    for name in patches.PATCH_MODULES:
        module = importlib.import_module(f"dms_megatron.megatron.patches.{name}")
        assert module.PATCHES and all(isinstance(p, Patch) for p in module.PATCHES), name
    for patch in all_patches():
        assert patch.remove_when, f"{patch.target} says not when to remove it"


def test_every_table_entry_checks_out() -> None:
    check_patch_targets()  # every upstream target exists, takes its parameters, megatron-core supported


def test_replacements_take_the_expected_parameters() -> None:
    for patch in all_patches():
        if patch.expected_params and not patch.wraps_original:
            params = inspect.signature(patch.replacement).parameters
            assert all(p in params for p in patch.expected_params), patch.target


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (Patch("torch.cuda", "no_such_function", None), "no longer exists"),
        (Patch("torch", "Tensor.no_such_method", None), "no longer exists"),
        (Patch("dms_no_such_module", "x", None), "cannot be imported"),
        (
            Patch("megatron.core.transformer.utils", "get_default_causal_mask", None, ("renamed",)),
            "lost param",
        ),
        (
            Patch("torch.cuda", "synchronize", None, megatron_versions=("0.0.1",)),
            "megatron-core .* installed; the patch of torch.cuda.synchronize is for",
        ),
    ],
)
def test_a_changed_target_fails_the_check_and_installs_nothing(entry: Patch, message: str) -> None:
    with pytest.raises(PatchTargetError, match=message):
        check_patch_targets([entry])
    good = Patch("torch.cuda", "synchronize", lambda *a, **k: None, remove_when="never")
    before = _attributes([good])
    with pytest.raises(PatchTargetError, match=message):
        apply_patches([good, entry])  # the good entry is not installed either
    _assert_same(before, _attributes([good]))


@needs_cpu_only
def test_cpu_training_restores_every_patched_attribute() -> None:
    from dms_megatron.megatron.patches.cpu_training import (
        PATCHES,
        CudaToCpuMode,
        cpu_training,
        cpu_training_enabled,
        enable_cpu_training,
    )

    rng_logger = logging.getLogger("megatron.core.tensor_parallel.random")
    level = rng_logger.level
    modes = list(torch.overrides._get_current_function_mode_stack())
    before = _attributes(PATCHES)
    assert not cpu_training_enabled()
    with cpu_training():
        assert cpu_training_enabled()
        assert all(is_applied(p) for p in PATCHES)
        assert isinstance(torch.overrides._get_current_function_mode_stack()[-1], CudaToCpuMode)
        assert torch.zeros(1, device="cuda").device.type == "cpu"
        with cpu_training():  # nested: a no-op, the outer block restores
            assert torch.zeros(1, device="cuda").device.type == "cpu"
        assert cpu_training_enabled() and all(is_applied(p) for p in PATCHES)
        with pytest.raises(RuntimeError, match="inside a cpu_training"):
            enable_cpu_training()  # the block would undo a process-wide mode
    _assert_same(before, _attributes(PATCHES))
    assert not cpu_training_enabled()
    assert list(torch.overrides._get_current_function_mode_stack()) == modes
    assert rng_logger.level == level
    with pytest.raises((RuntimeError, AssertionError)):  # no driver / torch built without CUDA
        torch.zeros(1, device="cuda")  # CUDA placement is real again


@needs_cpu_only
def test_cpu_training_restores_after_an_error_and_can_be_entered_again() -> None:
    from dms_megatron.megatron.patches.cpu_training import PATCHES, cpu_training, cpu_training_enabled

    before = _attributes(PATCHES)
    with pytest.raises(ValueError, match="inside"), cpu_training():
        raise ValueError("inside")
    _assert_same(before, _attributes(PATCHES))
    with cpu_training():
        assert torch.cuda.current_device() == torch.device("cpu")
    _assert_same(before, _attributes(PATCHES))
    assert not cpu_training_enabled()


@needs_cpu_only
def test_cpu_training_refuses_to_leave_under_a_foreign_mode() -> None:
    from torch.overrides import TorchFunctionMode

    from dms_megatron.megatron.patches.cpu_training import _SENTINEL, PATCHES, cpu_training

    before = _attributes(PATCHES)
    foreign = TorchFunctionMode()
    with pytest.raises(RuntimeError, match="another TorchFunctionMode"), cpu_training():
        ours = getattr(torch.cuda, _SENTINEL)
        foreign.__enter__()
    foreign.__exit__(None, None, None)
    ours.__exit__(None, None, None)
    _assert_same(before, _attributes(PATCHES))  # the attributes were restored all the same
    assert not torch.overrides._get_current_function_mode_stack()


@needs_cpu_only
def test_cpu_megatron_restores_every_patched_attribute() -> None:
    from dms_megatron.megatron.patches.cpu_convert import PATCHES, cpu_megatron

    before = _attributes(PATCHES)
    with cpu_megatron():
        assert all(is_applied(p) for p in PATCHES)
        x = torch.ones(2)
        assert x.cuda() is x and torch.cuda.current_device() == torch.device("cpu")
        with cpu_megatron():  # nested: a no-op
            pass
        assert all(is_applied(p) for p in PATCHES)
    _assert_same(before, _attributes(PATCHES))
    assert "cuda" not in vars(torch.Tensor)  # inherited from TensorBase, not left as an own attribute


def test_wrapping_entry_is_recognised_and_restored() -> None:
    from dms_megatron.megatron.patches.adam_step import KEEP_STEP

    before = _attributes([KEEP_STEP])
    assert not is_applied(KEEP_STEP)
    applied = apply_patch(KEEP_STEP)
    try:
        assert is_applied(KEEP_STEP)
    finally:
        applied.restore()
    _assert_same(before, _attributes([KEEP_STEP]))
    assert not is_applied(KEEP_STEP)


def test_per_instance_entry_patches_that_instance_only() -> None:
    from dms_megatron.megatron.patches.pipeline_input import SPLIT_INPUT

    owner, _ = patches._owner_and_name(SPLIT_INPUT)  # TransformerBlock
    block, other = owner.__new__(owner), owner.__new__(owner)  # no megatron init needed
    torch.nn.Module.__init__(block)
    torch.nn.Module.__init__(other)
    applied = apply_patch(SPLIT_INPUT, on=block)
    assert is_applied(SPLIT_INPUT, on=block) and not is_applied(SPLIT_INPUT, on=other)
    assert block.set_input_tensor.__self__ is block
    assert not is_applied(SPLIT_INPUT) and "set_input_tensor" in vars(owner)
    applied.restore()
    assert "set_input_tensor" not in vars(block)
