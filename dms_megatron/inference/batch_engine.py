"""Continuous-batching generation on the compressed cache (``compressed_cache.CompressedKV``): the
engine for GPUs (it also runs on CPU, where tests compare it with the per-token reference path).

Requests wait in a queue; up to ``max_batch`` are active at once. A request is admitted by a chunked
prefill of its prompt into a new row, then every step decodes one token for all active rows together
(paged decode kernel for the pages, dense attention over the window ring). A row that stops (stop
token or length) returns its blocks at once and the next waiting request takes its place. A request
that fails (invalid input, pool exhausted) ends with an error and its blocks; the others go on.

Same ``Request`` / ``Result`` / metrics as the reference ``engine.Engine``, plus batch metrics in
``BatchEngine.last_batch``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from dms_megatron.inference.compressed_cache import CompressedKV
from dms_megatron.inference.engine import Request, Result, request_metrics, sample, validate
from dms_megatron.inference.model import DMSCausalLM
from dms_megatron.inference.paged_cache import CacheFullError


@dataclass
class _Active:
    index: int
    request: Request
    gen: torch.Generator
    out: list[int] = field(default_factory=list)
    peak: int = 0
    reads: int = 0
    t_prefill: float = 0.0
    t_decode: float = 0.0
    pending: int = -1  # the sampled token not yet fed to the model


class BatchEngine:
    """See the module docstring. ``on_token(request_index, token, live_cr)`` streams tokens; ``live_cr``
    = tokens seen x streams / tokens held over all (layer, KV head) streams of the request."""

    def __init__(
        self,
        model: DMSCausalLM,
        num_blocks: int,
        block_size: int = 16,
        max_batch: int = 32,
        prefill_chunk: int = 1024,
        backend: str = "auto",
        on_token: Any = None,
    ) -> None:
        if max_batch < 1 or prefill_chunk < 1:
            raise ValueError(f"max_batch and prefill_chunk must be >= 1, got {max_batch}, {prefill_chunk}")
        self.model, self.max_batch, self.prefill_chunk, self.on_token = (
            model,
            max_batch,
            prefill_chunk,
            on_token,
        )
        self.cache = CompressedKV(model, num_blocks, block_size, backend=backend)
        self.last_batch: dict[str, float] = {}

    def _sync(self) -> None:
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)

    def generate(self, requests: list[Request]) -> list[Result]:
        if not requests:
            raise ValueError("no requests (batch of zero)")
        results: list[Result | None] = [None] * len(requests)
        queue: list[int] = []
        for i, r in enumerate(requests):
            try:
                validate(r, self.model)
                queue.append(i)
            except ValueError as exc:
                results[i] = Result([], "error", str(exc))
        active: list[_Active] = []  # active[j] owns cache row j
        t_start, steps, decoded = time.perf_counter(), 0, 0
        decode_time = 0.0
        while queue or active:
            while queue and len(active) < self.max_batch:
                a = self._admit(queue.pop(0), requests, results)
                if a is not None:
                    active.append(a)
            self._retire(active, results)
            if not active:
                continue
            try:
                self.cache.reserve()
            except CacheFullError as exc:  # the youngest row that needs a block fails, the others go on
                victim = max(exc.rows)  # type: ignore[attr-defined]
                self._finish(active, victim, results, "error", f"CacheFullError: {exc}")
                continue
            t0 = time.perf_counter()
            tokens = torch.tensor([a.pending for a in active], device=self.model.device)
            logits = self.cache.decode(tokens)
            held = self.cache.held().sum((0, 2))
            greedy = logits.argmax(-1)
            host = torch.stack([greedy, held]).tolist()
            self._sync()
            dt = time.perf_counter() - t0
            decode_time += dt
            steps += 1
            decoded += len(active)
            for j, a in enumerate(active):
                a.t_decode += dt
                a.peak = max(a.peak, host[1][j])
                a.reads += host[1][j] * self.cache.g
                token = (
                    host[0][j] if a.request.temperature == 0 else sample(logits[j].cpu(), a.request, a.gen)
                )
                seen = len(a.request.prompt) + len(a.out)
                self._emit(a, token, seen * self.cache.L * self.cache.H / max(host[1][j], 1))
            self._retire(active, results)
        self.last_batch = {
            "requests": len(requests),
            "decode_steps": steps,
            "decode_tokens": decoded,
            "decode_tokens_per_s": decoded / max(decode_time, 1e-9),
            "wall_s": time.perf_counter() - t_start,
        }
        return [r if r is not None else Result([], "error", "not run") for r in results]

    # ---- per request ------------------------------------------------------------------------------
    def _admit(self, index: int, requests: list[Request], results: list[Result | None]) -> _Active | None:
        req = requests[index]
        a = _Active(index, req, torch.Generator().manual_seed(req.seed))
        row = None
        try:
            row = self.cache.add_row()
            t0 = time.perf_counter()
            ids = torch.tensor(req.prompt, device=self.model.device)
            logits = self.cache.prefill_chunked(row, ids, self.prefill_chunk)
            held = int(self.cache.held()[:, row].sum())
            self._sync()
            a.t_prefill = time.perf_counter() - t0
            a.peak = held
            streams = self.cache.L * self.cache.H
            self._emit(a, sample(logits.cpu(), req, a.gen), len(req.prompt) * streams / max(held, 1))
            return a
        except Exception as exc:  # this request fails alone; its row and blocks go away
            if row is not None:
                self.cache.remove_rows([row])
            results[index] = Result(a.out, "error", f"{type(exc).__name__}: {exc}")
            return None

    def _emit(self, a: _Active, token: int, live_cr: float) -> None:
        a.out.append(token)
        a.pending = token
        if self.on_token is not None:
            self.on_token(a.index, token, live_cr)

    def _retire(self, active: list[_Active], results: list[Result | None]) -> None:
        for j in range(len(active) - 1, -1, -1):
            a = active[j]
            if a.out and a.out[-1] in a.request.stop_ids:
                self._finish(active, j, results, "stop")
            elif len(a.out) >= a.request.max_new_tokens:
                self._finish(active, j, results, "length")

    def _finish(
        self,
        active: list[_Active],
        j: int,
        results: list[Result | None],
        reason: str,
        error: str | None = None,
    ) -> None:
        a = active.pop(j)
        c = self.cache
        metrics = request_metrics(
            a.request, a.out, float(c.seen[j]), c.held()[:, j], a.peak, 2 * c.D * c.k_pool.element_size(),
            a.reads, len(a.out) - 1, a.t_prefill, a.t_decode,
        )  # fmt: skip
        c.remove_rows([j])
        results[a.index] = Result(a.out, reason, error, metrics)
