"""megatron-core training on a CPU-only machine (gloo): ``cpu_training()``, a context manager that puts
everything back on exit, and ``enable_cpu_training()``, the same mode entered for the rest of the process
(see the package docstring). ``PATCHES`` is the mode's patch table; ``check_cpu_patch_targets()`` checks
it without installing anything."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from dms_megatron.megatron.compat import installed_megatron_core_version
from dms_megatron.megatron.patches import AppliedPatches, Patch, apply_patches, check_patch_targets

log = logging.getLogger(__name__)

# Process-wide marker (on torch.cuda, so it holds under any import name of this module): the active mode.
_SENTINEL = "_megatron_cpu_shim_mode"
_RNG_LOGGER = "megatron.core.tensor_parallel.random"  # warns "CPU RNG state changed", expected here
_REMOVE_WHEN = "megatron-core trains on CPU without CUDA calls"


def _device_cpu() -> torch.device:
    return torch.device("cpu")


def _no_sync(*args: Any, **kwargs: Any) -> None:
    return None


# ---------------------------------------------------------------------------------------------------------
# (b) null streams and events
# ---------------------------------------------------------------------------------------------------------


class _NullEvent:
    """Stand-in for ``torch.cuda.Event``: every operation is a no-op, ``query()`` is always done."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, stream: Any = None) -> None:
        """No-op."""

    def wait(self, stream: Any = None) -> None:
        """No-op."""

    def synchronize(self) -> None:
        """No-op."""

    def query(self) -> bool:
        """Always complete."""
        return True


class _NullStream:
    """Stand-in for ``torch.cuda.Stream``: CPU work is synchronous, so waiting and syncing do nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        """No-op."""

    def wait_stream(self, stream: Any) -> None:
        """No-op."""

    def synchronize(self) -> None:
        """No-op."""

    def record_event(self, event: Any = None) -> _NullEvent:
        """Return a null event (CUDA returns the recorded event)."""
        return event if event is not None else _NullEvent()

    def query(self) -> bool:
        """Always idle."""
        return True


_NULL_STREAM = _NullStream()


# ---------------------------------------------------------------------------------------------------------
# (c) RNG routed to the CPU generator
# ---------------------------------------------------------------------------------------------------------


def _cpu_get_rng_state(device: Any = "cuda") -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, device: Any = "cuda") -> None:
    torch.set_rng_state(new_state)


def _cpu_manual_seed(seed: int) -> None:
    torch.default_generator.manual_seed(int(seed))


def _megatron_get_cuda_rng_state(
    device: Any = "cuda", clone: bool = False, graph_safe: bool = False
) -> torch.Tensor:
    return torch.get_rng_state()  # already a copy, so `clone` needs no extra work


def _megatron_set_cuda_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


# ---------------------------------------------------------------------------------------------------------
# (d) causal mask on CPU
# ---------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def _cpu_causal_mask(sq: int) -> torch.Tensor:
    """Boolean [sq, sq] mask, True above the diagonal (masked), like upstream but on CPU."""
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


# ---------------------------------------------------------------------------------------------------------
# (e) one process-wide TorchFunctionMode: CUDA placement -> CPU
# ---------------------------------------------------------------------------------------------------------


def _is_cuda_device(device: Any) -> bool:
    """True for "cuda", "cuda:N", a CUDA torch.device, or an int (a bare int device means a GPU index)."""
    if isinstance(device, bool):
        return False
    if isinstance(device, int):
        return True
    if isinstance(device, str):
        return device.split(":", 1)[0] == "cuda"
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


class CudaToCpuMode(TorchFunctionMode):
    """Rewrites hard-coded CUDA placement into CPU placement for every torch call in this thread."""

    process_wide = False  # True once enable_cpu_training() entered it for the rest of the process

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = dict(kwargs or {})
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.cuda:
            return args[0]  # Tensor.cuda() -> the tensor itself
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])  # Tensor.to("cuda", ...) -> Tensor.to("cpu", ...)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)  # no-arg Tensor.type(): report the CUDA type name megatron asserts on
            return name if ".cuda." in name else name.replace("torch.", "torch.cuda.", 1)
        return func(*args, **kwargs)


# ---------------------------------------------------------------------------------------------------------
# the table: (a) device queries and syncs, (b) streams/events, (c) RNG, (d) causal mask
# ---------------------------------------------------------------------------------------------------------


def _cpu_patch(module: str, attr: str, replacement: Any, expected_params: tuple[str, ...] = ()) -> Patch:
    return Patch(module, attr, replacement, expected_params=expected_params, remove_when=_REMOVE_WHEN)


PATCHES: tuple[Patch, ...] = (
    # (a) callers get the CPU device (works even in threads the mode misses): RoPE, memory buffer, p2p, DDP
    _cpu_patch("torch.cuda", "current_device", _device_cpu),
    _cpu_patch("torch.cuda", "synchronize", _no_sync),  # p2p communication, checkpoint preload
    # (b) CPU work is synchronous, so stream ordering is already satisfied
    _cpu_patch("torch.cuda", "current_stream", lambda *a, **k: _NULL_STREAM),  # DDP grad sync waits on it
    _cpu_patch("torch.cuda", "Stream", _NullStream),  # side streams created by DDP / offloading code
    _cpu_patch("torch.cuda", "Event", _NullEvent),  # events recorded on those streams
    _cpu_patch("torch.cuda", "stream", lambda *a, **k: contextlib.nullcontext()),  # `with ...stream(s):`
    # (c) the "CUDA" generator is the CPU default generator (tracker add/fork, manual seeding)
    *(
        _cpu_patch(module, attr, replacement)
        for module in ("torch.cuda", "torch.cuda.random")
        for attr, replacement in (
            ("get_rng_state", _cpu_get_rng_state),  # CudaRNGStatesTracker.add
            ("set_rng_state", _cpu_set_rng_state),  # symmetric setter
            ("manual_seed", _cpu_manual_seed),  # model_parallel_cuda_manual_seed / tracker.add
            ("manual_seed_all", _cpu_manual_seed),  # same, for the "all devices" variant
        )
    ),
    _cpu_patch(  # fork() read the cuda default_generators
        "megatron.core.tensor_parallel.random",
        "_get_cuda_rng_state",
        _megatron_get_cuda_rng_state,
        ("device", "clone", "graph_safe"),
    ),
    _cpu_patch(  # fork() wrote the cuda default_generators
        "megatron.core.tensor_parallel.random",
        "_set_cuda_rng_state",
        _megatron_set_cuda_rng_state,
        ("new_state", "device", "graph_safe"),
    ),
    # (d) upstream builds the mask with device="cuda"; fused_softmax imported the name directly
    _cpu_patch("megatron.core.transformer.utils", "get_default_causal_mask", _cpu_causal_mask, ("sq",)),
    _cpu_patch("megatron.core.fusions.fused_softmax", "get_default_causal_mask", _cpu_causal_mask, ("sq",)),
)


# ---------------------------------------------------------------------------------------------------------
# entering and leaving the mode
# ---------------------------------------------------------------------------------------------------------


def check_cpu_patch_targets() -> None:
    """Raise ``PatchTargetError`` if an upstream name the CPU mode patches disappeared or changed."""
    check_patch_targets(PATCHES)


def cpu_training_enabled() -> bool:
    """Whether the CPU training mode is on in this process (under any import name of this module)."""
    return getattr(torch.cuda, _SENTINEL, None) is not None


@dataclasses.dataclass
class _ActiveMode:
    applied: AppliedPatches
    mode: CudaToCpuMode
    rng_log_level: int


def _enter(process_wide: bool) -> _ActiveMode:
    if torch.cuda.is_available():
        raise RuntimeError("the CPU training mode is for CPU-only machines; CUDA is available here")
    applied = apply_patches(PATCHES)  # checks every target before it touches any
    rng_logger = logging.getLogger(_RNG_LOGGER)
    active = _ActiveMode(applied, CudaToCpuMode(), rng_logger.level)
    active.mode.process_wide = process_wide
    rng_logger.setLevel(logging.ERROR)
    active.mode.__enter__()  # (e) last: one TorchFunctionMode for this thread
    setattr(torch.cuda, _SENTINEL, active.mode)
    log.info(
        "dms_megatron: CPU training mode on (megatron-core %s): CUDA calls, streams, RNG and placement "
        "are routed to the CPU",
        installed_megatron_core_version(),
    )
    return active


def _leave(active: _ActiveMode) -> None:
    delattr(torch.cuda, _SENTINEL)
    active.applied.restore()
    logging.getLogger(_RNG_LOGGER).setLevel(active.rng_log_level)
    modes = torch.overrides._get_current_function_mode_stack()
    if not modes or modes[-1] is not active.mode:
        raise RuntimeError(
            "cannot leave the CPU training mode: another TorchFunctionMode entered inside it is still on"
        )
    active.mode.__exit__(None, None, None)
    log.info("dms_megatron: CPU training mode off; torch.cuda and megatron-core restored")


@contextlib.contextmanager
def cpu_training() -> Iterator[None]:
    """Within the block megatron-core trains on the CPU (this thread's torch calls); on exit every patched
    attribute is the original again and the mode is left. Nested in an active mode (a block or
    ``enable_cpu_training()``): a no-op, the outer one restores. ``RuntimeError`` where CUDA is available."""
    if cpu_training_enabled():
        yield
        return
    active = _enter(process_wide=False)
    try:
        yield
    finally:
        _leave(active)


def enable_cpu_training() -> None:
    """The CPU training mode for the rest of the process (the trainer and test ranks on a CPU-only
    machine); idempotent. ``RuntimeError`` inside a ``cpu_training()`` block (which would undo it)."""
    if cpu_training_enabled():
        if getattr(torch.cuda, _SENTINEL).process_wide:
            return
        raise RuntimeError("enable_cpu_training() inside a cpu_training() block: the block would undo it")
    _enter(process_wide=True)
