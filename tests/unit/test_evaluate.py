"""Evaluation on the tensor engines: perplexity/KL per prefix equal direct computations (dense oracle for
DMS, the per-token reference for a baseline), prefixes of one pass equal separate passes, the teacher
has KL 0, and a separate teacher model is the one the baselines and the KL use."""

from __future__ import annotations

import copy

import pytest
import torch

from dms_megatron.inference.baselines import TOVA
from dms_megatron.inference.evaluate import Policy, perplexity_and_kl
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
        assert table["teacher"]["kl_to_teacher"] == 0 and table["teacher"]["effective_cr"] == 1.0
        ppl, kl = _nll_kl(dms, teacher, ids[:n])
        assert table["dms"]["perplexity"] == pytest.approx(ppl, rel=1e-4)
        assert table["dms"]["kl_to_teacher"] == pytest.approx(kl, rel=1e-3, abs=1e-6)
        session = DecodeSession(base, BlockPool(400, 4, head_dim=16), policy=TOVA(cr=2.0))
        tova = torch.stack([session.step(t) for t in ids[:n].tolist()])
        ppl, kl = _nll_kl(tova, teacher, ids[:n])
        assert table["tova@2"]["perplexity"] == pytest.approx(ppl, rel=1e-4)
        assert table["tova@2"]["kl_to_teacher"] == pytest.approx(kl, rel=1e-3)
        assert table["tova@2"]["effective_cr"] == pytest.approx(session.effective_cr(), rel=1e-5)
    assert res["perplexity_48"]["dms"]["effective_cr"] > 1.0
    dms = res["perplexity_48"]["dms"]
    assert 1.0 < dms["kv_cr"] <= dms["effective_cr"]  # mean of ratios >= ratio of sums
    assert res["perplexity_48"]["tova@2"]["kv_cr"] == pytest.approx(2.0, rel=0.1)


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
