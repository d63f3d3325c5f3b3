"""Independent, loop-based float64 oracles for the core math (written from docs/dms.md, not
from the implementation: scalar loops, no vectorised masking)."""

from __future__ import annotations

import math

import torch


def brute_log_keep(relaxed: torch.Tensor, doc: list[int] | None) -> torch.Tensor:
    """m[b, h, k] = log(1 - sigmoid(relaxed[b, h, k+1])) if k+1 is in k's document, else 0."""
    B, H, T = relaxed.shape
    rows = []
    for b in range(B):
        heads = []
        for h in range(H):
            vals = []
            for k in range(T):
                nxt = k + 1
                if nxt < T and (doc is None or doc[nxt] == doc[k]):
                    alpha = 1.0 / (1.0 + torch.exp(-relaxed[b, h, nxt]))
                    vals.append(torch.log(1.0 - alpha))
                else:
                    vals.append(relaxed.new_zeros(()))
            heads.append(torch.stack(vals))
        rows.append(torch.stack(heads))
    return torch.stack(rows)


def brute_dms_attention(
    q, k, v, relaxed, window: int, scale: float | None = None, doc: list[int] | None = None
):
    """Per query, per head: explicit loop over keys with the section-4 case analysis."""
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    g = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    m = None if relaxed is None else brute_log_keep(relaxed, doc)
    out = []
    for b in range(B):
        heads = []
        for h in range(Hq):
            j = h // g
            rows = []
            for i in range(T):
                scores, values = [], []
                for kk in range(i + 1):
                    if doc is not None and doc[kk] != doc[i]:
                        continue
                    s = (q[b, h, i] * k[b, j, kk]).sum() * scale
                    if m is not None and i - kk > window:
                        s = s + m[b, j, kk]
                    scores.append(s)
                    values.append(v[b, j, kk])
                w = torch.softmax(torch.stack(scores), dim=0)
                rows.append((w[:, None] * torch.stack(values)).sum(0))
            heads.append(torch.stack(rows))
        out.append(torch.stack(heads))
    return torch.stack(out)


def brute_kl(zs: torch.Tensor, zt: torch.Tensor, reverse: bool, tau: float = 1.0) -> torch.Tensor:
    ls = torch.log_softmax(zs.double() / tau, -1)
    lt = torch.log_softmax(zt.double() / tau, -1)
    if reverse:
        return (lt.exp() * (lt - ls)).sum(-1)
    return (ls.exp() * (ls - lt)).sum(-1)
