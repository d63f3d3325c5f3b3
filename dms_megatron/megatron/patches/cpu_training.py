"""megatron-core training on a CPU-only machine (gloo): ``enable_cpu_training()``, opt-in and
process-wide, and ``check_cpu_patch_targets()``, its upgrade guard (see the package docstring)."""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from dms_megatron.megatron.compat import SUPPORTED_MEGATRON_CORE, installed_megatron_core_version

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------
# enable_cpu_training(): megatron training on a CPU-only machine (see the module docstring)
# ---------------------------------------------------------------------------------------------------------

# Process-wide marker (on torch.cuda): enable_cpu_training() runs once per process.
_SENTINEL = "_megatron_cpu_shim_mode"

# (module, attribute) pairs the CPU training mode replaces or relies on; checked by check_cpu_patch_targets().
_TORCH_TARGETS: tuple[tuple[str, str], ...] = (
    ("torch.cuda", "current_device"),
    ("torch.cuda", "synchronize"),
    ("torch.cuda", "current_stream"),
    ("torch.cuda", "Stream"),
    ("torch.cuda", "Event"),
    ("torch.cuda", "stream"),
    ("torch.cuda", "get_rng_state"),
    ("torch.cuda", "set_rng_state"),
    ("torch.cuda", "manual_seed"),
    ("torch.cuda", "manual_seed_all"),
    ("torch.cuda.random", "get_rng_state"),
    ("torch.cuda.random", "set_rng_state"),
    ("torch.cuda.random", "manual_seed"),
    ("torch.cuda.random", "manual_seed_all"),
)
_MEGATRON_TARGETS: tuple[tuple[str, str], ...] = (
    ("megatron.core.tensor_parallel.random", "_get_cuda_rng_state"),
    ("megatron.core.tensor_parallel.random", "_set_cuda_rng_state"),
    ("megatron.core.transformer.utils", "get_default_causal_mask"),
    ("megatron.core.fusions.fused_softmax", "get_default_causal_mask"),
    ("megatron.core.transformer.torch_norm", "WrappedTorchNorm"),
)
# Keyword parameters the replacements must accept (a renamed parameter would silently change behaviour).
_EXPECTED_PARAMS: dict[tuple[str, str], tuple[str, ...]] = {
    ("megatron.core.tensor_parallel.random", "_get_cuda_rng_state"): ("device", "clone", "graph_safe"),
    ("megatron.core.tensor_parallel.random", "_set_cuda_rng_state"): ("new_state", "device", "graph_safe"),
    ("megatron.core.transformer.utils", "get_default_causal_mask"): ("sq",),
    ("megatron.core.fusions.fused_softmax", "get_default_causal_mask"): ("sq",),
}
_WRAPPED_NORM_PARAMS = ("config", "hidden_size", "eps")


class CPUPatchTargetError(RuntimeError):
    """An upstream name that the CPU training patch patches is missing or has changed shape."""


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
# (f) WrappedTorchNorm with sequence_parallel=True
# ---------------------------------------------------------------------------------------------------------


def _make_sp_norm_new(original_new: Callable[..., Any]) -> Callable[..., Any]:
    """Build a ``WrappedTorchNorm.__new__`` that accepts sequence_parallel=True (the local spec has none)."""

    def sp_norm_new(
        cls: type, config: Any, hidden_size: int, eps: float = 1e-5, *args: Any, **kwargs: Any
    ) -> Any:
        if not config.sequence_parallel:
            return original_new(cls, config, hidden_size, eps, *args, **kwargs)
        if config.normalization == "LayerNorm":
            norm: torch.nn.Module = torch.nn.LayerNorm(hidden_size, eps=eps)
        elif config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps)
        else:
            raise ValueError(f"CPU training mode: no sequence-parallel norm for {config.normalization!r}")
        for param in norm.parameters():
            param.sequence_parallel = True  # type: ignore[attr-defined]  # grads all-reduced over TP
        return norm

    sp_norm_new._cpu_shim = True  # type: ignore[attr-defined]
    return sp_norm_new


# ---------------------------------------------------------------------------------------------------------
# installation and upgrade guard
# ---------------------------------------------------------------------------------------------------------


def _resolve(module_name: str, attr: str) -> Any:
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise CPUPatchTargetError(f"CPU patch target {module_name!r} cannot be imported: {exc}") from exc
    if not hasattr(module, attr):
        raise CPUPatchTargetError(
            f"CPU patch target {module_name}.{attr} no longer exists (megatron-core or torch upgraded?); "
            "update dms_megatron/megatron/patches/cpu_training.py"
        )
    return getattr(module, attr)


def check_cpu_patch_targets() -> None:
    """Raise ``CPUPatchTargetError`` if an upstream name the CPU mode patches disappeared or changed."""
    problems: list[str] = []
    for module_name, attr in _TORCH_TARGETS + _MEGATRON_TARGETS:
        try:
            obj = _resolve(module_name, attr)
        except CPUPatchTargetError as exc:
            problems.append(str(exc))
            continue
        expected = _EXPECTED_PARAMS.get((module_name, attr))
        if expected is not None:
            params = inspect.signature(obj).parameters
            missing = [p for p in expected if p not in params]
            if missing:
                problems.append(f"{module_name}.{attr} lost parameter(s) {missing}")
    try:
        norm_cls = _resolve("megatron.core.transformer.torch_norm", "WrappedTorchNorm")
        new_params = inspect.signature(norm_cls.__new__).parameters
        missing = [p for p in _WRAPPED_NORM_PARAMS if p not in new_params]
        if missing:
            problems.append(f"WrappedTorchNorm.__new__ lost parameter(s) {missing}")
    except CPUPatchTargetError:
        pass  # already reported above
    try:
        from importlib.metadata import version

        found = version("megatron-core")
        if found not in SUPPORTED_MEGATRON_CORE:
            problems.append(f"megatron-core {found} installed; CPU patches are for {SUPPORTED_MEGATRON_CORE}")
    except Exception as exc:
        problems.append(f"cannot read the megatron-core version: {exc}")
    if problems:
        raise CPUPatchTargetError("CPU training patch targets changed:\n  " + "\n  ".join(problems))


def cpu_training_enabled() -> bool:
    """Whether ``enable_cpu_training()`` has run in this process (under any import name of this module)."""
    return getattr(torch.cuda, _SENTINEL, None) is not None


def enable_cpu_training() -> None:
    """Patch torch.cuda and megatron-core for CPU/gloo and enter the CUDA->CPU mode; idempotent."""
    if cpu_training_enabled():
        return
    if torch.cuda.is_available():
        raise RuntimeError("enable_cpu_training() is for CPU-only machines; CUDA is available here")
    check_cpu_patch_targets()

    import megatron.core.fusions.fused_softmax as fused_softmax
    import megatron.core.tensor_parallel.random as mcore_random
    import megatron.core.transformer.torch_norm as torch_norm
    import megatron.core.transformer.utils as transformer_utils

    # (a) device queries and syncs: callers get the CPU device (works even in threads the mode misses).
    torch.cuda.current_device = lambda: torch.device("cpu")  # RoPE, memory buffer, p2p, grad buffers
    torch.cuda.synchronize = lambda *a, **k: None  # p2p communication, checkpoint preload

    # (b) null streams/events: CPU work is synchronous, so stream ordering is already satisfied.
    torch.cuda.current_stream = lambda *a, **k: _NULL_STREAM  # DDP grad sync waits on the current stream
    torch.cuda.Stream = _NullStream  # side streams created by DDP / offloading code
    torch.cuda.Event = _NullEvent  # events recorded on those streams
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()  # `with torch.cuda.stream(s):` blocks

    # (c) RNG: the "CUDA" generator is the CPU default generator (tracker add/fork, manual seeding).
    for ns in (torch.cuda, torch.cuda.random):
        ns.get_rng_state = _cpu_get_rng_state  # CudaRNGStatesTracker.add
        ns.set_rng_state = _cpu_set_rng_state  # symmetric setter
        ns.manual_seed = _cpu_manual_seed  # model_parallel_cuda_manual_seed / tracker.add
        ns.manual_seed_all = _cpu_manual_seed  # same, for the "all devices" variant
    mcore_random._get_cuda_rng_state = _megatron_get_cuda_rng_state  # fork() read cuda default_generators
    mcore_random._set_cuda_rng_state = _megatron_set_cuda_rng_state  # fork() wrote cuda default_generators
    logging.getLogger(mcore_random.__name__).setLevel(logging.ERROR)  # "CPU RNG state changed" is expected

    # (d) causal mask: upstream builds it with device="cuda"; fused_softmax imported the name directly.
    transformer_utils.get_default_causal_mask = _cpu_causal_mask
    fused_softmax.get_default_causal_mask = _cpu_causal_mask

    # (f) sequence parallel with the local spec: plain torch norm, params tagged for the TP all-reduce.
    wrapped = torch_norm.WrappedTorchNorm
    if not getattr(wrapped.__new__, "_cpu_shim", False):
        wrapped.__new__ = staticmethod(_make_sp_norm_new(wrapped.__new__))

    # (e) last: one TorchFunctionMode for this thread, left entered for the life of the process.
    mode = CudaToCpuMode()
    mode.__enter__()
    setattr(torch.cuda, _SENTINEL, mode)
    log.info(
        "dms_megatron: CPU training mode on (megatron-core %s): CUDA calls, streams, RNG and placement "
        "are routed to the CPU",
        installed_megatron_core_version(),
    )
