"""Quality evaluations of one model under several KV policies, on the tensor engines (CPU or GPU):

* ``perplexity_and_kl(ids, prefixes)``: next-token perplexity and mean KL(teacher || policy) over the
  first ``n`` tokens of a long text, for each ``n`` in ``prefixes`` (one causal pass: the first ``n``
  positions of a pass over the whole text are exactly a pass over ``n`` tokens), with the effective CR
  reached at ``n``;
* ``passkey``: a 5-digit key hidden at a given depth of filler text, retrieved greedily (exact match);
* ``variable_tracking``: a chain ``VAR A = 12345 ... VAR B = A ...``; the model must name the variables
  holding the value (fraction found).

A policy is ``"teacher"`` (the original model, no eviction), ``"dms"`` (the retrofitted checkpoint with
its own decisions, ``CompressedKV`` with chunked prefill) or a baseline with a CR on the original model
(``BaselineKV``: every baseline row of a task advances token by token in one lockstep batch). All share
the model code (``DMSCausalLM``). ``teacher=None`` uses the checkpoint with eviction off, which is the
original model only when retrofitting left the base weights frozen (``train.mode=adapter``); pass the
original model for full-mode retrofits.
"""

from __future__ import annotations

import copy
import itertools
import random
from dataclasses import dataclass
from typing import Any

import torch

from dms_megatron.inference.baseline_cache import KINDS, BaselineKV
from dms_megatron.inference.batch_engine import BatchEngine
from dms_megatron.inference.compressed_cache import CompressedKV
from dms_megatron.inference.engine import Request, compression
from dms_megatron.inference.model import DMSCausalLM

# the pass-key haystack of Mohtashami & Jaggi (2023): retrieval without the noise of real text (on
# Shakespeare as the haystack, SmolLM2-135M finds 1 key in 5 at 2K tokens; on this, 4 in 5)
CLASSIC_FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


@dataclass(frozen=True)
class Policy:
    name: str  # teacher | dms | streaming_llm | tova | h2o
    cr: float = 1.0

    def __post_init__(self) -> None:
        if self.name not in ("teacher", "dms") and self.name not in KINDS:
            raise ValueError(f"unknown policy {self.name!r}: teacher, dms or one of {sorted(KINDS)}")

    @property
    def label(self) -> str:
        return self.name if self.name in ("teacher", "dms") else f"{self.name}@{self.cr:g}"

    @property
    def baseline(self) -> bool:
        return self.name in KINDS


def _variant(model: DMSCausalLM, dms: bool, teacher: DMSCausalLM | None = None) -> DMSCausalLM:
    if dms and model.dms is None:
        raise ValueError("policy 'dms' needs a checkpoint with a dms block in config.json")
    if dms:
        return model
    base = copy.copy(teacher if teacher is not None else model)
    base.dms = None
    return base


def _prefill_logits(model: DMSCausalLM, ids: list[int], stops: list[int], chunk: int):
    """Logits ``[T, V]`` of one sequence on the compressed cache, and the effective CR at each stop."""
    cache = CompressedKV(
        model, num_blocks=model.arch.num_layers * model.hkv * (len(ids) // 16 + 3), block_size=16
    )
    row = cache.add_row()
    ids_t = torch.tensor(ids, device=model.device)
    bounds = sorted({*range(0, len(ids), chunk), *stops, len(ids)})
    out, crs = [], {}
    for a, b in itertools.pairwise(bounds):
        out.append(cache.prefill(row, ids_t[a:b]))
        if b in stops:
            crs[b] = compression(b, cache.held()[:, row])
    return torch.cat(out), crs


def perplexity_and_kl(
    model: DMSCausalLM,
    policies: list[Policy],
    ids: list[int],
    prefixes: list[int],
    chunk: int = 1024,
    teacher: DMSCausalLM | None = None,
) -> dict[str, dict[str, dict[str, float]]]:
    """``{f"perplexity_{n}": {policy label: {perplexity, kl_to_teacher, effective_cr, kv_cr}}}``:
    ``effective_cr`` = tokens seen / held averaged over (layer, KV head) streams; ``kv_cr`` = all tokens
    seen / all tokens held, the factor by which the KV memory shrank (lower when a few streams keep
    many tokens)."""
    if max(prefixes) > len(ids):
        raise ValueError(f"prefix {max(prefixes)} is longer than the text ({len(ids)} tokens)")
    ids = ids[: max(prefixes)]
    dev = model.device
    target = torch.tensor(ids[1:], device=dev)
    t_logits, _ = _prefill_logits(_variant(model, False, teacher), ids, prefixes, chunk)
    t_logp = torch.log_softmax(t_logits[:-1].float(), -1)
    del t_logits
    per_pos: dict[str, tuple[torch.Tensor, torch.Tensor, dict[int, float]]] = {}

    def score(logits: torch.Tensor, positions: slice) -> tuple[torch.Tensor, torch.Tensor]:
        logp = torch.log_softmax(logits.float(), -1)
        tl = t_logp[positions]
        nll = -logp.gather(-1, target[positions][:, None])[:, 0]
        return nll, (tl.exp() * (tl - logp)).sum(-1)

    for p in policies:
        if p.name == "teacher":
            z = torch.zeros(len(ids) - 1, device=dev)
            nll = -t_logp.gather(-1, target[:, None])[:, 0]
            per_pos[p.label] = (nll, z, {n: (1.0, 1.0) for n in prefixes})
        elif p.name == "dms":
            logits, crs = _prefill_logits(model, ids, prefixes, chunk)
            nll, kl = score(logits[:-1], slice(None))
            per_pos[p.label] = (nll, kl, crs)
    rows = [p for p in policies if p.baseline]
    if rows:
        cache = BaselineKV(_variant(model, False, teacher), [(p.name, p.cr) for p in rows], max_len=len(ids))
        nll, kl = (
            torch.zeros(len(rows), len(ids) - 1, device=dev),
            torch.zeros(len(rows), len(ids) - 1, device=dev),
        )
        crs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for t, tok in enumerate(ids):
            logits = cache.decode(torch.full((len(rows),), tok, device=dev))
            if t + 1 < len(ids):
                logp = torch.log_softmax(logits.float(), -1)
                nll[:, t] = -logp[:, ids[t + 1]]
                kl[:, t] = (t_logp[t].exp() * (t_logp[t] - logp)).sum(-1)
            if t + 1 in prefixes:
                crs[t + 1] = (
                    cache.effective_cr(),
                    (t + 1) * cache.L * cache.H / cache.held().sum((0, 2)).float(),
                )
        for r, p in enumerate(rows):
            per_pos[p.label] = (nll[r], kl[r], {n: (float(c[r]), float(k[r])) for n, (c, k) in crs.items()})
    out: dict[str, dict[str, dict[str, float]]] = {}
    for n in sorted(prefixes):
        out[f"perplexity_{n}"] = {
            p.label: {
                "perplexity": float(per_pos[p.label][0][: n - 1].mean().exp()),
                "kl_to_teacher": float(per_pos[p.label][1][: n - 1].mean()),
                "effective_cr": per_pos[p.label][2][n][0],
                "kv_cr": per_pos[p.label][2][n][1],
            }
            for p in policies
        }
    return out


def _greedy(model, policies: list[Policy], prompts: list[list[int]], n: int, chunk: int, teacher=None):
    """Greedy continuations ``{label: [(tokens, effective_cr) per prompt]}``; baselines need prompts of
    equal length (they run in lockstep)."""
    out: dict[str, list[tuple[list[int], float]]] = {}
    for p in policies:
        if p.baseline:
            continue
        m = _variant(model, p.name == "dms", teacher)
        blocks = len(prompts) * m.arch.num_layers * m.hkv * (max(map(len, prompts)) // 16 + n // 16 + 3)
        engine = BatchEngine(m, num_blocks=blocks, block_size=16, max_batch=8, prefill_chunk=chunk)
        results = engine.generate([Request(pr, max_new_tokens=n) for pr in prompts])
        for r in results:
            if r.error:
                raise RuntimeError(f"{p.label}: {r.error}")
        out[p.label] = [(r.tokens, r.metrics["effective_cr"]) for r in results]
    rows = [(p, i) for p in policies if p.baseline for i in range(len(prompts))]
    if rows:
        if len({len(pr) for pr in prompts}) != 1:
            raise ValueError("baseline rows run in lockstep: the prompts must have equal lengths")
        length = len(prompts[0])
        base = _variant(model, False, teacher)
        cache = BaselineKV(base, [(p.name, p.cr) for p, _ in rows], max_len=length + n)
        dev = model.device
        prompt_t = torch.tensor([prompts[i] for _, i in rows], device=dev)
        for t in range(length):
            logits = cache.decode(prompt_t[:, t])
        gen = []
        for step in range(n):
            tok = logits.argmax(-1)
            gen.append(tok)
            if step + 1 < n:
                logits = cache.decode(tok)
        tokens = torch.stack(gen, 1).tolist()
        crs = cache.effective_cr().tolist()
        for (p, _), toks, cr in zip(rows, tokens, crs, strict=True):
            out.setdefault(p.label, []).append((toks, cr))
    return out


def _haystack(filler_ids: list[int], n: int) -> list[int]:
    return (filler_ids * (n // max(len(filler_ids), 1) + 1))[:n]


def passkey(
    model: DMSCausalLM,
    tokenizer: Any,
    policies: list[Policy],
    filler: str,
    lengths: list[int],
    depths: list[float],
    seed: int = 0,
    chunk: int = 1024,
    teacher: DMSCausalLM | None = None,
) -> dict[str, dict[str, dict[str, float]]]:
    """``{f"passkey_{length}": {label: {accuracy, effective_cr, trials}}}``, one trial per depth."""
    rng = random.Random(seed)
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    filler_ids = enc(filler)
    out = {}
    for length in lengths:
        prompts, keys = [], []
        for depth in depths:
            key = f"{rng.randint(10000, 99999)}"
            needle = enc(f" The pass key is {key}. Remember it. {key} is the pass key. ")
            question = enc(" What is the pass key? The pass key is")
            hay = _haystack(filler_ids, max(0, length - len(needle) - len(question)))
            cut = int(depth * len(hay))
            prompts.append(hay[:cut] + needle + hay[cut:] + question)
            keys.append(key)
        table = {}
        for label, runs in _greedy(model, policies, prompts, 6, chunk, teacher).items():
            hits = [key in tokenizer.decode(toks) for key, (toks, _) in zip(keys, runs, strict=True)]
            table[label] = {
                "accuracy": sum(hits) / len(hits),
                "effective_cr": sum(cr for _, cr in runs) / len(runs),
                "trials": len(hits),
            }
        out[f"passkey_{length}"] = {p.label: table[p.label] for p in policies}
    return out


def variable_tracking(
    model: DMSCausalLM,
    tokenizer: Any,
    policies: list[Policy],
    filler: str,
    length: int,
    hops: int = 3,
    trials: int = 3,
    seed: int = 0,
    chunk: int = 1024,
    teacher: DMSCausalLM | None = None,
) -> dict[str, dict[str, float]]:
    """``{label: {found, effective_cr, trials}}``: the fraction of the chain's variable names listed."""
    rng = random.Random(seed)
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    filler_ids = enc(filler)
    prompts, chains = [], []
    for _ in range(trials):
        names = [f"{rng.choice('ABCDEFGHJK')}{rng.choice('LMNPQRSTUVWXYZ')}{i}" for i in range(hops + 1)]
        value = rng.randint(10000, 99999)
        statements = [f" VAR {names[0]} = {value}."] + [
            f" VAR {names[i]} = {names[i - 1]}." for i in range(1, hops + 1)
        ]
        question = enc(f" Question: which variables are assigned the value {value}? Answer: they are")
        parts = [enc(s) for s in statements]
        hay = _haystack(filler_ids, max(0, length - sum(map(len, parts)) - len(question)))
        step = max(1, len(hay) // (len(parts) + 1))
        prompt: list[int] = []
        for i, part in enumerate(parts):
            prompt += hay[i * step : (i + 1) * step] + part
        prompts.append(prompt + hay[len(parts) * step :] + question)
        chains.append(names)
    if len({len(p) for p in prompts}) != 1:  # names tokenize to different lengths: trim the filler
        n = min(map(len, prompts))
        prompts = [p[len(p) - n :] if len(p) > n else p for p in prompts]
    table = {}
    for label, runs in _greedy(model, policies, prompts, 4 * (hops + 1), chunk, teacher).items():
        found = [
            sum(n in tokenizer.decode(toks) for n in names) / len(names)
            for names, (toks, _) in zip(chains, runs, strict=True)
        ]
        table[label] = {
            "found": sum(found) / len(found),
            "effective_cr": sum(cr for _, cr in runs) / len(runs),
            "trials": len(found),
        }
    return {p.label: table[p.label] for p in policies}
