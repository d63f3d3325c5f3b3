"""Quality evaluations of one model under several KV policies, all in the same engine:

* ``perplexity(text ids)``: next-token perplexity over a long context (DMS: the hard-eviction dense
  oracle, identical to the cache; baselines: token by token, as their decisions depend on attention);
* ``kl_to_teacher``: mean KL(teacher || policy) of the next-token distributions on the same text;
* ``passkey``: a 5-digit key hidden at a given depth of filler text, retrieved greedily (exact match);
* ``variable_tracking``: a chain ``VAR A = 12345 ... VAR B = A ...``; the model must name the variables
  holding the value (fraction found).

A policy is ``"teacher"`` (no eviction), ``"dms"`` (the checkpoint's own decisions) or a baseline name
with a CR (``inference.baselines``). Every evaluation returns the policy's effective CR alongside.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from typing import Any

import torch

from dms_megatron.inference.baselines import POLICIES
from dms_megatron.inference.model import DecodeSession, DMSCausalLM
from dms_megatron.inference.paged_cache import BlockPool


@dataclass(frozen=True)
class Policy:
    name: str  # teacher | dms | streaming_llm | tova | h2o
    cr: float = 1.0

    @property
    def label(self) -> str:
        return self.name if self.name in ("teacher", "dms") else f"{self.name}@{self.cr:g}"


def _session(model: DMSCausalLM, policy: Policy, capacity: int) -> DecodeSession:
    base = model
    if policy.name != "dms":
        base = copy.copy(model)
        base.dms = None
    if policy.name == "dms" and model.dms is None:
        raise ValueError("policy 'dms' needs a checkpoint with a dms block in config.json")
    baseline = None
    if policy.name not in ("teacher", "dms"):
        if policy.name not in POLICIES:
            raise ValueError(f"unknown policy {policy.name!r}: teacher, dms or one of {sorted(POLICIES)}")
        baseline = POLICIES[policy.name](cr=policy.cr)
    blocks = model.arch.num_layers * model.hkv * (capacity // 16 + 2)
    return DecodeSession(base, BlockPool(blocks, 16, model.d), policy=baseline)


def _logits(model: DMSCausalLM, policy: Policy, ids: list[int], chunk: int) -> tuple[torch.Tensor, float]:
    session = _session(model, policy, len(ids))
    logits = session.prefill(ids, chunk)
    cr = session.effective_cr()
    session.release()
    return logits, cr


def perplexity_and_kl(
    model: DMSCausalLM, policies: list[Policy], ids: list[int], chunk: int = 256
) -> dict[str, dict[str, float]]:
    """Perplexity and KL(teacher || policy) per policy over ``ids``."""
    target = torch.tensor(ids[1:])
    teacher, _ = _logits(model, Policy("teacher"), ids, chunk)
    t_logp = torch.log_softmax(teacher[:-1], -1)
    out = {}
    for policy in policies:
        logits, cr = (teacher, 1.0) if policy.name == "teacher" else _logits(model, policy, ids, chunk)
        logp = torch.log_softmax(logits[:-1], -1)
        nll = -logp.gather(1, target[:, None]).mean()
        kl = (t_logp.exp() * (t_logp - logp)).sum(-1).mean()
        out[policy.label] = {"perplexity": float(nll.exp()), "kl_to_teacher": float(kl), "effective_cr": cr}
    return out


def _generate(
    model: DMSCausalLM, policy: Policy, prompt: list[int], n: int, chunk: int
) -> tuple[list[int], float]:
    session = _session(model, policy, len(prompt) + n)
    logits = session.prefill(prompt, chunk)[-1]
    out = []
    for i in range(n):
        token = int(logits.argmax())
        out.append(token)
        if i + 1 < n:
            logits = session.step(token)
    cr = session.effective_cr()
    session.release()
    return out, cr


def passkey(
    model: DMSCausalLM,
    tokenizer: Any,
    policies: list[Policy],
    filler: str,
    lengths: list[int],
    depths: list[float],
    seed: int = 0,
    chunk: int = 256,
) -> dict[str, dict[str, float]]:
    """Accuracy of retrieving a 5-digit key at each (length in tokens, depth in [0, 1])."""
    rng = random.Random(seed)
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    filler_ids = enc(filler)
    results: dict[str, dict[str, float]] = {}
    for policy in policies:
        hits, crs = 0, []
        trials = 0
        for length in lengths:
            for depth in depths:
                key = f"{rng.randint(10000, 99999)}"
                needle = enc(f" The pass key is {key}. Remember it. {key} is the pass key. ")
                question = enc(" What is the pass key? The pass key is")
                room = max(0, length - len(needle) - len(question))
                hay = (filler_ids * (room // max(len(filler_ids), 1) + 1))[:room]
                cut = int(depth * len(hay))
                prompt = hay[:cut] + needle + hay[cut:] + question
                out, cr = _generate(model, policy, prompt, 6, chunk)
                hits += key in tokenizer.decode(out)
                crs.append(cr)
                trials += 1
        results[policy.label] = {
            "accuracy": hits / trials,
            "effective_cr": sum(crs) / len(crs),
            "trials": trials,
        }
    return results


def variable_tracking(
    model: DMSCausalLM,
    tokenizer: Any,
    policies: list[Policy],
    filler: str,
    length: int,
    hops: int = 3,
    seed: int = 0,
    chunk: int = 256,
) -> dict[str, dict[str, float]]:
    """Fraction of the chain's variable names the model lists for the value."""
    rng = random.Random(seed)
    names = [f"{rng.choice('ABCDEFGHJK')}{rng.choice('LMNPQRSTUVWXYZ')}{i}" for i in range(hops + 1)]
    value = rng.randint(10000, 99999)
    statements = [f" VAR {names[0]} = {value}."] + [
        f" VAR {names[i]} = {names[i - 1]}." for i in range(1, hops + 1)
    ]
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    question = enc(f" Question: which variables are assigned the value {value}? Answer: they are")
    parts = [enc(s) for s in statements]
    room = max(0, length - sum(map(len, parts)) - len(question))
    filler_ids = enc(filler)
    hay = (filler_ids * (room // max(len(filler_ids), 1) + 1))[:room]
    step = max(1, len(hay) // (len(parts) + 1))
    prompt: list[int] = []
    for i, part in enumerate(parts):
        prompt += hay[i * step : (i + 1) * step] + part
    prompt += hay[len(parts) * step :] + question
    results = {}
    for policy in policies:
        out, cr = _generate(model, policy, prompt, 4 * (hops + 1), chunk)
        text = tokenizer.decode(out)
        results[policy.label] = {"found": sum(n in text for n in names) / len(names), "effective_cr": cr}
    return results
