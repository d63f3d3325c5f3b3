"""Quality evaluations of one model under several KV policies, on the tensor engines (CPU or GPU):

* ``perplexity_and_kl(ids, prefixes)``: next-token perplexity and mean KL(teacher || policy) over the
  first ``n`` tokens of a long text, for each ``n`` in ``prefixes`` (one causal pass: the first ``n``
  positions of a pass over the whole text are exactly a pass over ``n`` tokens), with the memory CR
  held at ``n``;
* ``passkey``: a 5-digit key hidden at a given depth of filler text, retrieved greedily (exact match),
  ``trials`` prompts per length (the depths cycled, a fresh key each), all of exactly ``length`` tokens;
* ``variable_tracking``: a chain ``VAR A = 12345 ... VAR B = A ...``; the model must name the variables
  holding the value (fraction found).

Every CR reported is the **memory CR** (``memory_cr``): tokens seen x (layers x KV heads) / tokens held
over all layers and KV heads, the factor by which the KV bytes shrank. The mean over streams of seen /
held is kept only as a diagnostic (``stream_cr_mean``).

A policy is ``"teacher"`` (the original model, no eviction), ``"dms"`` (the retrofitted checkpoint with
its own decisions, ``CompressedKV`` with chunked prefill) or a baseline on the original model
(``BaselineKV``: every baseline row of a task advances token by token in one lockstep batch), either at
a fixed CR (``Policy("h2o", 8)``, label ``h2o@8``) or at **equal memory** with the DMS model
(``Policy("h2o", None)``, label ``h2o@=dms``):

* perplexity: the DMS prefill records the tokens it holds every ``stride`` tokens and at every prefix;
  the baseline's per-stream budget after token ``t`` is that total (interpolated between stops) over
  layers x KV heads, rounded, so at each prefix it holds what DMS held (to within half a token per
  stream);
* pass-key / variable tracking: the baseline runs at the memory CR DMS reached at the end of the
  prompts of that length (all prompts together).

Several DMS checkpoints can share one evaluation (one teacher pass, one lockstep baseline batch):
pass ``model`` as ``{name: model}`` and give ``dms`` and equal-memory policies ``ref=name`` (labels
``dms:name``, ``h2o@=dms:name``). All share the model code (``DMSCausalLM``). ``teacher=None`` uses the
(first) checkpoint with eviction off, which is the original model only when retrofitting left the base
weights frozen (``train.mode=adapter``); pass the original model for full-mode retrofits. The teacher
generates with batched causal passes (``model.dense_last_logits``); DMS on ``BatchEngine``.
"""

from __future__ import annotations

import copy
import itertools
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from dms_megatron.inference.baseline_cache import KINDS, BaselineKV
from dms_megatron.inference.batch_engine import BatchEngine
from dms_megatron.inference.compressed_cache import CompressedKV
from dms_megatron.inference.engine import Request
from dms_megatron.inference.model import DMSCausalLM, dense_last_logits, kv_crs

# the pass-key haystack of Mohtashami & Jaggi (2023): retrieval without the noise of real text (on
# Shakespeare as the haystack, SmolLM2-135M finds 1 key in 5 at 2K tokens; on this, 4 in 5)
CLASSIC_FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
EQUAL_MEMORY = "@=dms"  # label suffix of a baseline at the DMS model's KV memory


@dataclass(frozen=True)
class Policy:
    """``name``: teacher | dms | streaming_llm | tova | h2o. ``cr``: a baseline's CR, or None for the
    DMS model's KV memory (equal memory); ignored for teacher and dms. ``ref``: which DMS checkpoint
    (``dms`` and equal-memory rows) when several are evaluated together."""

    name: str
    cr: float | None = 1.0
    ref: str = ""

    def __post_init__(self) -> None:
        if self.name not in ("teacher", "dms") and self.name not in KINDS:
            raise ValueError(f"unknown policy {self.name!r}: teacher, dms or one of {sorted(KINDS)}")
        if self.baseline and self.cr is not None and self.cr < 1:
            raise ValueError(f"policy {self.name}: cr must be >= 1, got {self.cr}")

    @property
    def label(self) -> str:
        ref = f":{self.ref}" if self.ref and (self.name == "dms" or self.matched) else ""
        if not self.baseline:
            return self.name + ref
        return self.name + EQUAL_MEMORY + ref if self.cr is None else f"{self.name}@{self.cr:g}"

    @property
    def baseline(self) -> bool:
        return self.name in KINDS

    @property
    def matched(self) -> bool:
        """A baseline at the DMS model's KV memory."""
        return self.baseline and self.cr is None


def sweep(names: list[str], crs: list[float]) -> list[Policy]:
    """Baseline rows ``{name}@{cr}`` for every name and CR (the points of a quality-vs-memory curve)."""
    return [Policy(n, float(c)) for n in names for c in crs]


class Timer:
    """Wall seconds per phase (``timing``) and progress lines with the elapsed time (``log``; None:
    silent). CUDA work is synchronized at phase ends so the seconds are real."""

    def __init__(self, log: Callable[[str], None] | None = None) -> None:
        self.log, self.t0, self.timing = log, time.perf_counter(), {}

    def note(self, message: str) -> None:
        if self.log is not None:
            self.log(f"[{time.perf_counter() - self.t0:7.1f} s] {message}")

    @contextmanager
    def phase(self, name: str, device: torch.device | None = None) -> Iterator[None]:
        start = time.perf_counter()
        yield
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)
        self.timing[name] = round(time.perf_counter() - start, 3)
        self.note(f"{name} done ({self.timing[name]:.1f} s)")


Models = DMSCausalLM | dict[str, DMSCausalLM]


def _checkpoints(model: Models, policies: list[Policy]) -> dict[str, DMSCausalLM]:
    """``{ref: DMS model}`` for the refs the policies use (a single model is ref "")."""
    models = model if isinstance(model, dict) else {"": model}
    if not models:
        raise ValueError("no DMS checkpoint given")
    for p in policies:
        if (p.name == "dms" or p.matched) and p.ref not in models:
            raise ValueError(f"policy {p.label}: no checkpoint named {p.ref!r} (have {sorted(models)})")
    return models


def _dms_label(ref: str) -> str:
    return Policy("dms", ref=ref).label


def _variant(model: Models, dms: bool, teacher: DMSCausalLM | None = None) -> DMSCausalLM:
    first = next(iter(model.values())) if isinstance(model, dict) else model
    if dms and first.dms is None:
        raise ValueError("policy 'dms' needs a checkpoint with a dms block in config.json")
    if dms:
        return first
    base = copy.copy(teacher if teacher is not None else first)
    base.dms = None
    return base


def _prefill_logits(
    model: DMSCausalLM, ids: list[int], stops: list[int], chunk: int
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Logits ``[T, V]`` of one sequence on the compressed cache, and the tokens held per ``[layer,
    head]`` after each stop (stops become chunk bounds)."""
    cache = CompressedKV(
        model, num_blocks=model.arch.num_layers * model.hkv * (len(ids) // 16 + 3), block_size=16
    )
    row = cache.add_row()
    ids_t = torch.tensor(ids, device=model.device)
    bounds = sorted({*range(0, len(ids), chunk), *stops, len(ids)})
    out, held = [], {}
    for a, b in itertools.pairwise(bounds):
        out.append(cache.prefill(row, ids_t[a:b]))
        if b in stops:
            held[b] = cache.held()[:, row].clone()
    return torch.cat(out), held


def equal_memory_budgets(totals: dict[int, float], length: int, streams: int) -> torch.Tensor:
    """Per-stream budget ``[length]`` after each token (index ``t``: ``t + 1`` tokens seen) such that
    ``streams`` streams hold ``totals[n]`` tokens in all after ``n`` tokens: the totals are
    interpolated linearly between the stops (and from 0 tokens at 0), divided over the streams and
    rounded half up."""
    points = [(0, 0.0), *sorted((n, float(h)) for n, h in totals.items())]
    if points[-1][0] < length:
        raise ValueError(f"the last stop ({points[-1][0]}) is before the length {length}")
    total = torch.zeros(length, dtype=torch.float64)
    for (a, ha), (b, hb) in itertools.pairwise(points):
        seen = torch.arange(a + 1, min(b, length) + 1, dtype=torch.float64)
        total[a : min(b, length)] = ha + (hb - ha) * (seen - a) / (b - a)
    return torch.floor(total / streams + 0.5).long()


def perplexity_and_kl(
    model: Models,
    policies: list[Policy],
    ids: list[int],
    prefixes: list[int],
    chunk: int = 1024,
    teacher: DMSCausalLM | None = None,
    stride: int = 128,
    timer: Timer | None = None,
) -> dict[str, dict[str, dict[str, float]]]:
    """``{f"perplexity_{n}": {policy label: {perplexity, kl_to_teacher, memory_cr, stream_cr_mean}}}``.
    Equal-memory baselines follow the DMS model's held tokens, recorded every ``stride`` tokens."""
    if max(prefixes) > len(ids):
        raise ValueError(f"prefix {max(prefixes)} is longer than the text ({len(ids)} tokens)")
    timer = timer or Timer()
    models = _checkpoints(model, policies)
    ids = ids[: max(prefixes)]
    n_tok = len(ids)
    base = _variant(model, False, teacher)
    dev = base.device
    target = torch.tensor(ids[1:], device=dev)
    with timer.phase("perplexity/teacher_prefill", dev):
        t_logits, _ = _prefill_logits(base, ids, prefixes, chunk)
        t_logp = torch.log_softmax(t_logits[:-1].float(), -1)
        del t_logits
    per_pos: dict[str, tuple[torch.Tensor, torch.Tensor, dict[int, dict[str, float]]]] = {}
    streams = base.arch.num_layers * base.hkv
    dms_held: dict[str, dict[int, torch.Tensor]] = {}
    stops = sorted({*range(stride, n_tok + 1, stride), *prefixes})
    for ref in dict.fromkeys(p.ref for p in policies if p.name == "dms" or p.matched):
        with timer.phase(f"perplexity/{_dms_label(ref)}_prefill", dev):
            logits, dms_held[ref] = _prefill_logits(_variant(models[ref], True), ids, stops, chunk)
            logp = torch.log_softmax(logits[:-1].float(), -1)
            del logits
            nll = -logp.gather(-1, target[:, None])[:, 0]
            kl = (t_logp.exp() * (t_logp - logp)).sum(-1)
            del logp
        per_pos[_dms_label(ref)] = (nll, kl, {n: kv_crs(n, dms_held[ref][n]) for n in prefixes})
    if any(p.name == "teacher" for p in policies):
        nll = -t_logp.gather(-1, target[:, None])[:, 0]
        dense = {"memory_cr": 1.0, "stream_cr_mean": 1.0}
        per_pos["teacher"] = (nll, torch.zeros_like(nll), {n: dense for n in prefixes})
    rows = [p for p in policies if p.baseline]
    if rows:
        budgets = None
        if any(p.matched for p in rows):
            schedules = {
                ref: equal_memory_budgets({n: float(h.sum()) for n, h in held.items()}, n_tok, streams)
                for ref, held in dms_held.items()
            }
            zero = torch.zeros(n_tok, dtype=torch.long)
            budgets = torch.stack([schedules[p.ref] if p.matched else zero for p in rows]).to(dev)
        cache = BaselineKV(base, [(p.name, p.cr) for p in rows], max_len=n_tok, budgets=budgets)
        nll = torch.zeros(len(rows), n_tok - 1, device=dev)
        kl = torch.zeros(len(rows), n_tok - 1, device=dev)
        ids_t = torch.tensor(ids, device=dev)
        held_at: dict[int, torch.Tensor] = {}
        with timer.phase("perplexity/baselines", dev):
            timer.note(f"baselines: {len(rows)} rows in lockstep over {n_tok} tokens")
            for t in range(n_tok):
                logits = cache.decode(ids_t[t].expand(len(rows)))
                if t + 1 < n_tok:
                    logp = torch.log_softmax(logits.float(), -1)
                    nll[:, t] = -logp[:, ids[t + 1]]
                    kl[:, t] = (t_logp[t].exp() * (t_logp[t] - logp)).sum(-1)
                if t + 1 in prefixes:
                    held_at[t + 1] = cache.held().clone()
                if (t + 1) % 2048 == 0 and t + 1 < n_tok:
                    timer.note(f"baselines: {t + 1}/{n_tok} tokens")
        for r, p in enumerate(rows):
            crs = {n: kv_crs(n, h[:, r]) for n, h in held_at.items()}
            per_pos[p.label] = (nll[r], kl[r], crs)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for n in sorted(prefixes):
        out[f"perplexity_{n}"] = {
            p.label: {
                "perplexity": float(per_pos[p.label][0][: n - 1].mean().exp()),
                "kl_to_teacher": float(per_pos[p.label][1][: n - 1].mean()),
                **per_pos[p.label][2][n],
            }
            for p in policies
        }
    return out


@dataclass
class _Runs:
    tokens: list[list[int]]  # generated tokens per prompt
    held: list[float]  # KV tokens held over all streams at the end of each prompt
    seen: list[int]  # prompt lengths
    stream_cr: list[float]  # per prompt: seen / held averaged over streams, at the end of generation
    streams: int  # layers x KV heads

    def memory_cr(self, rows: list[int] | None = None) -> float:
        """Tokens seen x streams / tokens held at the end of the prompts (``rows``: a subset)."""
        rows = list(range(len(self.tokens))) if rows is None else rows
        return sum(self.seen[i] for i in rows) * self.streams / max(sum(self.held[i] for i in rows), 1.0)

    def stream_cr_mean(self, rows: list[int] | None = None) -> float:
        rows = list(range(len(self.tokens))) if rows is None else rows
        return sum(self.stream_cr[i] for i in rows) / len(rows)


def _dense_greedy(model: DMSCausalLM, prompts: list[list[int]], n: int) -> list[list[int]]:
    """Greedy continuations of the teacher (no eviction, no cache): prompts of one length advance
    together, one batched causal pass (torch's fused attention) per generated token."""
    out: list[list[int]] = [[] for _ in prompts]
    by_length: dict[int, list[int]] = {}
    for i, prompt in enumerate(prompts):
        by_length.setdefault(len(prompt), []).append(i)
    for rows in by_length.values():
        ids = torch.tensor([prompts[i] for i in rows], device=model.device)
        for _ in range(n):
            nxt = dense_last_logits(model, ids).argmax(-1)
            for r, i in enumerate(rows):
                out[i].append(int(nxt[r]))
            ids = torch.cat([ids, nxt[:, None]], 1)
    return out


def _greedy(
    model: Models,
    policies: list[Policy],
    prompts: list[list[int]],
    n: int,
    chunk: int,
    teacher: DMSCausalLM | None = None,
    max_rows: int = 96,
    timer: Timer | None = None,
    task: str = "greedy",
) -> dict[str, _Runs]:
    """Greedy continuations of every prompt under every policy. Baselines run in lockstep (the prompts
    must have equal lengths), at most ``max_rows`` rows at a time; an equal-memory row holds, per
    stream, the memory CR the DMS model reached at the end of that same prompt."""
    timer = timer or Timer()
    models = _checkpoints(model, policies)
    base = _variant(model, False, teacher)
    dev = base.device
    streams = base.arch.num_layers * base.hkv
    seen = [len(pr) for pr in prompts]
    out: dict[str, _Runs] = {}
    if any(p.name == "teacher" for p in policies):
        with timer.phase(f"{task}/teacher", dev):
            dense = _dense_greedy(base, prompts, n)
        out["teacher"] = _Runs(dense, [s * streams for s in seen], seen, [1.0] * len(seen), streams)
    for ref in dict.fromkeys(p.ref for p in policies if p.name == "dms" or p.matched):
        m, name = _variant(models[ref], True), _dms_label(ref)
        blocks = len(prompts) * m.arch.num_layers * m.hkv * (max(seen) // 16 + n // 16 + 3)
        at_prompt_end: dict[int, float] = {}  # the first token streamed carries the CR after the prompt

        def first(i: int, _tok: int, live_cr: float, crs: dict[int, float] = at_prompt_end) -> None:
            crs.setdefault(i, live_cr)

        with timer.phase(f"{task}/{name}", dev):
            engine = BatchEngine(
                m, num_blocks=blocks, block_size=16, max_batch=8, prefill_chunk=chunk, on_token=first
            )
            results = engine.generate([Request(pr, max_new_tokens=n) for pr in prompts])
        for r in results:
            if r.error:
                raise RuntimeError(f"{name}: {r.error}")
        held = [seen[i] * streams / at_prompt_end[i] for i in range(len(prompts))]
        stream_cr = [r.metrics["stream_cr_mean"] for r in results]
        out[name] = _Runs([r.tokens for r in results], held, seen, stream_cr, streams)
    rows = [(p, i) for p in policies if p.baseline for i in range(len(prompts))]
    if not rows:
        return out
    if len(set(seen)) != 1:
        raise ValueError("baseline rows run in lockstep: the prompts must have equal lengths")
    length = seen[0]
    tokens: list[list[int]] = []
    held_rows: list[torch.Tensor] = []
    stream_crs: list[float] = []
    with timer.phase(f"{task}/baselines", dev):
        for s in range(0, len(rows), max_rows):
            group = rows[s : s + max_rows]
            specs = [
                (p.name, seen[i] * streams / out[_dms_label(p.ref)].held[i] if p.matched else p.cr)
                for p, i in group
            ]
            cache = BaselineKV(base, specs, max_len=length + n)
            prompt_t = torch.tensor([prompts[i] for _, i in group], device=dev)
            for t in range(length):
                logits = cache.decode(prompt_t[:, t])
            held_rows.append(cache.held().sum((0, 2)))
            gen = []
            for step in range(n):
                tok = logits.argmax(-1)
                gen.append(tok)
                if step + 1 < n:
                    logits = cache.decode(tok)
            tokens += torch.stack(gen, 1).tolist()
            stream_crs += cache.stream_cr_mean().tolist()
            del cache
            timer.note(f"{task}: baseline rows {s + len(group)}/{len(rows)}")
    held = torch.cat(held_rows).tolist()
    for p in dict.fromkeys(p for p, _ in rows):
        mine = [j for j, (q, _) in enumerate(rows) if q == p]
        out[p.label] = _Runs(
            [tokens[j] for j in mine],
            [float(held[j]) for j in mine],
            seen,
            [stream_crs[j] for j in mine],
            streams,
        )
    return out


def _haystack(filler_ids: list[int], n: int) -> list[int]:
    return (filler_ids * (n // max(len(filler_ids), 1) + 1))[:n]


def _encoder(tokenizer: Any) -> Callable[[str], list[int]]:
    return lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]


def passkey_prompts(
    tokenizer: Any, filler: str, length: int, depths: list[float], trials: int, rng: random.Random
) -> tuple[list[list[int]], list[str]]:
    """``trials`` prompts of exactly ``length`` tokens (the filler trimmed around the needle), trial
    ``i`` at depth ``depths[i % len(depths)]`` with a fresh key; and the keys."""
    if trials < 1 or not depths:
        raise ValueError(f"pass-key needs trials >= 1 and at least one depth, got {trials}, {depths}")
    enc = _encoder(tokenizer)
    filler_ids = enc(filler)
    question = enc(" What is the pass key? The pass key is")
    prompts, keys = [], []
    for i in range(trials):
        key = f"{rng.randint(10000, 99999)}"
        needle = enc(f" The pass key is {key}. Remember it. {key} is the pass key. ")
        room = length - len(needle) - len(question)
        if room < 0:
            raise ValueError(f"pass-key length {length} is shorter than the needle and question")
        hay = _haystack(filler_ids, room)
        cut = int(depths[i % len(depths)] * len(hay))
        prompts.append(hay[:cut] + needle + hay[cut:] + question)
        keys.append(key)
    return prompts, keys


def passkey(
    model: Models,
    tokenizer: Any,
    policies: list[Policy],
    fillers: dict[str, str],
    lengths: list[int],
    depths: list[float],
    seed: int = 0,
    chunk: int = 1024,
    teacher: DMSCausalLM | None = None,
    trials: int = 10,
    name: str = "passkey",
    max_rows: int = 96,
    timer: Timer | None = None,
) -> dict[str, dict[str, dict[str, float]]]:
    """``{f"{name}_{filler}_{length}": {label: {accuracy, found, trials, memory_cr, stream_cr_mean[,
    teacher_accuracy]}}}``: ``trials`` prompts per filler and length (see ``passkey_prompts``). The
    prompts of every filler at one length run together (one lockstep pass for the baselines)."""
    if not fillers:
        raise ValueError("pass-key needs at least one filler")
    rng = random.Random(seed)
    out = {}
    for length in lengths:
        prompts, keys, which = [], [], []
        for filler, text in fillers.items():
            p, k = passkey_prompts(tokenizer, text, length, depths, trials, rng)
            prompts += p
            keys += k
            which += [filler] * len(p)
        runs = _greedy(model, policies, prompts, 6, chunk, teacher, max_rows, timer, f"{name}_{length}")
        for filler in fillers:
            rows = [i for i, f in enumerate(which) if f == filler]
            table = {}
            for label, run in runs.items():
                hits = [keys[i] in tokenizer.decode(run.tokens[i]) for i in rows]
                table[label] = {
                    "accuracy": sum(hits) / len(hits),
                    "found": sum(hits),
                    "trials": len(hits),
                    "memory_cr": run.memory_cr(rows),
                    "stream_cr_mean": run.stream_cr_mean(rows),
                }
            if "teacher" in table:
                for row in table.values():
                    row["teacher_accuracy"] = table["teacher"]["accuracy"]
            out[f"{name}_{filler}_{length}"] = {p.label: table[p.label] for p in policies}
    return out


def variable_tracking(
    model: Models,
    tokenizer: Any,
    policies: list[Policy],
    filler: str,
    length: int,
    hops: int = 3,
    trials: int = 3,
    seed: int = 0,
    chunk: int = 1024,
    teacher: DMSCausalLM | None = None,
    max_rows: int = 96,
    timer: Timer | None = None,
) -> dict[str, dict[str, float]]:
    """``{label: {found, trials, memory_cr, stream_cr_mean}}``: the fraction of the chain's variable
    names listed."""
    rng = random.Random(seed)
    enc = _encoder(tokenizer)
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
    runs = _greedy(
        model, policies, prompts, 4 * (hops + 1), chunk, teacher, max_rows, timer, "variable_tracking"
    )
    table = {}
    for label, run in runs.items():
        found = [
            sum(n in tokenizer.decode(toks) for n in names) / len(names)
            for names, toks in zip(chains, run.tokens, strict=True)
        ]
        table[label] = {
            "found": sum(found) / len(found),
            "trials": len(found),
            "memory_cr": run.memory_cr(),
            "stream_cr_mean": run.stream_cr_mean(),
        }
    return {p.label: table[p.label] for p in policies}
