"""The frozen teacher's forward replayed as CUDA graphs (``train.teacher_cuda_graph``).

On a small model the retrofit step is host-bound: the GPU waits for Python and kernel launches, and
the teacher's forward is a quarter of the step's host time (SmolLM2-135M: ~3,700 of ~14,700 launches a
step). The teacher is frozen, runs under ``no_grad`` and sees micro-batches of one shape, so its forward
is captured once and replayed: a handful of launches per micro-batch instead of ~1,800.

Before each replay, what varies between micro-batches is copied into the graph's static buffers: every
tensor argument (token ids, position ids), the stage input on a pipeline stage after the first, and the
packed sequence (``training.batches.pack_thd``): its per-token document ids and positions, and its
``cu_seqlens`` padded to one entry more than the micro-batch has tokens (repeating the total: empty
documents at the end). The packed sequence's max lengths are pinned to the token count: their only
reader, the rotary table, is then longer, with the same value at every position. One graph is kept per
signature (argument shapes, dtypes and other values); past ``max_graphs`` signatures the forward runs
eagerly (logged once).

Needs (``RetrofitConfig`` checks): CUDA, a separate teacher (``train.mode=full``), TP = 1 (no
collectives inside the graph) and the Triton attention backend (its document bounds need no host sync
while capturing). Costs: the graph's private memory pool (one teacher forward's activations) and one
output buffer more (each replay's output is cloned, so a later replay cannot overwrite logits a loss
still holds).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)

# what a capture returns: (replay, output); replay() recomputes the output in place from the static inputs
Capture = Callable[[Callable[[], torch.Tensor], Any], tuple[Callable[[], None], torch.Tensor]]

_CU_FIELDS = ("cu_seqlens_q", "cu_seqlens_kv", "cu_seqlens_q_padded", "cu_seqlens_kv_padded")
_MAX_FIELDS = ("max_seqlen_q", "max_seqlen_kv")
_PER_TOKEN = ("_dms_doc_ids", "_dms_positions")  # attached by pack_thd


def cuda_capture(fn: Callable[[], torch.Tensor], pool: Any) -> tuple[Callable[[], None], torch.Tensor]:
    """Warm ``fn`` up on a side stream (Triton compiles, the allocator settles), then capture it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph.replay, out


class _UnsupportedArgumentError(Exception):
    """An argument the graph cannot hold (the forward then runs eagerly)."""


def _is_packed(x: Any) -> bool:
    return hasattr(x, "qkv_format") and hasattr(x, "cu_seqlens_q")


def _tensor_key(x: torch.Tensor) -> tuple:
    return ("tensor", tuple(x.shape), x.dtype, str(x.device))


def _packed_key(p: Any) -> tuple:
    if p.qkv_format != "thd" or any(getattr(p, name, None) is None for name in _PER_TOKEN):
        raise _UnsupportedArgumentError(
            "packed_seq_params without the per-token document ids and positions of pack_thd"
        )
    cu = tuple((name, getattr(p, name).dtype) for name in _CU_FIELDS if getattr(p, name, None) is not None)
    return ("packed", *(_tensor_key(getattr(p, name)) for name in _PER_TOKEN), cu)


def _key(x: Any) -> tuple:
    if isinstance(x, torch.Tensor):
        return _tensor_key(x)
    if x is None or isinstance(x, bool | int | float | str):
        return ("value", x)
    if _is_packed(x):
        return _packed_key(x)
    raise _UnsupportedArgumentError(f"argument of type {type(x).__name__}")


class _Entry:
    """The static inputs, replay and output of one captured signature."""

    def __init__(self, stage_input: torch.Tensor | None, args: tuple, kwargs: dict) -> None:
        self.stage_input = None if stage_input is None else stage_input.clone()
        self.args = tuple(self._static(a) for a in args)
        self.kwargs = {k: self._static(v) for k, v in kwargs.items()}
        self.replay: Callable[[], None] | None = None
        self.output: torch.Tensor | None = None

    def _static(self, x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return x.clone()
        if _is_packed(x):
            return self._static_packed(x)
        return x

    def _static_packed(self, p: Any) -> Any:
        tokens = p._dms_doc_ids.shape[-1]
        out = copy.copy(p)
        _drop_caches(out)
        for name in _PER_TOKEN:
            setattr(out, name, getattr(p, name).clone())
        buffers: dict[int, torch.Tensor] = {}
        for name in _CU_FIELDS:
            cu = getattr(p, name, None)
            if cu is not None:
                if id(cu) not in buffers:
                    buffers[id(cu)] = torch.full((tokens + 1,), tokens, dtype=cu.dtype, device=cu.device)
                setattr(out, name, buffers[id(cu)])
        for name in _MAX_FIELDS:
            if getattr(out, name, None) is not None:
                setattr(out, name, tokens)
        return out

    def load(self, stage_input: torch.Tensor | None, args: tuple, kwargs: dict) -> None:
        """Copy this micro-batch's inputs into the static buffers (a few small copies, no host sync)."""
        if stage_input is not None:
            self.stage_input.copy_(stage_input)  # type: ignore[union-attr]
        for static, incoming in zip(self.args, args, strict=True):
            self._load(static, incoming)
        for name, incoming in kwargs.items():
            self._load(self.kwargs[name], incoming)

    def drop_caches(self) -> None:
        """Forget what a forward cached on the static packed sequence (the per-token rotary tables):
        a capture must compute it inside the graph, from the static positions, not reuse the warm-up's."""
        for x in (*self.args, *self.kwargs.values()):
            if _is_packed(x):
                _drop_caches(x)

    @staticmethod
    def _load(static: Any, incoming: Any) -> None:
        if isinstance(static, torch.Tensor):
            static.copy_(incoming)
        elif _is_packed(static):
            for name in _PER_TOKEN:
                getattr(static, name).copy_(getattr(incoming, name))
            done: set[int] = set()
            for name in _CU_FIELDS:
                cu, buf = getattr(incoming, name, None), getattr(static, name, None)
                if cu is None or id(buf) in done:
                    continue
                done.add(id(buf))
                n = cu.shape[0]
                buf[:n].copy_(cu)
                buf[n:].fill_(buf.shape[0] - 1)  # the token count: empty documents at the end


class TeacherGraph:
    """Runs ``model(*args, **kwargs)`` (the frozen teacher stage, under ``no_grad``) as CUDA-graph
    replays, one graph per input signature; ``capture`` is ``cuda_capture`` (tests pass a stand-in)."""

    def __init__(self, model: torch.nn.Module, max_graphs: int = 4, capture: Capture | None = None) -> None:
        self.model = model
        self.max_graphs = max_graphs
        self._capture = capture or cuda_capture
        self._pool = torch.cuda.graph_pool_handle() if capture is None else None
        self._graphs: dict[tuple, _Entry] = {}
        self._warned: set[str] = set()
        self.replays = 0  # micro-batches served by a replay (for logs and tests)

    def _eager(self, why: str, stage_input: torch.Tensor | None, args: tuple, kwargs: dict) -> torch.Tensor:
        if why not in self._warned:
            self._warned.add(why)
            log.warning("teacher CUDA graph: %s; this forward runs eagerly", why)
        if stage_input is not None:
            self.model.set_input_tensor(stage_input)
        with torch.no_grad():
            return self.model(*args, **kwargs)

    def __call__(self, stage_input: torch.Tensor | None, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The teacher's output for this micro-batch; ``stage_input``: the stage's input tensor on a
        pipeline stage after the first (None on the first)."""
        try:
            key = (
                _key(stage_input),
                tuple(_key(a) for a in args),
                tuple((k, _key(v)) for k, v in sorted(kwargs.items())),
            )
        except _UnsupportedArgumentError as exc:
            return self._eager(str(exc), stage_input, args, kwargs)
        entry = self._graphs.get(key)
        if entry is None:
            if len(self._graphs) >= self.max_graphs:
                return self._eager(f"more than {self.max_graphs} input signatures", stage_input, args, kwargs)
            entry = self._new_entry(key, stage_input, args, kwargs)
        else:
            entry.load(stage_input, args, kwargs)
        entry.replay()  # type: ignore[misc]
        self.replays += 1
        return entry.output.clone()  # type: ignore[union-attr]

    def _new_entry(self, key: tuple, stage_input: torch.Tensor | None, args: tuple, kwargs: dict) -> _Entry:
        entry = _Entry(stage_input, args, kwargs)
        entry.load(stage_input, args, kwargs)  # the cu_seqlens padding

        def forward() -> torch.Tensor:
            entry.drop_caches()
            if entry.stage_input is not None:
                self.model.set_input_tensor(entry.stage_input)
            with torch.no_grad():
                return self.model(*entry.args, **entry.kwargs)

        try:
            entry.replay, entry.output = self._capture(forward, self._pool)
        except Exception as exc:
            raise RuntimeError(
                f"capturing the teacher's forward as a CUDA graph failed ({type(exc).__name__}: {exc}); "
                "run with train.teacher_cuda_graph=false"
            ) from exc
        self._graphs[key] = entry
        log.info(
            "teacher CUDA graph %d captured (%d tokens a micro-batch)",
            len(self._graphs),
            _tokens(args, kwargs),
        )
        return entry


def _drop_caches(packed: Any) -> None:
    for name in list(vars(packed)):
        if name.startswith("_dms_") and name not in _PER_TOKEN:
            delattr(packed, name)


def _tokens(args: tuple, kwargs: dict) -> int:
    for x in (*args, *kwargs.values()):
        if isinstance(x, torch.Tensor):
            return x.shape[-1]
    return 0
