"""Training-free baselines (StreamingLLM, TOVA, H2O) as tensors, for evaluation at scale: rows of
sequences of equal length advance one token per step in lockstep, each row with its own policy and CR,
and the whole step is one CUDA graph on GPUs.

The rule is ``baselines.py``'s, decided after every token (the per-token reference path is the oracle,
``tests/unit/test_baseline_cache.py``): after token ``t`` attends, a stream holding more than
``max(min_keep, ceil((t + 1) / cr))`` tokens drops one:

* StreamingLLM: the oldest token past the ``sink`` first ones;
* TOVA: the token (other than the newest) with the lowest attention weight of the current query,
  averaged over the KV group's query heads;
* H2O: among held tokens except the most recent ``max(1, budget // 2)``, the one with the lowest
  attention accumulated over every query so far.

Storage is dense (``[layer, row, head, max_len]`` with a held mask): the baselines are compared on
quality at equal CR; the memory savings of eviction are measured on the DMS engine.
"""

from __future__ import annotations

import math

import torch

from dms_megatron.inference.model import DMSCausalLM

KINDS = {"streaming_llm": 0, "tova": 1, "h2o": 2}


class BaselineKV:
    """``decode(tokens [R]) -> logits [R, V]`` for R rows in lockstep; see the module docstring."""

    def __init__(
        self,
        model: DMSCausalLM,
        policies: list[tuple[str, float]],
        max_len: int,
        sink: int = 4,
        min_keep: int = 8,
        cuda_graphs: bool = True,
    ) -> None:
        if model.dms is not None:
            raise ValueError("baselines run on the original model: pass a model with dms = None")
        if not policies:
            raise ValueError("no rows (policies) given")
        for name, cr in policies:
            if name not in KINDS:
                raise ValueError(f"unknown baseline {name!r}: one of {sorted(KINDS)}")
            if cr < 1:
                raise ValueError(f"cr must be >= 1, got {cr}")
        if max_len > model.arch.max_position_embeddings:
            raise ValueError(
                f"max_len {max_len} exceeds the model context {model.arch.max_position_embeddings}"
            )
        m, dev, dt = model, model.device, model.dtype
        self.model, self.max_len, self.sink, self.min_keep = model, max_len, sink, min_keep
        self.R, self.L, self.H, self.D, self.g = len(policies), m.arch.num_layers, m.hkv, m.d, m.hq // m.hkv
        shape = (self.L, self.R, self.H, max_len)
        self.k = torch.zeros(*shape, self.D, device=dev, dtype=dt)
        self.v = torch.zeros_like(self.k)
        self.held_mask = torch.zeros(shape, device=dev, dtype=torch.bool)
        self.acc = torch.zeros(shape, device=dev, dtype=torch.float64)  # H2O (float64 like the reference)
        self.kind = torch.tensor([KINDS[n] for n, _ in policies], device=dev)
        self.cr = torch.tensor([float(c) for _, c in policies], device=dev, dtype=torch.float64)
        self.t = torch.zeros((), device=dev, dtype=torch.long)  # tokens seen by every row
        self.steps = 0
        self._idx = torch.arange(max_len, device=dev)
        self.cuda_graphs = cuda_graphs and dev.type == "cuda"
        self._graph: tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor] | None = None

    def held(self) -> torch.Tensor:
        """Tokens held per ``[layer, row, head]``."""
        return self.held_mask.sum(-1)

    def effective_cr(self) -> torch.Tensor:
        """Per row: tokens seen / tokens held, averaged over layers and heads."""
        return (self.steps / self.held().float().clamp(min=1)).mean((0, 2))

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.steps >= self.max_len:
            raise ValueError(f"all {self.max_len} positions are used")
        self.steps += 1
        if not self.cuda_graphs or self.steps == 1:  # the first step warms up (compiles, lazy state)
            return self._step(tokens)
        if self._graph is None:
            static = tokens.clone()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self._step(static)
            self._graph = (graph, static, out)
        graph, static, out = self._graph
        static.copy_(tokens)
        graph.replay()
        return out

    def _step(self, tokens: torch.Tensor) -> torch.Tensor:
        m, R, H, g = self.model, self.R, self.H, self.g
        t = self.t
        pos = t.expand(R)
        h = m.w["model.embed_tokens.weight"][tokens]
        budget = torch.clamp(torch.ceil((t + 1) / self.cr), min=self.min_keep).long()  # [R]
        after_t = self._idx == t  # the newest token's slot
        for layer in range(self.L):
            q, k, v, _ = m.attention_inputs(layer, h, pos)
            self.k[layer].index_copy_(2, t.view(1), k[:, :, None].to(self.k.dtype))
            self.v[layer].index_copy_(2, t.view(1), v[:, :, None].to(self.v.dtype))
            held = self.held_mask[layer]
            held |= after_t
            scores = torch.einsum("rhgd,rhtd->rhgt", q.view(R, H, g, self.D).float(), self.k[layer].float())
            scores = (scores / math.sqrt(self.D)).masked_fill(~held[:, :, None], -math.inf)
            probs = torch.softmax(scores, -1)
            out = probs @ self.v[layer].float()  # [R, H, g, D]
            h = m.finish_layer(layer, h, out.reshape(R, -1).to(h.dtype))
            weight = probs.mean(2)  # [R, H, T], 0 where not held
            acc = self.acc[layer]
            acc += weight.double()
            self._evict(held, weight, acc, budget, after_t)
        self.t += 1
        return m.head(h)

    def _evict(self, held, weight, acc, budget, newest) -> None:
        idx = self._idx.float()
        n_held = held.sum(-1)  # [R, H]
        drop = n_held > budget[:, None]
        # StreamingLLM: oldest past the sinks (sinks only if nothing else is held)
        stream = torch.where(self._idx < self.sink, idx + 1e9, idx).expand_as(weight)
        # TOVA: least attended by this query, never the newest
        tova = weight.masked_fill(newest, math.inf)
        # H2O: least accumulated attention outside the most recent max(1, budget // 2) held tokens
        after = held.flip(-1).long().cumsum(-1).flip(-1) - held.long()  # held tokens after each slot
        recent = torch.clamp(budget // 2, min=1)[:, None, None]
        cand = held & (after >= recent)
        cand = torch.where(cand.any(-1, keepdim=True), cand, held & (after >= 1))
        h2o = acc.masked_fill(~cand, math.inf)
        kind = self.kind[:, None, None]
        score = torch.where(kind == 0, stream.double(), torch.where(kind == 1, tova.double(), h2o))
        score = score.masked_fill(~held, math.inf)
        victim = score.argmin(-1, keepdim=True)  # first minimum: the oldest among ties
        held.scatter_(-1, victim, held.gather(-1, victim) & ~drop[..., None])
