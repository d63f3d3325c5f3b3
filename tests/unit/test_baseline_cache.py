"""The tensor baselines (all rows in lockstep, each with its own policy and CR) == the per-token
reference policies of ``baselines.py``: same logits at every step, same tokens held per stream."""

from __future__ import annotations

import pytest
import torch

from dms_megatron.inference.baseline_cache import BaselineKV
from dms_megatron.inference.baselines import POLICIES
from dms_megatron.inference.model import DecodeSession, DMSCausalLM
from dms_megatron.inference.paged_cache import BlockPool
from tests.unit.test_inference_model import tiny  # noqa: F401  (module fixture)

ROWS = [("streaming_llm", 3.0), ("tova", 2.0), ("h2o", 3.0), ("tova", 4.0), ("h2o", 1.5)]


def test_lockstep_rows_equal_the_reference_policies(tiny) -> None:  # noqa: F811
    model = DMSCausalLM.from_pretrained(tiny[1])
    ids = torch.randint(0, 96, (70,), generator=torch.Generator().manual_seed(8))
    fast = BaselineKV(model, ROWS, max_len=80, min_keep=4)
    refs = [
        DecodeSession(model, BlockPool(400, 4, head_dim=16), policy=POLICIES[n](cr=c, min_keep=4))
        for n, c in ROWS
    ]
    for tok in ids.tolist():
        logits = fast.decode(torch.full((len(ROWS),), tok))
        for r, session in enumerate(refs):
            torch.testing.assert_close(logits[r], session.step(tok), atol=1e-4, rtol=1e-4)
    for r, session in enumerate(refs):
        for layer in range(model.arch.num_layers):
            for head in range(model.hkv):
                want = session.streams[layer][head].held_positions()
                got = fast.held_mask[layer, r, head].nonzero()[:, 0].tolist()
                assert got == want, (ROWS[r], layer, head)
    crs = fast.effective_cr()
    for (_, cr), got in zip(ROWS, crs.tolist(), strict=True):
        assert got == pytest.approx(cr, rel=0.06)


def test_bad_arguments(tiny) -> None:  # noqa: F811
    model = DMSCausalLM.from_pretrained(tiny[1])
    with pytest.raises(ValueError, match="unknown baseline"):
        BaselineKV(model, [("lru", 2.0)], max_len=10)
    with pytest.raises(ValueError, match="cr must be >= 1"):
        BaselineKV(model, [("tova", 0.5)], max_len=10)
    with pytest.raises(ValueError, match="exceeds the model context"):
        BaselineKV(model, [("tova", 2.0)], max_len=10_000)
    fast = BaselineKV(model, [("tova", 2.0)], max_len=2)
    fast.decode(torch.tensor([1]))
    fast.decode(torch.tensor([2]))
    with pytest.raises(ValueError, match="positions are used"):
        fast.decode(torch.tensor([3]))
