"""What autograd keeps for backward, counted by storage: the measured side of the planner's activation
formula (``dms_megatron.plan.memory.layer_activation_terms``), on any device.

``SavedTensorProbe`` installs ``saved_tensors_hooks`` and records every distinct storage that a forward
saves (a storage saved twice, or through several views, counts once; parameters are excluded). Inside
``probe.core_attention()`` it also wraps DMS core attention (``dms_megatron.megatron.attention``'s
``dms_attention``), so each storage gets a region:

* ``layer``: first saved outside core attention (norms, GEMM inputs, RoPE tables, SwiGLU, decisions);
* ``core_input``: the storage of a q, k or v handed to core attention (q and k after RoPE, and the fused
  QKV output that v is a view of), saved by the backend;
* ``core_other``: another tensor made before core attention and first saved inside it (the relaxed
  decisions, via the backend's log-keep bias);
* ``core_internal``: made and saved inside core attention (backend-specific: flex keeps its output and
  log-sum-exp; the CPU reference keeps score chunks).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

REGIONS = ("layer", "core_input", "core_other", "core_internal")


@dataclass(frozen=True)
class SavedStorage:
    nbytes: int
    dtype: str
    shape: tuple[int, ...]  # of the first tensor saved on this storage
    region: str


def _key(t: torch.Tensor) -> tuple[str, int]:
    return (str(t.device), t.untyped_storage().data_ptr())


class SavedTensorProbe:
    """Records the storages saved for backward while entered; see the module docstring."""

    def __init__(self, parameters: Iterable[torch.Tensor] = ()) -> None:
        self.excluded = {_key(p) for p in parameters}
        self.saved: dict[tuple[str, int], SavedStorage] = {}
        self._in_core = 0
        self._core_inputs: set[tuple[str, int]] = set()
        self._before_core: set[tuple[str, int]] = set()

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if t.device.type == "meta" or t.untyped_storage().nbytes() == 0:
            return t
        key = _key(t)
        if key in self.excluded or key in self.saved:
            return t
        if not self._in_core:
            region = "layer"
        elif key in self._core_inputs:
            region = "core_input"
        elif key in self._before_core:
            region = "core_other"
        else:
            region = "core_internal"
        self.saved[key] = SavedStorage(t.untyped_storage().nbytes(), str(t.dtype), tuple(t.shape), region)
        return t

    def __enter__(self) -> SavedTensorProbe:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)

    def wrap_core(self, fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """``fn(q, k, v, relaxed, ...)`` with its region marked (q, k, v: core inputs)."""

        def wrapped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            self._core_inputs = {_key(x) for x in (q, k, v)}
            self._before_core = {_key(x) for x in args if isinstance(x, torch.Tensor)}
            self._in_core += 1
            try:
                return fn(q, k, v, *args, **kwargs)
            finally:
                self._in_core -= 1

        return wrapped

    @contextlib.contextmanager
    def core_attention(self) -> Iterator[None]:
        """Route DMS core attention through ``wrap_core`` while in the block."""
        from dms_megatron.megatron import attention

        original = attention.dms_attention
        attention.dms_attention = self.wrap_core(original)
        try:
            yield
        finally:
            attention.dms_attention = original

    def totals(self) -> dict[str, int]:
        out = dict.fromkeys(REGIONS, 0)
        for s in self.saved.values():
            out[s.region] += s.nbytes
        return out

    def table(self) -> list[dict[str, Any]]:
        """Storages grouped by (region, dtype, shape, bytes) with their count, largest total first."""
        groups: dict[tuple, int] = {}
        for st in self.saved.values():
            key = (st.region, st.dtype, st.shape, st.nbytes)
            groups[key] = groups.get(key, 0) + 1
        rows = [
            {"region": r, "dtype": d, "shape": list(sh), "bytes": b, "count": n, "total": b * n}
            for (r, d, sh, b), n in groups.items()
        ]
        return sorted(rows, key=lambda r: (-r["total"], r["region"], r["shape"]))
