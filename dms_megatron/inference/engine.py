"""Batch generation on the CPU reference path: requests share one block pool; each has its own
compressed streams; a failing request (bad input, pool exhausted) returns its blocks and an error
without touching the others. Greedy or sampled (temperature, top-p, per-request seed), stop tokens.

Metrics per request (``request_metrics``, shared with the batched engine): tokens seen and held per
[layer, KV head], ``memory_cr`` (all seen / all held: the factor the KV bytes shrank), ``stream_cr_mean``
(seen / held averaged over streams, a diagnostic inflated by per-head spread), peak KV tokens and
bytes, KV-cache token reads per generated token, prefill and decode tokens/s.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from dms_megatron.inference.model import DecodeSession, DMSCausalLM, kv_crs
from dms_megatron.inference.paged_cache import BlockPool


@dataclass
class Request:
    prompt: list[int]
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    stop_ids: tuple[int, ...] = ()
    seed: int = 0


@dataclass
class Result:
    tokens: list[int]
    finish_reason: str  # stop | length | error
    error: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)


def validate(request: Request, model: DMSCausalLM) -> None:
    """Clear errors for requests that cannot run."""
    a = model.arch
    if not request.prompt:
        raise ValueError("the prompt is empty")
    if any(t < 0 or t >= a.vocab_size for t in request.prompt):
        raise ValueError(f"prompt token ids must be in [0, {a.vocab_size})")
    if request.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {request.max_new_tokens}")
    if len(request.prompt) + request.max_new_tokens > a.max_position_embeddings:
        raise ValueError(
            f"prompt ({len(request.prompt)}) + max_new_tokens ({request.max_new_tokens}) exceeds the "
            f"model context of {a.max_position_embeddings} positions"
        )
    if request.temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {request.temperature}")
    if not 0 < request.top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {request.top_p}")


def request_metrics(
    request: Request,
    out: list[int],
    seen: float,
    held: torch.Tensor,
    peak: int,
    bytes_per_kv_token: int,
    reads: float,
    decoded: int,
    t_prefill: float,
    t_decode: float,
) -> dict[str, Any]:
    """The per-request metrics both engines report (module docstring); ``held [layer, KV head]``."""
    crs = kv_crs(seen, held)
    return {
        "prompt_tokens": len(request.prompt),
        "generated_tokens": len(out),
        "tokens_seen": seen,
        "tokens_held": held.float().tolist(),
        **crs,
        "peak_kv_tokens": peak,
        "peak_kv_bytes": peak * bytes_per_kv_token,
        "kv_reads_per_generated_token": reads / max(len(out) - 1, 1),
        "prefill_tokens_per_s": len(request.prompt) / max(t_prefill, 1e-9),
        "decode_tokens_per_s": decoded / max(t_decode, 1e-9),
    }


def sample(logits: torch.Tensor, request: Request, gen: torch.Generator) -> int:
    """Greedy (temperature 0) or temperature + top-p sampling with the request's generator."""
    if request.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / request.temperature, -1)
    if request.top_p < 1:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < request.top_p  # the smallest prefix reaching top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs / probs.sum(), 1, generator=gen))


class Engine:
    """Reference generation engine (CPU); see the module docstring."""

    def __init__(
        self,
        model: DMSCausalLM,
        num_blocks: int,
        block_size: int = 16,
        prefill_chunk: int = 256,
        on_token: Any = None,
    ) -> None:
        """``on_token(request_index, token, session)``: called for every generated token (streaming)."""
        self.model, self.on_token = model, on_token
        self.pool = BlockPool(num_blocks, block_size, model.d, dtype=torch.float32)
        self.prefill_chunk = prefill_chunk

    def generate(self, requests: list[Request]) -> list[Result]:
        if not requests:
            raise ValueError("no requests (batch of zero)")
        return [self._one(i, r) for i, r in enumerate(requests)]

    def _one(self, index: int, request: Request) -> Result:
        try:
            validate(request, self.model)
        except ValueError as exc:
            return Result([], "error", str(exc))
        session = DecodeSession(self.model, self.pool)
        gen = torch.Generator().manual_seed(request.seed)
        out: list[int] = []
        peak = 0
        try:
            t0 = time.perf_counter()
            logits = session.prefill(request.prompt, self.prefill_chunk)[-1]
            t_prefill = time.perf_counter() - t0
            peak = int(session.held().sum())
            reads0 = session.reads
            t0 = time.perf_counter()
            reason = "length"
            for i in range(request.max_new_tokens):
                token = sample(logits, request, gen)
                out.append(token)
                if self.on_token is not None:
                    self.on_token(index, token, session)
                if token in request.stop_ids:
                    reason = "stop"
                    break
                if i + 1 < request.max_new_tokens:
                    logits = session.step(token)
                    peak = max(peak, int(session.held().sum()))
            t_decode = time.perf_counter() - t0
            metrics = request_metrics(
                request, out, float(session.position), session.held(), peak,
                2 * self.model.d * 2,  # K and V per (layer, KV head) token, bf16 serving
                session.reads - reads0, len(out), t_prefill, t_decode,
            )  # fmt: skip
            return Result(out, reason, None, metrics)
        except Exception as exc:  # this request fails alone; its blocks go back to the pool
            return Result(out, "error", f"{type(exc).__name__}: {exc}")
        finally:
            session.release()
