"""The generation engines: the reference one's greedy == the dense oracle's argmax chain; for both the
reference and the batched engine, sampling is seeded, stop tokens end a request, bad requests fail alone
with clear errors, blocks return to the pool."""

from __future__ import annotations

import pytest
import torch

from dms_megatron.inference.batch_engine import BatchEngine
from dms_megatron.inference.engine import Engine, Request
from tests.unit.test_inference_model import _with_dms, tiny  # noqa: F401  (module fixture)


@pytest.fixture()
def model(tiny):  # noqa: F811
    return _with_dms(tiny[1], "adapter", "head", 4)


def _greedy_oracle(model, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        logits, _ = model.forward_dense(torch.tensor(ids))
        ids.append(int(logits[-1].argmax()))
    return ids[len(prompt) :]


def test_batch_of_mixed_lengths_matches_the_oracle(model) -> None:
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 96, (n,), generator=gen).tolist() for n in (3, 17, 40)]
    engine = Engine(model, num_blocks=200, block_size=4, prefill_chunk=8)
    results = engine.generate([Request(p, max_new_tokens=8) for p in prompts])
    for p, r in zip(prompts, results, strict=True):
        assert r.finish_reason == "length" and r.error is None
        assert r.tokens == _greedy_oracle(model, p, 8)
        assert r.metrics["memory_cr"] > 1.0 and r.metrics["peak_kv_tokens"] > 0
    assert engine.pool.free_blocks == engine.pool.num_blocks


def _engine(kind: str, model):
    """The reference engine or the batched one, and a check that every block went back."""
    if kind == "reference":
        engine = Engine(model, num_blocks=60, block_size=4)
        return engine, lambda: engine.pool.free_blocks == engine.pool.num_blocks
    batched = BatchEngine(model, num_blocks=60, block_size=4, max_batch=4)
    return batched, lambda: batched.cache.allocated_blocks() == 0


@pytest.mark.parametrize("kind", ["reference", "batched"])
def test_sampling_stop_tokens_and_bad_requests_fail_alone(model, kind) -> None:
    """Both engines: sampling is seeded, stop tokens stop, bad requests fail alone with clear errors and
    every block returns to the pool."""
    engine, all_free = _engine(kind, model)
    req = Request([1, 2, 3, 4], max_new_tokens=12, temperature=1.0, top_p=0.9, seed=11)
    a, b = engine.generate([req, req])
    assert a.tokens == b.tokens and len(a.tokens) == 12
    stop = Request(
        [1, 2, 3, 4], max_new_tokens=12, temperature=1.0, top_p=0.9, seed=11, stop_ids=(a.tokens[3],)
    )
    (c,) = engine.generate([stop])
    assert c.finish_reason == "stop" and c.tokens == a.tokens[: a.tokens.index(a.tokens[3]) + 1]
    good = Request([5, 6, 7], max_new_tokens=4)
    results = engine.generate(
        [
            Request([], max_new_tokens=4),
            Request([5] * 300, max_new_tokens=4),
            Request([5, 999], max_new_tokens=4),
            Request([5], max_new_tokens=4, temperature=-1.0),
            Request([5], max_new_tokens=4, top_p=0.0),
            Request([5] * 120, max_new_tokens=4),  # needs more blocks than the pool has
            good,
        ]
    )
    errors = [r.error for r in results[:-1]]
    assert "prompt is empty" in errors[0] and "exceeds the model context" in errors[1]
    assert "token ids must be in" in errors[2] and "temperature" in errors[3] and "top_p" in errors[4]
    assert errors[5].startswith("CacheFullError")
    assert results[-1].error is None and results[-1].tokens == _greedy_oracle(model, good.prompt, 4)
    assert all_free()
    if kind == "batched":
        with pytest.raises(ValueError, match="batch of zero"):
            engine.generate([])
