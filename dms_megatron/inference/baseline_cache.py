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

Storage is compact: a stream holds at most ``max(budget) + 1`` tokens (the newest one is added before
the eviction), so each has ``S = min(max_len, max(budget) + 1)`` slots, and a step's cost follows the
tokens held, not the tokens seen. The next token of a stream goes into the slot its last eviction freed
(or the first unused one), so the slots in use are always the first ``held`` ones; each slot records its
token's position, which orders StreamingLLM's eviction, H2O's recent window and every tie (the oldest
token first, as in the reference). Rows are stored grouped by policy (each rule is computed only on its
own rows) and a step attends over the first ``bucket``-multiple of slots that can be in use (one CUDA
graph per bucket, replaced when the sequence enters the next bucket).

Shapes: R rows, L layers, H KV heads, g query heads per KV head, D head dim, T positions (``max_len``),
S slots per stream, W the current bucket width (``<= S``).
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
        # A budget that grows by at most one token a step (every CR rule and every equal-memory schedule
        # does) keeps H2O's recent tokens a suffix of the positions: the recent window is then the last
        # max(1, budget // 2) positions seen, with no sort of the held positions at each step.
        self._recent_is_suffix = bool((self.budget[:, 1:] <= self.budget[:, :-1] + 1).all())
        # slots that can be in use while token t is added: min(t + 1, max budget before t + 1)
        most = self.budget.max(0).values.cummax(0).values.tolist()
        self._in_use = [min(t + 1, (most[t - 1] if t else 0) + 1) for t in range(max_len)]
        self.S = min(max_len, max(most) + 1)
        shape = (self.L, self.R, self.H, self.S)
        self.k = torch.zeros(*shape, self.D, device=dev, dtype=dt)
        self.v = torch.zeros_like(self.k)
        self._held = torch.zeros(shape, device=dev, dtype=torch.bool)
        self._pos = torch.full(shape, max_len, device=dev, dtype=torch.long)  # token position per slot
        self._free = torch.zeros(shape[:3], device=dev, dtype=torch.long)  # the slot the next token takes
        a, b = self._slices.get(KINDS["h2o"], (0, 0))
        # H2O's accumulated attention, float64 like the reference (its rows only)
        self.acc = torch.zeros(self.L, b - a, self.H, self.S, device=dev, dtype=torch.float64)
        self.t = torch.zeros((), device=dev, dtype=torch.long)  # tokens seen by every row
        self.steps = 0
        self._slot = torch.arange(self.S, device=dev)
        self.cuda_graphs = cuda_graphs and dev.type == "cuda"
        self._graph: tuple[int, torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor] | None = None

    @property
    def held_mask(self) -> torch.Tensor:
        """``[layer, row, head, position]``: the token positions each stream holds (caller's row order)."""
        dense = torch.zeros(*self._held.shape[:3], self.max_len + 1, dtype=torch.bool, device=self.k.device)
        dense.scatter_(-1, torch.where(self._held, self._pos, self.max_len), True)
        dense = dense[..., : self.max_len]
        return dense if self._identity else dense[:, self._inverse]

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
        width = min(self.S, math.ceil(self._in_use[self.steps - 1] / self.bucket) * self.bucket)
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
        for layer in range(self.L):
            q, k, v, _ = m.attention_inputs(layer, h, pos)
            free = self._free[layer][..., None]  # [R, H, 1]: the newest token's slot
            slot = free[..., None].expand(R, H, 1, D)
            self.k[layer].scatter_(2, slot, k[:, :, None].to(self.k.dtype))
            self.v[layer].scatter_(2, slot, v[:, :, None].to(self.v.dtype))
            self._pos[layer].scatter_(2, free, t.expand(R, H, 1))
            keys, values = self.k[layer, :, :, :width], self.v[layer, :, :, :width]
            held = self._held[layer, :, :, :width]
            newest = self._slot[:width] == free  # [R, H, W]
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
        pos = self._pos[layer, :, :, :width]
        victims = []
        for kind, (a, b) in self._slices.items():
            h, p = held[a:b], pos[a:b]
            if kind == KINDS["streaming_llm"]:  # oldest past the sinks (sinks only if nothing else)
                score = torch.where(p < self.sink, p + 2 * self.max_len, p).double().masked_fill(~h, math.inf)
            elif kind == KINDS["tova"]:  # least attended by this query, never the newest
                score = weight[a:b].masked_fill(~h | newest[a:b], math.inf)
            else:  # least accumulated attention outside the most recent max(1, budget // 2) held
                acc = self.acc[layer, :, :, :width]
                acc.masked_fill_(newest[a:b], 0.0)  # the newest token's slot starts afresh
                acc += weight[a:b].double()
                recent = torch.clamp(budget[a:b] // 2, min=1)[:, None, None]
                if self._recent_is_suffix:  # the recent held tokens are the positions t - recent + 1 .. t
                    limit = self.t - recent + 1
                else:
                    by_age = torch.where(h, p, -1).sort(-1, descending=True).values  # newest held first
                    limit = by_age.gather(-1, (recent - 1).clamp(max=width - 1).expand(*h.shape[:2], 1))
                cand = h & (p < limit)  # at least `recent` held tokens are newer
                cand = torch.where(cand.any(-1, keepdim=True), cand, h & ~newest[a:b])
                score = acc.masked_fill(~cand, math.inf)
            low = score.min(-1, keepdim=True).values
            victims.append(torch.where(score == low, p, self.max_len).argmin(-1, keepdim=True))  # oldest tie
        victim = torch.cat(victims) if len(victims) > 1 else victims[0]  # [R, H, 1]
        held.scatter_(-1, victim, held.gather(-1, victim) & ~drop[:, :, None])
        self._free[layer] = torch.where(drop, victim[..., 0], n_held)
