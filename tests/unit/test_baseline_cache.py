"""The tensor baselines (all rows in lockstep, each with its own policy and CR) == the per-token
reference policies of ``baselines.py``: same logits at every step, same tokens held per stream, with
one attention bucket or several, in storage sized by the largest budget (slots reused after evictions);
a row following a budget schedule == the row with that CR."""

from __future__ import annotations

import pytest
import torch

from dms_megatron.inference.baseline_cache import BaselineKV
from dms_megatron.inference.baselines import POLICIES
from dms_megatron.inference.model import DecodeSession, DMSCausalLM
from dms_megatron.inference.paged_cache import BlockPool
from tests.unit.test_inference_model import tiny  # noqa: F401  (module fixture)

ROWS = [("streaming_llm", 3.0), ("tova", 2.0), ("h2o", 3.0), ("tova", 4.0), ("h2o", 1.5)]


@pytest.mark.parametrize("bucket", [1024, 16])
def test_lockstep_rows_equal_the_reference_policies(tiny, bucket: int) -> None:  # noqa: F811
    model = DMSCausalLM.from_pretrained(tiny[1])
    ids = torch.randint(0, 96, (70,), generator=torch.Generator().manual_seed(8))
    fast = BaselineKV(model, ROWS, max_len=80, min_keep=4, bucket=bucket)
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
    assert fast.S == 55 and fast.k.shape[3] == 55  # slots for the largest budget (CR 1.5) + 1, not 80
    crs = fast.stream_cr_mean()
    for (_, cr), got in zip(ROWS, crs.tolist(), strict=True):
        assert got == pytest.approx(cr, rel=0.06)
    held = fast.held().sum((0, 2)).float()
    torch.testing.assert_close(fast.memory_cr(), 70 * model.arch.num_layers * model.hkv / held)


def test_budget_schedule_rows(tiny) -> None:  # noqa: F811
    model = DMSCausalLM.from_pretrained(tiny[1])
    ids = torch.randint(0, 96, (40,), generator=torch.Generator().manual_seed(9))
    seen = torch.arange(1, 41, dtype=torch.float64)
    as_cr = torch.ceil(seen / 3.0).long()  # clamped to min_keep inside
    ramp = torch.clamp(seen.long() // 2, min=1)  # any non-decreasing schedule
    budgets = torch.stack([ramp, torch.zeros(40, dtype=torch.long), as_cr, ramp])
    rows = [("h2o", None), ("tova", 3.0), ("h2o", None), ("streaming_llm", None)]
    fast = BaselineKV(model, rows, max_len=40, min_keep=4, budgets=budgets)
    ref = BaselineKV(model, [*rows[:2], ("h2o", 3.0), rows[3]], max_len=40, min_keep=4, budgets=budgets)
    for tok in ids.tolist():
        logits = fast.decode(torch.full((4,), tok))
        assert torch.equal(logits, ref.decode(torch.full((4,), tok)))  # the schedule is the CR rule
        held = fast.held()
        t = fast.steps - 1
        for r in (0, 3):  # a schedule row holds exactly its budget once the budget is below the tokens seen
            assert (held[:, r] == min(t + 1, max(4, int(ramp[t])))).all()
    assert torch.equal(fast.held_mask, ref.held_mask)
    assert fast.memory_cr()[1] == pytest.approx(3.0, rel=0.1)


def test_h2o_recent_window_without_a_sort_equals_the_sorted_rule(tiny) -> None:  # noqa: F811
    """Budgets that grow by at most one token a step keep H2O's recent tokens the last positions seen,
    so the fast rule (no sort) holds exactly what the sorted rule holds, also for a budget that falls
    (slowly or at once) and rises again; a schedule that jumps up keeps the sort."""
    model = DMSCausalLM.from_pretrained(tiny[1])
    ids = torch.randint(0, 96, (60,), generator=torch.Generator().manual_seed(10))
    # up by one token every other step, down by one a step, a sudden drop, then up by one a step
    wave = torch.tensor([min(t // 2 + 4, 16, max(8, 40 - t)) for t in range(46)] + list(range(4, 18)))
    rows = [("h2o", 3.0), ("h2o", 1.5), ("h2o", None), ("tova", 2.0)]
    budgets = torch.stack([wave, wave, wave, wave])
    fast = BaselineKV(model, rows, max_len=60, min_keep=4, budgets=budgets)
    slow = BaselineKV(model, rows, max_len=60, min_keep=4, budgets=budgets)
    slow._recent_is_suffix = False
    assert fast._recent_is_suffix
    for tok in ids.tolist():
        assert torch.equal(fast.decode(torch.full((4,), tok)), slow.decode(torch.full((4,), tok)))
        assert torch.equal(fast.held_mask, slow.held_mask)
    jump = torch.full((1, 60), 4)
    jump[:, 30:] = 20
    assert not BaselineKV(model, [("h2o", None)], max_len=60, budgets=jump)._recent_is_suffix


def test_bad_arguments(tiny) -> None:  # noqa: F811
    model = DMSCausalLM.from_pretrained(tiny[1])
    with pytest.raises(ValueError, match="unknown baseline"):
        BaselineKV(model, [("lru", 2.0)], max_len=10)
    with pytest.raises(ValueError, match="cr must be >= 1"):
        BaselineKV(model, [("tova", 0.5)], max_len=10)
    with pytest.raises(ValueError, match="follow budgets"):
        BaselineKV(model, [("tova", None)], max_len=10)
    with pytest.raises(ValueError, match="exceeds the model context"):
        BaselineKV(model, [("tova", 2.0)], max_len=10_000)
    fast = BaselineKV(model, [("tova", 2.0)], max_len=2)
    fast.decode(torch.tensor([1]))
    fast.decode(torch.tensor([2]))
    with pytest.raises(ValueError, match="positions are used"):
        fast.decode(torch.tensor([3]))
