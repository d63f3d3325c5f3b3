"""Training-free KV eviction baselines at a given compression ratio, run in the same engine as DMS
(``DecodeSession(model, pool, policy=...)`` on the original model, eviction logits off).

Budget: after token ``t`` each (layer, KV head) stream keeps at most ``ceil((t + 1) / cr)`` tokens (at
least ``min_keep``), so the memory CR equals ``cr`` throughout a sequence, as DMS is compared at.

* ``StreamingLLM``: the first ``sink`` tokens plus the most recent ones (Xiao et al., 2023).
* ``TOVA``: drop the held token with the lowest attention weight from the current query, averaged over
  the query heads of the KV group (Oren et al., 2024).
* ``H2O``: keep the most recent half of the budget; among older tokens drop the one with the lowest
  attention accumulated over all queries so far (Zhang et al., 2023).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class BudgetPolicy:
    cr: float
    min_keep: int = 8

    def __post_init__(self) -> None:
        if self.cr < 1:
            raise ValueError(f"cr must be >= 1, got {self.cr}")
        if self.min_keep < 1:
            raise ValueError(f"min_keep must be >= 1, got {self.min_keep}")

    name = "budget"

    def budget(self, seen: int) -> int:
        return max(self.min_keep, math.ceil(seen / self.cr))

    def choose(
        self, key: tuple[int, int], positions: list[int], weights: torch.Tensor, excess: int
    ) -> list[int]:
        """Positions to drop from one stream (``weights [held]``: this query's attention, group mean)."""
        raise NotImplementedError


@dataclass
class StreamingLLM(BudgetPolicy):
    sink: int = 4
    name = "streaming_llm"

    def choose(self, key, positions, weights, excess):
        older = [p for p in positions if p >= self.sink] or positions
        return older[:excess]


@dataclass
class TOVA(BudgetPolicy):
    name = "tova"

    def choose(self, key, positions, weights, excess):
        order = torch.argsort(weights[:-1], stable=True)  # never the token just added
        return [positions[i] for i in order[:excess].tolist()]


@dataclass
class H2O(BudgetPolicy):
    name = "h2o"
    scores: dict = field(default_factory=dict)  # (layer, head) -> {position: accumulated attention}

    def observe(self, key: tuple[int, int], positions: list[int], weights: torch.Tensor) -> None:
        acc = self.scores.setdefault(key, {})
        for p, wgt in zip(positions, weights.tolist(), strict=True):
            acc[p] = acc.get(p, 0.0) + wgt

    def choose(self, key, positions, weights, excess):
        acc = self.scores[key]
        recent = max(1, self.budget(positions[-1] + 1) // 2)
        candidates = positions[:-recent] or positions[:-1]
        drop = sorted(candidates, key=lambda p: (acc.get(p, 0.0), p))[:excess]
        for p in drop:
            acc.pop(p, None)
        return drop


POLICIES = {"streaming_llm": StreamingLLM, "tova": TOVA, "h2o": H2O}
