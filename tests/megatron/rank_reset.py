"""Make a pooled rank look like a fresh process again after each job (``ProcessSnapshot``).

``capture()`` runs once in a pooled rank, after the same start-up a fresh rank does (torch, megatron-core,
CPU shim); ``restore()`` runs after every successful job. What a job can leave behind, and how it is undone
(found by running tests/megatron on the pool and comparing each job's result with the fresh-process one):

* torch.distributed groups and megatron's parallel state, micro-batch calculator, rerun state machine and
  global memory buffer: destroyed; the checkpoint writer's ``multiprocessing`` Manager (started by
  ``dist_checkpointing.save`` and ``PreemptionGuard``): killed, as killpg kills a fresh rank's.
* Globals of megatron / dms_megatron / test-helper modules and attributes of their classes: put back to the
  objects they held right after the module was imported (an import hook snapshots modules that a job
  imports lazily). Seen in practice: eight ``parallel_state`` globals that megatron-core 0.19.2's
  ``destroy_model_parallel()`` leaves set (``_DATA_PARALLEL_GLOBAL_RANKS``, ``_PIPELINE_GLOBAL_RANKS``,
  ...), the RNG tracker, log-once flags, ``keep_torch_adam_step_on_load``'s patch of
  ``DistributedOptimizer``. ``functools`` caches of those modules are cleared (some hold old models).
* torch: the default CPU generator is reseeded from the OS as in a fresh process (whose default seed is
  random, not 67280421310721: that is the seed of ``torch.Generator()``), Python's and numpy's global
  RNGs too; default dtype, grad mode, thread count, deterministic and anomaly flags are restored.
* Python: environment, cwd, sys.path/argv, std streams, signal handlers and mask, warnings filters,
  logging levels and handlers.

What cannot be undone is returned as a leak list (a thread or child process still alive, an extra torch
function mode, a live process group); the parent then replaces the worker.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import importlib.abc
import logging
import os
import random
import signal
import sys
import threading
import types
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

_TRACKED_PACKAGES = ("megatron", "dms_megatron")
_TRACKED_MODULES = ("torch.cuda", "torch.cuda.random")  # what the CPU shim and cpu_megatron() patch
_HELPER_DIR = Path(__file__).resolve().parent  # *_jobs: job code is tracked too
_MISSING = object()
_LRU_WRAPPER = functools._lru_cache_wrapper  # type of functools.lru_cache / functools.cache wrappers


def _is_tracked(name: str, module: Any) -> bool:
    if name.partition(".")[0] in _TRACKED_PACKAGES or name in _TRACKED_MODULES:
        return True
    file = getattr(module, "__file__", None)
    return "." not in name and bool(file) and Path(file).resolve().parent == _HELPER_DIR


class _ModuleState:
    """A module's globals and its classes' attributes as objects (identity), plus its functools caches."""

    def __init__(self, module: types.ModuleType) -> None:
        self.module = module
        self.globals = dict(vars(module))
        self.classes = [
            (obj, dict(vars(obj)))
            for obj in self.globals.values()
            if isinstance(obj, type) and obj.__module__ == module.__name__
        ]
        owners = [self.globals, *(attrs for _, attrs in self.classes)]
        self.caches = [v for attrs in owners for v in attrs.values() if isinstance(v, _LRU_WRAPPER)]

    def restore(self) -> list[str]:
        """Put every global and class attribute back; return the names that had changed."""
        name = self.module.__name__
        changed = [f"{name}.{n}" for n in _put_back(self.module, self.globals, delete_added=False)]
        for cls, attrs in self.classes:  # added module names are kept: submodules imported later
            changed += [f"{name}.{cls.__name__}.{n}" for n in _put_back(cls, attrs, delete_added=True)]
        for cache in self.caches:
            with contextlib.suppress(Exception):
                cache.cache_clear()
        return changed


def _put_back(owner: Any, saved: dict[str, Any], delete_added: bool) -> list[str]:
    """Re-bind every name of ``saved`` that now holds another object; return the names touched."""
    current = vars(owner)
    changed = [n for n, value in saved.items() if current.get(n, _MISSING) is not value]
    for name in changed:
        with contextlib.suppress(AttributeError, TypeError):
            setattr(owner, name, saved[name])
    if delete_added:
        added = [n for n in current if n not in saved and not n.startswith("__")]
        for name in added:
            with contextlib.suppress(AttributeError, TypeError):
                delattr(owner, name)
        changed += added
    return changed


class _SnapshotOnImport(importlib.abc.MetaPathFinder):
    """Meta-path hook: snapshot a tracked module right after its code ran, before a job can change it."""

    def __init__(self, on_loaded: Callable[[types.ModuleType], None]) -> None:
        self._on_loaded = on_loaded

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: Any = None) -> Any:
        if fullname.partition(".")[0] not in _TRACKED_PACKAGES and path is not None:
            return None  # a submodule of an untracked package (helpers are top-level modules)
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is None:
                continue
            loader = spec.loader
            origin = Path(spec.origin).resolve().parent if spec.origin and spec.has_location else None
            tracked = fullname.partition(".")[0] in _TRACKED_PACKAGES or origin == _HELPER_DIR
            # a per-module loader instance only (never a class such as BuiltinImporter): wrap exec_module
            if tracked and loader is not None and not isinstance(loader, type):
                loader.exec_module = self._wrap(loader.exec_module)  # type: ignore[method-assign]
            return spec
        return None

    def _wrap(self, exec_module: Callable[[types.ModuleType], None]) -> Callable[[types.ModuleType], None]:
        def exec_and_snapshot(module: types.ModuleType) -> None:
            exec_module(module)
            if _is_tracked(module.__name__, module):
                self._on_loaded(module)

        return exec_and_snapshot


def _logger_state(logger: logging.Logger) -> tuple[Any, ...]:
    return logger.level, list(logger.handlers), logger.propagate, logger.disabled


def _all_loggers() -> dict[str, logging.Logger]:
    items = logging.Logger.manager.loggerDict.items()
    return {"": logging.root, **{n: lg for n, lg in items if isinstance(lg, logging.Logger)}}


def _child_pids() -> set[int]:
    import psutil

    return {child.pid for child in psutil.Process().children()}


def _resource_tracker_pid() -> int | None:
    from multiprocessing import resource_tracker

    return getattr(resource_tracker._resource_tracker, "_pid", None)  # process infrastructure, not a leak


class ProcessSnapshot:
    """What a fresh rank looks like when its job starts; ``restore()`` returns a pooled rank to it."""

    def __init__(self) -> None:
        self.modules: dict[str, _ModuleState] = {}
        self.seen_modules: set[str] = set()  # every module name already classified (tracked or not)
        self.env = dict(os.environ)
        self.cwd = os.getcwd()
        self.sys_path = list(sys.path)
        self.argv = list(sys.argv)
        self.streams = (sys.stdin, sys.stdout, sys.stderr)
        self.warning_filters = list(warnings.filters)
        self.warning_hooks = (warnings.showwarning, warnings.formatwarning)
        self.loggers = {name: _logger_state(lg) for name, lg in _all_loggers().items()}
        self.logging_disable = logging.root.manager.disable
        self.signals = {}
        for sig in signal.valid_signals():
            with contextlib.suppress(ValueError, OSError):
                handler = signal.getsignal(sig)
                if handler is not None:  # None: installed outside Python, cannot be put back
                    self.signals[sig] = handler
        self.sigmask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
        self.torch_flags = (
            torch.get_default_dtype(),
            torch.is_grad_enabled(),
            torch.get_num_threads(),
            torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.is_anomaly_enabled(),
            torch.is_anomaly_check_nan_enabled(),
            torch.get_float32_matmul_precision(),
        )
        self.modes = list(torch.overrides._get_current_function_mode_stack())  # the CPU shim's mode
        self.threads = {t.ident for t in threading.enumerate()}
        self.children = _child_pids()

    @classmethod
    def capture(cls) -> ProcessSnapshot:
        """Snapshot this process (call once, before the first job) and start watching later imports."""
        snapshot = cls()
        snapshot.track_new_modules()
        sys.meta_path.insert(0, _SnapshotOnImport(snapshot._track))
        gc.collect()
        gc.freeze()  # the import-time heap lives for good: later collections skip it (0.3 s each)
        return snapshot

    def _track(self, module: types.ModuleType) -> None:
        if module.__name__ not in self.modules:
            self.modules[module.__name__] = _ModuleState(module)

    def track_new_modules(self) -> None:
        """Snapshot tracked modules not seen yet (the import hook normally got them already)."""
        for name in sys.modules.keys() - self.seen_modules:
            module = sys.modules.get(name)
            if isinstance(module, types.ModuleType) and _is_tracked(name, module):
                self._track(module)
            self.seen_modules.add(name)

    def restore(self) -> tuple[list[str], list[str]]:
        """Undo what the last job changed; return (what could not be undone, which globals were reset).

        An empty first list means the rank is clean; the second is for the parent's debug log."""
        _release_job_resources()
        reset = [name for state in list(self.modules.values()) for name in state.restore()]
        self.track_new_modules()  # imported behind the hook's back: best effort, as they are now
        self._restore_python()
        self._restore_torch()
        gc.collect()  # the job's reference cycles (models, hooks) go now, not during the next job
        gc.freeze()  # what survives is module state (lazy imports, caches): skip it from now on
        with contextlib.suppress(Exception):
            ctypes.CDLL(None).malloc_trim(0)  # hand freed model memory back to the OS (glibc)
        return self._leaks(), reset

    def _restore_python(self) -> None:
        if dict(os.environ) != self.env:
            os.environ.clear()
            os.environ.update(self.env)
        os.chdir(self.cwd)
        sys.path[:] = self.sys_path
        sys.argv[:] = self.argv
        sys.stdin, sys.stdout, sys.stderr = self.streams
        warnings.filters[:] = self.warning_filters
        warnings.showwarning, warnings.formatwarning = self.warning_hooks
        warnings._filters_mutated()  # type: ignore[attr-defined]  # forget "already warned" registries
        for name, logger in _all_loggers().items():
            saved = self.loggers.get(name, (logging.NOTSET, [], True, False))  # created by the job
            if _logger_state(logger) == saved:
                continue
            level, handlers, propagate, disabled = saved
            for handler in logger.handlers:
                if handler not in handlers:
                    with contextlib.suppress(Exception):
                        handler.close()
            if logger.level != level:
                logger.setLevel(level)  # clears every logger's level cache: only when needed
            logger.handlers[:] = handlers
            logger.propagate, logger.disabled = propagate, disabled
        logging.disable(self.logging_disable)
        for sig, handler in self.signals.items():
            if signal.getsignal(sig) is not handler:
                signal.signal(sig, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, self.sigmask)
        random.seed()  # from the OS, as a fresh interpreter
        numpy = sys.modules.get("numpy")
        if numpy is not None:
            numpy.random.seed()

    def _restore_torch(self) -> None:
        dtype, grad, threads, deterministic, warn_only, anomaly, check_nan, precision = self.torch_flags
        torch.set_default_dtype(dtype)
        torch.set_grad_enabled(grad)
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.set_anomaly_enabled(anomaly, check_nan)
        torch.set_float32_matmul_precision(precision)
        torch.seed()  # a fresh process's default generator is seeded from the OS, not with a fixed seed

    def _leaks(self) -> list[str]:
        leaks = []
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            leaks.append("torch.distributed is still initialised")
        modes = torch.overrides._get_current_function_mode_stack()
        if len(modes) != len(self.modes) or any(a is not b for a, b in zip(modes, self.modes, strict=False)):
            leaks.append(f"torch function modes changed: {[type(m).__name__ for m in modes]}")
        if torch.is_inference_mode_enabled():
            leaks.append("inference mode left enabled")
        threads = [t for t in threading.enumerate() if t.ident not in self.threads and t.is_alive()]
        for thread in threads:
            thread.join(timeout=1.0)  # a helper thread may be finishing right now
        threads = [t.name for t in threads if t.is_alive()]
        if threads:
            leaks.append(f"threads still running: {threads}")
        children = _child_pids() - self.children - {_resource_tracker_pid()}
        if children:
            leaks.append(f"child processes still running: {sorted(children)}")
        return leaks


def _release_job_resources() -> None:
    """Destroy what megatron and torch.distributed hold for the job (before their globals are reset)."""
    mods = sys.modules
    ps = mods.get("megatron.core.parallel_state")
    if ps is not None:
        with contextlib.suppress(Exception):
            ps.destroy_model_parallel()
        with contextlib.suppress(Exception):
            ps.destroy_global_memory_buffer()
    for module_name, destroy in (
        ("megatron.core.num_microbatches_calculator", "destroy_num_microbatches_calculator"),
        ("megatron.core.rerun_state_machine", "destroy_rerun_state_machine"),
        ("megatron.training.global_vars", "destroy_global_vars"),
    ):
        module = mods.get(module_name)
        if module is not None:
            with contextlib.suppress(Exception):
                getattr(module, destroy)()
    # dist_checkpointing.save keeps a Manager process (its write-results queue) for the life of the process;
    # killed, as a fresh rank's is by killpg (a graceful shutdown takes 1-2 s: its server polls once a second)
    fsa = mods.get("megatron.core.dist_checkpointing.strategies.filesystem_async")
    queue = getattr(fsa, "_results_queue", None)
    if queue is not None:
        fsa._results_queue = None  # type: ignore[union-attr]
        manager = getattr(queue, "_manager", None)
        process = getattr(manager, "_process", None)
        with contextlib.suppress(Exception):
            if process is not None:
                process.kill()
                process.join(5.0)
            manager.shutdown()  # type: ignore[union-attr]  # marks it shut down: no decref calls to it
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
