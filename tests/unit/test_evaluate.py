"""Evaluation on the tensor engines: perplexity/KL per prefix equal direct computations (dense oracle for
DMS, the per-token reference for a baseline), prefixes of one pass equal separate passes, the teacher
has KL 0, a separate teacher model is the one the baselines and the KL use; equal-memory baselines hold
what the DMS model holds; pass-key trials, fillers and prompt lengths."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from dms_megatron.inference.baselines import TOVA
from dms_megatron.inference.evaluate import (
    Policy,
    equal_memory_budgets,
    passkey,
    passkey_prompts,
    perplexity_and_kl,
    sweep,
    variable_tracking,
)
from dms_megatron.inference.model import DecodeSession
from dms_megatron.inference.paged_cache import BlockPool
from tests.unit.test_inference_model import _with_dms, tiny  # noqa: F401  (module fixture)


def _nll_kl(logits: torch.Tensor, teacher: torch.Tensor, ids: torch.Tensor) -> tuple[float, float]:
    logp, tl = torch.log_softmax(logits[:-1], -1), torch.log_softmax(teacher[:-1], -1)
    nll = -logp.gather(1, ids[1:, None]).mean()
    return float(nll.exp()), float((tl.exp() * (tl - logp)).sum(-1).mean())


def test_perplexity_kl_and_prefixes(tiny) -> None:  # noqa: F811
    model = _with_dms(tiny[1], "adapter", "head", 4)
    ids = torch.randint(0, 96, (48,), generator=torch.Generator().manual_seed(11))
    policies = [Policy("teacher"), Policy("dms"), Policy("tova", 2.0)]
    res = perplexity_and_kl(model, policies, ids.tolist(), prefixes=[20, 48], chunk=16)
    base = copy.copy(model)
    base.dms = None
    for n in (20, 48):
        table = res[f"perplexity_{n}"]
        teacher, _ = base.forward_dense(ids[:n])
        dms, _ = model.forward_dense(ids[:n])
        assert table["teacher"]["kl_to_teacher"] == 0 and table["teacher"]["memory_cr"] == 1.0
        ppl, kl = _nll_kl(dms, teacher, ids[:n])
        assert table["dms"]["perplexity"] == pytest.approx(ppl, rel=1e-4)
        assert table["dms"]["kl_to_teacher"] == pytest.approx(kl, rel=1e-3, abs=1e-6)
        session = DecodeSession(base, BlockPool(400, 4, head_dim=16), policy=TOVA(cr=2.0))
        tova = torch.stack([session.step(t) for t in ids[:n].tolist()])
        ppl, kl = _nll_kl(tova, teacher, ids[:n])
        assert table["tova@2"]["perplexity"] == pytest.approx(ppl, rel=1e-4)
        assert table["tova@2"]["kl_to_teacher"] == pytest.approx(kl, rel=1e-3)
        assert table["tova@2"]["stream_cr_mean"] == pytest.approx(session.stream_cr_mean(), rel=1e-5)
        held = session.held()
        assert table["tova@2"]["memory_cr"] == pytest.approx(n * held.numel() / float(held.sum()))
    dms = res["perplexity_48"]["dms"]
    assert 1.0 < dms["memory_cr"] <= dms["stream_cr_mean"]  # ratio of sums <= mean of ratios
    assert res["perplexity_48"]["tova@2"]["memory_cr"] == pytest.approx(2.0, rel=0.1)


def test_a_separate_teacher_is_used_for_kl_and_baselines(tiny) -> None:  # noqa: F811
    model = _with_dms(tiny[1], "adapter", "head", 4)
    teacher = copy.copy(model)
    teacher.w = {k: v * 1.01 if "mlp" in k else v for k, v in model.w.items()}
    teacher.dms = None
    ids = torch.randint(0, 96, (30,), generator=torch.Generator().manual_seed(12)).tolist()
    own = perplexity_and_kl(model, [Policy("teacher"), Policy("tova", 2.0)], ids, [30], teacher=None)
    sep = perplexity_and_kl(model, [Policy("teacher"), Policy("tova", 2.0)], ids, [30], teacher=teacher)
    t_logits, _ = teacher.forward_dense(torch.tensor(ids))
    assert sep["perplexity_30"]["teacher"]["perplexity"] == pytest.approx(
        _nll_kl(t_logits, t_logits, torch.tensor(ids))[0]
    )
    assert sep["perplexity_30"]["teacher"]["perplexity"] != own["perplexity_30"]["teacher"]["perplexity"]
    assert sep["perplexity_30"]["tova@2"]["perplexity"] != own["perplexity_30"]["tova@2"]["perplexity"]
    with pytest.raises(ValueError, match="unknown policy"):
        Policy("lru", 2.0)


def test_policy_labels_and_sweep() -> None:
    assert Policy("h2o", None).label == "h2o@=dms" and Policy("h2o", None).matched
    assert Policy("h2o", 8).label == "h2o@8" and not Policy("h2o", 8).matched
    assert not Policy("dms").matched and Policy("teacher").label == "teacher"
    rows = sweep(["tova", "h2o"], [2, 4.5])
    assert [p.label for p in rows] == ["tova@2", "tova@4.5", "h2o@2", "h2o@4.5"]
    with pytest.raises(ValueError, match="cr must be >= 1"):
        Policy("tova", 0.5)


def test_equal_memory_budgets_interpolate_and_hit_the_stops() -> None:
    budgets = equal_memory_budgets({4: 24.0, 8: 36.0}, length=8, streams=6)
    # totals 6, 12, 18, 24 (0 -> 24 over 4 tokens), then 27, 30, 33, 36; per stream / 6, rounded half up
    assert budgets.tolist() == [1, 2, 3, 4, 5, 5, 6, 6]
    with pytest.raises(ValueError, match="before the length"):
        equal_memory_budgets({4: 24.0}, length=8, streams=6)


def test_equal_memory_baselines_hold_what_dms_holds(tiny) -> None:  # noqa: F811
    model = _with_dms(tiny[1], "adapter", "head", 4)
    ids = torch.randint(0, 96, (200,), generator=torch.Generator().manual_seed(3)).tolist()
    matched = [Policy(n, None) for n in ("streaming_llm", "tova", "h2o")]
    policies = [Policy("dms"), *matched, *sweep(["h2o", "tova"], [2, 3])]
    prefixes = [64, 150, 200]
    res = perplexity_and_kl(model, policies, ids, prefixes, chunk=48, stride=32)
    streams = model.arch.num_layers * model.hkv
    for n in prefixes:
        table = res[f"perplexity_{n}"]
        dms_held = n * streams / table["dms"]["memory_cr"]
        assert table["dms"]["memory_cr"] > 1.3  # the DMS model really evicts
        for p in matched:
            held = n * streams / table[p.label]["memory_cr"]
            assert abs(held - dms_held) <= streams / 2 + 1e-6  # rounded to whole tokens per stream
            if n >= 150:  # long enough for half a token per stream to be < 1%
                assert table[p.label]["memory_cr"] == pytest.approx(table["dms"]["memory_cr"], rel=0.01)
            assert table[p.label]["kl_to_teacher"] > 0
        for cr in (2, 3):
            assert table[f"h2o@{cr}"]["memory_cr"] == pytest.approx(cr, rel=0.06)
    # two checkpoints in one evaluation: each with its own equal-memory rows, the same numbers as alone
    other = _with_dms(tiny[1], "adapter", "head", 8)
    both = perplexity_and_kl(
        {"a": model, "b": other},
        [
            Policy("dms", ref="a"),
            Policy("dms", ref="b"),
            Policy("tova", None, ref="a"),
            Policy("tova", None, ref="b"),
        ],
        ids,
        [200],
        chunk=48,
        stride=32,
    )["perplexity_200"]
    assert list(both) == ["dms:a", "dms:b", "tova@=dms:a", "tova@=dms:b"]
    assert both["dms:a"] == pytest.approx(res["perplexity_200"]["dms"], rel=1e-5)
    # the same budgets; TOVA's near-ties on a random model may break differently in another batch shape
    tova_a, tova = both["tova@=dms:a"], res["perplexity_200"]["tova@=dms"]
    assert tova_a["memory_cr"] == tova["memory_cr"]
    assert tova_a["perplexity"] == pytest.approx(tova["perplexity"], rel=0.05)
    assert both["tova@=dms:b"]["memory_cr"] == pytest.approx(both["dms:b"]["memory_cr"], rel=0.01)
    assert both["dms:b"]["memory_cr"] != both["dms:a"]["memory_cr"]
    # a sweep row in the same batch is the same row alone
    alone = perplexity_and_kl(model, [Policy("h2o", 3.0)], ids, [200])
    assert alone["perplexity_200"]["h2o@3"] == pytest.approx(res["perplexity_200"]["h2o@3"], rel=1e-5)


class _CharTokenizer:
    """Printable ASCII, one token per character (ids 0..94)."""

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [min(max(ord(c) - 32, 0), 94) for c in text]}

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i + 32) for i in ids)


def test_passkey_prompts_are_equal_length_with_cycled_depths() -> None:
    tok = _CharTokenizer()
    prompts, keys = passkey_prompts(tok, " Grass is green.", 150, [0.0, 1.0], 5, random.Random(0))
    assert len(prompts) == len(keys) == 5 and {len(p) for p in prompts} == {150}
    assert len(set(keys)) == 5
    texts = [tok.decode(p) for p in prompts]
    for i, (text, key) in enumerate(zip(texts, keys, strict=True)):
        at = text.index(f"The pass key is {key}")
        assert (at < 5) if i % 2 == 0 else (at > 40)  # depth 0, then 1 (just before the question)
    with pytest.raises(ValueError, match="shorter than the needle"):
        passkey_prompts(tok, " x", 40, [0.5], 1, random.Random(0))


def test_passkey_trials_fillers_and_equal_memory(tiny) -> None:  # noqa: F811
    model = _with_dms(tiny[1], "adapter", "head", 4)
    tok = _CharTokenizer()
    policies = [Policy("teacher"), Policy("dms"), Policy("h2o", None), Policy("tova", 2.0)]
    fillers = {"classic": " Grass is green.", "text": " the river flows past the old mill,"}
    out = passkey(model, tok, policies, fillers, [120, 140], [0.2, 0.8], trials=3, max_rows=4)
    assert set(out) == {f"passkey_{f}_{n}" for f in ("classic", "text") for n in (120, 140)}
    for table in out.values():
        assert list(table) == ["teacher", "dms", "h2o@=dms", "tova@2"]
        for row in table.values():
            assert row["trials"] == 3 and row["accuracy"] == row["found"] / 3
            assert row["teacher_accuracy"] == table["teacher"]["accuracy"]
        assert table["teacher"]["memory_cr"] == pytest.approx(1.0)
        assert table["dms"]["memory_cr"] > 1.2
        assert table["h2o@=dms"]["memory_cr"] == pytest.approx(table["dms"]["memory_cr"], rel=0.05)
        assert table["tova@2"]["memory_cr"] == pytest.approx(2.0, rel=0.05)


def test_variable_tracking_reports_memory_cr(tiny) -> None:  # noqa: F811
    model = _with_dms(tiny[1], "adapter", "head", 4)
    policies = [Policy("teacher"), Policy("dms"), Policy("h2o", None)]
    table = variable_tracking(model, _CharTokenizer(), policies, " Grass is green.", 150, hops=1, trials=2)
    assert list(table) == ["teacher", "dms", "h2o@=dms"]
    assert all(row["trials"] == 2 and 0 <= row["found"] <= 1 for row in table.values())
    assert table["h2o@=dms"]["memory_cr"] == pytest.approx(table["dms"]["memory_cr"], rel=0.05)
