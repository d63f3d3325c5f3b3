"""The reference generation engine: greedy == the dense oracle's argmax chain, sampling is seeded,
stop tokens end a request, bad requests fail alone with clear errors, blocks return to the pool."""

from __future__ import annotations

import pytest
import torch

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


def test_sampling_is_seeded_and_stop_tokens_stop(model) -> None:
    engine = Engine(model, num_blocks=100, block_size=4)
    req = Request([1, 2, 3, 4], max_new_tokens=12, temperature=1.0, top_p=0.9, seed=11)
    a, b = engine.generate([req, req])
    assert a.tokens == b.tokens and len(a.tokens) == 12
    stop = Request(
        [1, 2, 3, 4], max_new_tokens=12, temperature=1.0, top_p=0.9, seed=11, stop_ids=(a.tokens[3],)
    )
    (c,) = engine.generate([stop])
    first = a.tokens.index(a.tokens[3])
    assert c.finish_reason == "stop" and c.tokens == a.tokens[: first + 1]


def test_bad_requests_fail_alone(model) -> None:
    engine = Engine(model, num_blocks=30, block_size=4)
    good = Request([5, 6, 7], max_new_tokens=4)
    results = engine.generate(
        [
            Request([], max_new_tokens=4),
            Request([5] * 300, max_new_tokens=4),
            Request([5, 999], max_new_tokens=4),
            Request([5], max_new_tokens=4, temperature=-1.0),
            Request([5], max_new_tokens=4, top_p=0.0),
            Request([5] * 100, max_new_tokens=4),  # needs more blocks than the pool has
            good,
        ]
    )
    errors = [r.error for r in results[:-1]]
    assert "prompt is empty" in errors[0] and "exceeds the model context" in errors[1]
    assert "token ids must be in" in errors[2] and "temperature" in errors[3] and "top_p" in errors[4]
    assert errors[5].startswith("CacheFullError")
    assert results[-1].error is None and results[-1].tokens == _greedy_oracle(model, good.prompt, 4)
    assert engine.pool.free_blocks == engine.pool.num_blocks
    with pytest.raises(ValueError, match="batch of zero"):
        engine.generate([])
