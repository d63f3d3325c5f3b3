"""Training-free baselines (StreamingLLM, TOVA, H2O) as tensors, for evaluation at scale: rows of
sequences of equal length advance one token per step in lockstep, each row with its own policy and
budget, and the whole step is one CUDA graph on GPUs.

The rule is ``baselines.py``'s, decided after every token (the per-token reference path is the oracle,
``tests/unit/test_baseline_cache.py``): after token ``t`` attends, a stream holding more than
``budget[t]`` tokens drops one:

* StreamingLLM: the oldest token past the ``sink`` first ones;
* TOVA: the token (other than the newest) with the lowest attention weight of the current query,
  averaged over the KV group's query heads;
* H2O: among held tokens except the most recent ``max(1, budget // 2)``, the one with the lowest
  attention accumulated over every query so far.

A row's budget is either a CR (``max(min_keep, ceil((t + 1) / cr))`` per stream, the reference's rule)
or a schedule ``budgets[row, t]`` given by the caller (e.g. the KV memory another model held at each
step, for comparisons at equal memory); both become one ``[R, max_len]`` table read at the device-side
step counter, so a CUDA graph serves every step.

Cost: rows are stored grouped by policy (each rule is computed only on its own rows) and a step attends
over the first ``bucket``-multiple of slots that can hold tokens (one CUDA graph per bucket, replaced when
the sequence enters the next bucket). Storage is dense (``[layer, row, head, max_len]`` with a held
mask): the baselines are compared on quality; the memory savings of eviction are measured on the DMS
engine.

Shapes: R rows, L layers, H KV heads, g query heads per KV head, D head dim, T slots (``max_len``),
W the current bucket width (``<= T``).
"""

from __future__ import annotations

import math

import torch

from dms_megatron.inference.model import DMSCausalLM

KINDS = {"streaming_llm": 0, "tova": 1, "h2o": 2}


class BaselineKV:
    """``decode(tokens [R]) -> logits [R, V]`` for R rows in lockstep; see the module docstring.

    ``policies``: ``(name, cr)`` per row; ``cr=None`` makes the row follow ``budgets[row]`` (``[R,
    max_len]`` long: tokens a stream may hold after token ``t``; at least ``min_keep`` is kept)."""

    def __init__(
        self,
        model: DMSCausalLM,
        policies: list[tuple[str, float | None]],
        max_len: int,
        sink: int = 4,
        min_keep: int = 8,
        cuda_graphs: bool = True,
        budgets: torch.Tensor | None = None,
        bucket: int = 1024,
    ) -> None:
        if model.dms is not None:
            raise ValueError("baselines run on the original model: pass a model with dms = None")
        if not policies:
            raise ValueError("no rows (policies) given")
        for name, cr in policies:
            if name not in KINDS:
                raise ValueError(f"unknown baseline {name!r}: one of {sorted(KINDS)}")
            if cr is not None and cr < 1:
                raise ValueError(f"cr must be >= 1, got {cr}")
        if max_len > model.arch.max_position_embeddings:
            raise ValueError(
                f"max_len {max_len} exceeds the model context {model.arch.max_position_embeddings}"
            )
        if bucket < 1:
            raise ValueError(f"bucket must be >= 1, got {bucket}")
        scheduled = [r for r, (_, cr) in enumerate(policies) if cr is None]
        if scheduled and (budgets is None or tuple(budgets.shape) != (len(policies), max_len)):
            got = None if budgets is None else tuple(budgets.shape)
            raise ValueError(
                f"rows without a cr follow budgets[row]: pass budgets of shape "
                f"({len(policies)}, {max_len}), got {got}"
            )
        m, dev, dt = model, model.device, model.dtype
        self.model, self.max_len, self.sink, self.min_keep = model, max_len, sink, min_keep
        self.bucket = bucket
        self.R, self.L, self.H, self.D, self.g = len(policies), m.arch.num_layers, m.hkv, m.d, m.hq // m.hkv
        # rows are stored grouped by kind; _order maps storage -> caller rows, _inverse back
        order = sorted(range(self.R), key=lambda r: KINDS[policies[r][0]])
        self._order = torch.tensor(order, device=dev)
        self._inverse = torch.argsort(self._order)
        self._identity = order == list(range(self.R))
        kinds = [KINDS[policies[r][0]] for r in order]
        self._slices = {
            k: (kinds.index(k), len(kinds) - kinds[::-1].index(k)) for k in KINDS.values() if k in kinds
        }
        shape = (self.L, self.R, self.H, max_len)
        self.k = torch.zeros(*shape, self.D, device=dev, dtype=dt)
        self.v = torch.zeros_like(self.k)
        self._held = torch.zeros(shape, device=dev, dtype=torch.bool)
        a, b = self._slices.get(KINDS["h2o"], (0, 0))
        # H2O's accumulated attention, float64 like the reference (its rows only)
        self.acc = torch.zeros(self.L, b - a, self.H, max_len, device=dev, dtype=torch.float64)
        seen = torch.arange(1, max_len + 1, device=dev, dtype=torch.float64)
        rows = []
        for r in order:
            cr = policies[r][1]
            if cr is None:
                rows.append(budgets[r].to(dev, torch.long).clamp(min=min_keep))
            else:
                cr_t = torch.tensor(float(cr), device=dev, dtype=torch.float64)
                rows.append(torch.clamp(torch.ceil(seen / cr_t), min=min_keep).long())
        self.budget = torch.stack(rows)  # [R, T] (storage order)
        self.t = torch.zeros((), device=dev, dtype=torch.long)  # tokens seen by every row
        self.steps = 0
        self._idx = torch.arange(max_len, device=dev)
        # StreamingLLM's order of eviction: past the sinks oldest first, then the sinks (exact in float32)
        self._stream_rank = torch.where(self._idx < sink, self._idx + 2 * max_len, self._idx).float()
        self.cuda_graphs = cuda_graphs and dev.type == "cuda"
        self._graph: tuple[int, torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor] | None = None

    @property
    def held_mask(self) -> torch.Tensor:
        """``[layer, row, head, slot]``: the slots each stream holds (caller's row order)."""
        return self._held if self._identity else self._held[:, self._inverse]

    def held(self) -> torch.Tensor:
        """Tokens held per ``[layer, row, head]``."""
        n = self._held.sum(-1)
        return n if self._identity else n[:, self._inverse]

    def stream_cr_mean(self) -> torch.Tensor:
        """Per row: tokens seen / tokens held, averaged over layers and heads (a diagnostic)."""
        return (self.steps / self.held().float().clamp(min=1)).mean((0, 2))

    def memory_cr(self) -> torch.Tensor:
        """Per row: tokens seen x streams / tokens held over all streams (the KV memory factor)."""
        return self.steps * self.L * self.H / self.held().sum((0, 2)).float().clamp(min=1)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.steps >= self.max_len:
            raise ValueError(f"all {self.max_len} positions are used")
        self.steps += 1
        width = min(self.max_len, math.ceil(self.steps / self.bucket) * self.bucket)
        if not self.cuda_graphs or self.steps == 1:  # the first step warms up (compiles, lazy state)
            return self._run(tokens, width)
        if self._graph is None or self._graph[0] != width:
            self._graph = None  # the previous bucket's graph is never replayed again: free its memory
            static = tokens.clone()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self._run(static, width)
            self._graph = (width, graph, static, out)
        _, graph, static, out = self._graph
        static.copy_(tokens)
        graph.replay()
        return out

    def _run(self, tokens: torch.Tensor, width: int) -> torch.Tensor:
        if self._identity:
            return self._step(tokens, width)
        return self._step(tokens[self._order], width)[self._inverse]

    def _step(self, tokens: torch.Tensor, width: int) -> torch.Tensor:
        m, R, H, g, D = self.model, self.R, self.H, self.g, self.D
        t = self.t
        pos = t.expand(R)
        h = m.w["model.embed_tokens.weight"][tokens]
        budget = self.budget.index_select(1, t.view(1))[:, 0]  # [R]
        newest = self._idx[:width] == t  # the newest token's slot
        for layer in range(self.L):
            q, k, v, _ = m.attention_inputs(layer, h, pos)
            self.k[layer].index_copy_(2, t.view(1), k[:, :, None].to(self.k.dtype))
            self.v[layer].index_copy_(2, t.view(1), v[:, :, None].to(self.v.dtype))
            keys, values = self.k[layer, :, :, :width], self.v[layer, :, :, :width]
            held = self._held[layer, :, :, :width]
            held |= newest
            scores = torch.einsum("rhgd,rhtd->rhgt", q.view(R, H, g, D).float(), keys.float())
            scores = (scores / math.sqrt(D)).masked_fill(~held[:, :, None], -math.inf)
            probs = torch.softmax(scores, -1)
            out = probs @ values.float()  # [R, H, g, D]
            h = m.finish_layer(layer, h, out.reshape(R, -1).to(h.dtype))
            self._evict(layer, held, probs.mean(2), budget, newest)  # weight [R, H, W], 0 where not held
        self.t += 1
        return m.head(h)

    def _evict(
        self, layer: int, held: torch.Tensor, weight: torch.Tensor, budget: torch.Tensor, newest: torch.Tensor
    ) -> None:
        width = held.shape[-1]
        n_held = held.sum(-1)  # [R, H]
        drop = n_held > budget[:, None]
        for kind, (a, b) in self._slices.items():
            h = held[a:b]
            if kind == KINDS["streaming_llm"]:  # oldest past the sinks (sinks only if nothing else)
                score = self._stream_rank[:width].masked_fill(~h, math.inf)
            elif kind == KINDS["tova"]:  # least attended by this query, never the newest
                score = weight[a:b].masked_fill(~h | newest, math.inf)
            else:  # least accumulated attention outside the most recent max(1, budget // 2) held
                acc = self.acc[layer, :, :, :width]
                acc += weight[a:b].double()
                after = n_held[a:b, :, None] - h.cumsum(-1)  # held tokens after each slot
                recent = torch.clamp(budget[a:b] // 2, min=1)[:, None, None]
                cand = h & (after >= recent)
                cand = torch.where(cand.any(-1, keepdim=True), cand, h & (after >= 1))
                score = acc.masked_fill(~cand, math.inf)
            victim = score.argmin(-1, keepdim=True)  # first minimum: the oldest among ties
            h.scatter_(-1, victim, h.gather(-1, victim) & ~drop[a:b, :, None])
