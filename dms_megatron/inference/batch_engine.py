"""Continuous-batching generation on the compressed cache (``compressed_cache.CompressedKV``): the
engine for GPUs (it also runs on CPU, where tests compare it with the per-token reference path).

Memory: a KV budget (``kv_budget_gib``) pays for the window rings of up to ``max_batch`` rows (a fixed
size per row) and a pool of blocks for everything older that was kept (``num_blocks`` instead sets the
pool directly). Requests wait in a queue and are **admitted by the blocks they will really hold**: a
request enters when a row is free and the pool's free blocks cover its prompt at the memory CR observed
so far on admitted prompts (the export's recorded CR before the first one; 1 without any), plus one
block per stream of headroom -- never by the dense worst case. A prefill runs in chunks into its row,
then every step decodes one token for all rows (paged decode kernel for the pages, dense attention over
the window ring). When the pool runs out (a prefill or a decode step needs a block that is not there)
the youngest row is **preempted**: its blocks go back, its request returns to the front of the queue
and later starts over (its tokens are recomputed and come out the same: greedy, or sampling from the
request's seed; tokens already streamed are not streamed twice), and no request is admitted until a
row finishes. Only a request that cannot fit in the whole pool alone ends with an error.

Same ``Request`` / ``Result`` / metrics as the reference ``engine.Engine``, plus per request
``queue_s``, ``preemptions``, ``kv_blocks`` (pool blocks held at the end, the peak: pages only grow),
and pool and step-time metrics in ``BatchEngine.last_batch`` (decode step p50 / p99: the time per
output token of every active row).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from dms_megatron.inference.compressed_cache import CompressedKV, kv_bytes
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


class _PreemptedError(Exception):
    """A row had to give its blocks back; its request goes back to the queue."""


def pool_blocks_for_budget(
    model: DMSCausalLM, kv_budget_bytes: float, block_size: int, max_batch: int
) -> int:
    """Pool blocks a KV budget buys once the window rings of ``max_batch`` rows are paid for; a
    ``ValueError`` with the numbers when not even one row fits."""
    block, ring = kv_bytes(model, block_size)
    streams = model.arch.num_layers * model.hkv
    blocks = int((kv_budget_bytes - max_batch * ring) // block)
    if blocks < 2 * streams:
        raise ValueError(
            f"a KV budget of {kv_budget_bytes / 2**30:.3f} GiB leaves {max(blocks, 0)} blocks after the "
            f"window rings of max_batch={max_batch} rows ({max_batch * ring / 2**30:.3f} GiB); one row "
            f"needs at least {2 * streams} blocks of {block} B: raise the budget or lower max_batch"
        )
    return blocks


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1)]


class BatchEngine:
    """See the module docstring. ``on_token(request_index, token, live_cr)`` streams tokens; ``live_cr``
    = tokens seen x streams / tokens held over all (layer, KV head) streams of the request."""

    def __init__(
        self,
        model: DMSCausalLM,
        num_blocks: int | None = None,
        block_size: int = 16,
        max_batch: int = 32,
        prefill_chunk: int = 1024,
        backend: str = "auto",
        on_token: Any = None,
        kv_budget_gib: float | None = None,
    ) -> None:
        if max_batch < 1 or prefill_chunk < 1:
            raise ValueError(f"max_batch and prefill_chunk must be >= 1, got {max_batch}, {prefill_chunk}")
        if (num_blocks is None) == (kv_budget_gib is None):
            raise ValueError("give exactly one of num_blocks and kv_budget_gib")
        if kv_budget_gib is not None:
            if not kv_budget_gib > 0:
                raise ValueError(f"kv_budget_gib must be > 0, got {kv_budget_gib}")
            num_blocks = pool_blocks_for_budget(model, kv_budget_gib * 2**30, block_size, max_batch)
        self.model, self.max_batch, self.prefill_chunk, self.on_token = (
            model,
            max_batch,
            prefill_chunk,
            on_token,
        )
        self.cache = CompressedKV(model, num_blocks, block_size, backend=backend)  # type: ignore[arg-type]
        self.block_bytes, self.ring_bytes = kv_bytes(model, block_size)
        self.kv_budget_bytes = num_blocks * self.block_bytes + max_batch * self.ring_bytes  # type: ignore[operator]
        dms = model.dms
        self._prior_cr = float((dms.trained_cr or dms.target_cr or 1.0) if dms is not None else 1.0)
        self.last_batch: dict[str, float] = {}

    def _sync(self) -> None:
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)

    # ---- admission --------------------------------------------------------------------------------
    def _memory_cr_estimate(self) -> float:
        return self._seen_admitted / self._held_admitted if self._held_admitted else self._prior_cr

    def _blocks_needed(self, request: Request) -> int:
        """Pool blocks the prompt will hold at the memory CR seen so far, plus one per stream."""
        c, n = self.cache, len(request.prompt)
        held = n / max(self._memory_cr_estimate(), 1.0)
        pages = max(0.0, held - min(n, c.W))
        return c.L * c.H * (math.ceil(pages / c.bs) + 2)

    def _can_admit(self, request: Request, rows: int) -> bool:
        if rows >= self.max_batch or self._hold_admissions:
            return False
        return rows == 0 or self._blocks_needed(request) <= len(self.cache.free)

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
        self._streamed = [0] * len(requests)
        self._queued_at = [time.perf_counter()] * len(requests)
        self._queue_s = [0.0] * len(requests)
        self._preemptions = [0] * len(requests)
        self._seen_admitted = self._held_admitted = 0.0
        self._hold_admissions = False
        t_start, steps, decoded = time.perf_counter(), 0, 0
        decode_time, admitted, peak_blocks, peak_rows, row_steps = 0.0, 0, 0, 0, 0
        step_ms: list[float] = []
        while queue or active:
            while queue and self._can_admit(requests[queue[0]], len(active)):
                index = queue.pop(0)
                admitted += 1
                try:
                    a = self._admit(index, requests, results, len(active))
                except _PreemptedError:
                    queue.insert(0, index)
                    self._hold_admissions = True
                    break
                if a is not None:
                    active.append(a)
            self._retire(active, results)
            if not active:
                if queue and self._hold_admissions:
                    self._hold_admissions = False  # nothing left to wait for
                continue
            if not self._reserve_or_preempt(active, queue, results):
                continue
            peak_blocks = max(peak_blocks, self.cache.allocated_blocks())
            peak_rows = max(peak_rows, len(active))
            t0 = time.perf_counter()
            tokens = torch.tensor([a.pending for a in active], device=self.model.device)
            logits = self.cache.decode(tokens)
            held = self.cache.held().sum((0, 2))
            greedy = logits.argmax(-1)
            host = torch.stack([greedy, held]).tolist()
            self._sync()
            dt = time.perf_counter() - t0
            decode_time += dt
            step_ms.append(1000 * dt)
            steps += 1
            decoded += len(active)
            row_steps += len(active)
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
        ran = [i for i, r in enumerate(results) if r is not None and r.metrics]
        self.last_batch = {
            "requests": len(requests),
            "decode_steps": steps,
            "decode_tokens": decoded,
            "decode_tokens_per_s": decoded / max(decode_time, 1e-9),
            "wall_s": time.perf_counter() - t_start,
            "kv_budget_bytes": self.kv_budget_bytes,
            "pool_blocks": self.cache.num_blocks,
            "block_bytes": self.block_bytes,
            "ring_bytes_per_row": self.ring_bytes,
            "peak_pool_blocks_used": peak_blocks,
            "peak_rows": peak_rows,
            "mean_rows_per_decode_step": row_steps / max(steps, 1),
            "admissions": admitted,
            "preemptions": sum(self._preemptions),
            "queue_s_mean": sum(self._queue_s[i] for i in ran) / max(len(ran), 1),
            "decode_step_ms_p50": _percentile(step_ms, 50),
            "decode_step_ms_p99": _percentile(step_ms, 99),
        }
        return [r if r is not None else Result([], "error", "not run") for r in results]

    def _reserve_or_preempt(
        self, active: list[_Active], queue: list[int], results: list[Result | None]
    ) -> bool:
        """Reserve every stream's next block; when the pool is short, preempt the youngest row (or fail
        it if it is alone). True when the step can run."""
        try:
            self.cache.reserve()
            return True
        except CacheFullError as exc:
            if len(active) == 1:
                self._finish(
                    active, 0, results, "error", f"CacheFullError: {exc} (the request alone does not fit)"
                )
                return False
            self._preempt(active, len(active) - 1, queue)
            return False

    def _preempt(self, active: list[_Active], j: int, queue: list[int]) -> None:
        a = active.pop(j)
        self.cache.remove_rows([j])
        self._preemptions[a.index] += 1
        self._queued_at[a.index] = time.perf_counter()
        queue.insert(0, a.index)
        self._hold_admissions = True  # until a row finishes and frees its blocks

    # ---- per request ------------------------------------------------------------------------------
    def _admit(
        self, index: int, requests: list[Request], results: list[Result | None], others: int
    ) -> _Active | None:
        """Prefill a request into a new row. A full pool with other rows active raises ``_PreemptedError``
        (the row is removed; the caller requeues the request); alone, the request fails."""
        req = requests[index]
        self._queue_s[index] += time.perf_counter() - self._queued_at[index]
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
            self._seen_admitted += len(req.prompt) * streams
            self._held_admitted += held
            self._emit(a, sample(logits.cpu(), req, a.gen), len(req.prompt) * streams / max(held, 1))
            return a
        except CacheFullError as exc:
            if row is not None:
                self.cache.remove_rows([row])
            if others:
                self._preemptions[index] += 1
                self._queued_at[index] = time.perf_counter()
                raise _PreemptedError from exc
            results[index] = Result(a.out, "error", f"CacheFullError: {exc} (the request alone does not fit)")
            return None
        except Exception as exc:  # this request fails alone; its row and blocks go away
            if row is not None:
                self.cache.remove_rows([row])
            results[index] = Result(a.out, "error", f"{type(exc).__name__}: {exc}")
            return None

    def _emit(self, a: _Active, token: int, live_cr: float) -> None:
        a.out.append(token)
        a.pending = token
        if self.on_token is not None and len(a.out) > self._streamed[a.index]:  # not again after a preemption
            self._streamed[a.index] = len(a.out)
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
        metrics.update(
            queue_s=self._queue_s[a.index],
            preemptions=self._preemptions[a.index],
            kv_blocks=int(c.row_blocks()[j]),
        )
        c.remove_rows([j])
        self._hold_admissions = False  # its blocks are free: admission may resume
        results[a.index] = Result(a.out, reason, error, metrics)
