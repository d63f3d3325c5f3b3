"""Explicit, logged, version-gated patches of upstream objects (house rule: all of them live in this
package, one module per patch; nothing is patched at import time).

Each patch module declares its entries in ``PATCHES``, a tuple of ``Patch``: the upstream target, its
replacement, the parameters the target must still take, the megatron-core versions it was written for and
when to remove it. The installer (``apply_patch`` / ``apply_patches`` / ``patched``) and the upgrade guard
(``check_patch_targets``) read the same entries: both resolve the target and check its signature and the
installed megatron-core version; only the installer then replaces it (and can put the original back).

``pipeline_input.split_decision_channels_on_input(block, acc, channels)``: per ``TransformerBlock``
*instance*, its ``set_input_tensor`` is replaced so that an activation received from the previous
pipeline stage, ``[s, b, h + channels]``, has its last channels (the DMS decision counts, see
``state.py``) split off into the stage's accumulator before megatron sees ``[s, b, h]``. Needed for
megatron-core 0.19.2, whose P2P carries one tensor of one shape.

``cpu_convert.cpu_megatron()``: megatron-core 0.19.2 calls ``torch.cuda.current_device()`` while
*building* models (e.g. ``GPTModel.__init__`` -> rotary embedding), ``Tensor.cuda()`` on the tied
embedding of a pipelined model (``LanguageModule.setup_embeddings_and_output_layer``) and
``torch.cuda.synchronize()`` while saving distributed checkpoints; all raise on a machine without a GPU
driver. Checkpoint conversion is CPU work that users run on login or CPU nodes, so for the duration of
the block, and only when CUDA is unavailable, these three calls stay on the CPU.

``cpu_training.cpu_training()`` (a context manager) and ``cpu_training.enable_cpu_training()`` (the same,
entered for the rest of the process): megatron-core training on a CPU-only machine (the README demo on a
laptop or CI, and the CPU test suite). megatron-core 0.19.2's schedules, P2P, DDP grad buffers,
optimizer, gradient clipping and RNG tracker hard-code CUDA. The mode (a) makes device queries and syncs
CPU no-ops, (b) replaces streams/events with null objects (CPU work is synchronous), (c) routes the
"CUDA" RNG to the CPU generator, (d) builds the stock causal mask on the CPU and (e) enters one
``TorchFunctionMode`` that rewrites hard-coded CUDA placement to CPU and reports ``torch.cuda.*Tensor``
type names where megatron asserts them. Leaving ``cpu_training()`` puts every original back.

``adam_step.keep_torch_adam_step_on_load()``: resuming the distributed optimizer from a reshardable
checkpoint with torch's Adam (no Apex/TE) fails upstream with ``KeyError: 'step'``; see its docstring.

``grad_norm.use_foreach_grad_norm()``: without TE / Apex, megatron-core 0.19.2's fallback gradient norm
synchronises the host once per gradient tensor each step; the norm and the gradient scaling run on torch's
foreach kernels instead (installed only where that fallback is in use); see its docstring.

Each entry's ``remove_when`` says when it can go.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import logging
import types
from collections.abc import Iterable, Iterator
from typing import Any

from dms_megatron.megatron.compat import SUPPORTED_MEGATRON_CORE, installed_megatron_core_version

log = logging.getLogger(__name__)

PATCH_MODULES: tuple[str, ...] = ("pipeline_input", "cpu_convert", "cpu_training", "adam_step", "grad_norm")
_MISSING = object()


class PatchTargetError(RuntimeError):
    """An upstream name a patch replaces is missing or changed shape, or megatron-core is not a version
    the patch was written for."""


@dataclasses.dataclass(frozen=True)
class Patch:
    """One replacement of an upstream attribute, described once for the installer and the check.

    ``target_attr`` may be dotted (``"Tensor.cuda"``: attribute ``cuda`` of ``torch.Tensor``). With
    ``wraps_original`` the installed object is ``replacement(original)``. ``expected_params``: parameters
    the upstream target must still take (a renamed one would silently change what the replacement means).
    """

    target_module: str
    target_attr: str
    replacement: Any
    expected_params: tuple[str, ...] = ()
    megatron_versions: tuple[str, ...] = SUPPORTED_MEGATRON_CORE
    remove_when: str = ""
    wraps_original: bool = False

    @property
    def target(self) -> str:
        """Dotted name of the patched attribute."""
        return f"{self.target_module}.{self.target_attr}"


def _owner_and_name(patch: Patch) -> tuple[Any, str]:
    try:
        owner: Any = importlib.import_module(patch.target_module)
    except ImportError as exc:
        raise PatchTargetError(f"patch target {patch.target_module!r} cannot be imported: {exc}") from exc
    *path, name = patch.target_attr.split(".")
    for part in [*path, name]:
        if not hasattr(owner, part):
            raise PatchTargetError(
                f"patch target {patch.target} no longer exists (megatron-core or torch upgraded?); "
                "update its entry in dms_megatron/megatron/patches/"
            )
        if part != name:
            owner = getattr(owner, part)
    return owner, name


def _problems(patch: Patch) -> list[str]:
    """What is wrong with ``patch``'s target on this install (empty: it can be applied)."""
    try:
        owner, name = _owner_and_name(patch)
    except PatchTargetError as exc:
        return [str(exc)]
    problems = []
    version = installed_megatron_core_version()
    if version not in patch.megatron_versions:
        problems.append(
            f"megatron-core {version} installed; the patch of {patch.target} is for {patch.megatron_versions}"
        )
    if patch.expected_params:
        params = inspect.signature(getattr(owner, name)).parameters
        missing = [p for p in patch.expected_params if p not in params]
        if missing:
            problems.append(f"{patch.target} lost parameter(s) {missing}")
    return problems


def check_patch_targets(patches: Iterable[Patch] | None = None) -> None:
    """Raise ``PatchTargetError`` listing every entry of ``patches`` (default: every patch module's
    table) whose target disappeared, changed its parameters or sits on an unsupported megatron-core."""
    problems = [p for patch in (all_patches() if patches is None else patches) for p in _problems(patch)]
    if problems:
        raise PatchTargetError("patch targets changed:\n  " + "\n  ".join(problems))


def all_patches() -> tuple[Patch, ...]:
    """The table: every entry of every patch module."""
    modules = [importlib.import_module(f"{__name__}.{name}") for name in PATCH_MODULES]
    return tuple(patch for module in modules for patch in module.PATCHES)


def is_applied(patch: Patch, on: object | None = None) -> bool:
    """Whether ``patch``'s replacement is what its target (or ``on``'s attribute) holds now."""
    owner, name = _owner_and_name(patch)
    current = getattr(on if on is not None else owner, name, None)
    return (
        current is patch.replacement
        or getattr(current, "__func__", None) is patch.replacement
        or getattr(current, "_dms_patch", None) is patch
    )


@dataclasses.dataclass
class AppliedPatches:
    """What ``apply_patches`` replaced, oldest first; ``restore()`` puts the originals back."""

    saved: list[tuple[Any, str, Any]] = dataclasses.field(default_factory=list)  # owner, name, own attr

    def restore(self) -> None:
        """Put every replaced attribute back, newest first (an attribute the owner only inherited is
        removed again)."""
        while self.saved:
            owner, name, value = self.saved.pop()
            if value is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, value)


def apply_patches(patches: Iterable[Patch], on: object | None = None) -> AppliedPatches:
    """Check every entry (``PatchTargetError`` before anything is touched), then install each one.

    ``on``: install on this object (an instance of the target's class) instead of the target's owner; a
    function replacement is bound to it as a method."""
    patches = tuple(patches)
    check_patch_targets(patches)
    applied = AppliedPatches()
    for patch in patches:
        owner, name = _owner_and_name(patch)
        holder = owner if on is None else on
        original = getattr(holder, name)
        value = patch.replacement(original) if patch.wraps_original else patch.replacement
        if patch.wraps_original:
            value._dms_patch = patch  # lets is_applied() recognise a wrapper built from this entry
        if on is not None and isinstance(value, types.FunctionType):
            value = types.MethodType(value, on)
        applied.saved.append((holder, name, vars(holder).get(name, _MISSING)))
        setattr(holder, name, value)
        log.debug("dms_megatron: patched %s (remove when %s)", patch.target, patch.remove_when)
    return applied


def apply_patch(patch: Patch, on: object | None = None) -> AppliedPatches:
    """``apply_patches`` for one entry."""
    return apply_patches((patch,), on=on)


@contextlib.contextmanager
def patched(patches: Iterable[Patch]) -> Iterator[AppliedPatches]:
    """Within the block every entry of ``patches`` is installed; on exit every original is back."""
    applied = apply_patches(patches)
    try:
        yield applied
    finally:
        applied.restore()
