"""StreamingLLM, TOVA and H2O in the same engine: budgets hold at every step, the memory CR equals the
target, and each policy drops what it should."""

from __future__ import annotations

import math

import pytest
import torch

from dms_megatron.inference.baselines import H2O, TOVA, StreamingLLM
from dms_megatron.inference.model import DecodeSession, DMSCausalLM
from dms_megatron.inference.paged_cache import BlockPool
from tests.unit.test_inference_model import _with_dms, tiny  # noqa: F401  (module fixture)


@pytest.mark.parametrize("policy_cls", [StreamingLLM, TOVA, H2O])
def test_budget_and_memory_cr(tiny, policy_cls) -> None:  # noqa: F811
    model = DMSCausalLM.from_pretrained(tiny[1])
    policy = policy_cls(cr=3.0, min_keep=4)
    pool = BlockPool(200, 4, head_dim=16)
    session = DecodeSession(model, pool, policy=policy)
    ids = torch.randint(0, 96, (60,), generator=torch.Generator().manual_seed(4)).tolist()
    session.prefill(ids[:20])
    for t, tok in enumerate(ids[20:], start=20):
        session.step(tok)
        assert int(session.held().max()) <= max(4, math.ceil((t + 1) / 3.0))
    assert session.memory_cr() == pytest.approx(3.0, rel=0.05)
    if policy_cls is StreamingLLM:
        held = session.streams[0][0].held_positions()
        assert held[:4] == [0, 1, 2, 3] and held[4:] == list(range(60 - (len(held) - 4), 60))
    session.release()
    assert pool.free_blocks == pool.num_blocks


def test_tova_and_h2o_drop_the_least_attended() -> None:
    weights = torch.tensor([0.3, 0.05, 0.4, 0.2, 0.05])  # the last entry is the newest token: never dropped
    assert TOVA(cr=2.0).choose((0, 0), [10, 11, 12, 13, 14], weights, 2) == [11, 13]
    h2o = H2O(cr=2.0, min_keep=1)
    h2o.observe((0, 0), [0, 1, 2, 3, 4, 5, 6, 7], torch.tensor([0.5, 0.1, 0.3, 0.02, 0.04, 0.01, 0.01, 0.02]))
    # budget(8) = 4 -> the 2 most recent are protected; among 0..5 the lowest accumulated go first
    assert h2o.choose((0, 0), [0, 1, 2, 3, 4, 5, 6, 7], torch.zeros(8), 2) == [5, 3]


def test_baselines_need_the_original_model(tiny) -> None:  # noqa: F811
    with pytest.raises(ValueError, match="original model"):
        DecodeSession(
            _with_dms(tiny[1], "adapter", "head", 4), BlockPool(8, 4, head_dim=16), policy=TOVA(cr=2)
        )
    with pytest.raises(ValueError, match="cr must be >= 1"):
        StreamingLLM(cr=0.5)
