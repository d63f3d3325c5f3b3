"""Runs the fused decisions + log-keep kernel (``kernels.decisions``) under the Triton interpreter on CPU
against the core's torch ops (``relaxed_decisions`` then ``shifted_log_keep``) over seeded cases, and
prints the largest differences of values and gradients as JSON; started by ``test_fused_decisions.py``."""

from __future__ import annotations

import json
import random
import sys

import interpreter_setup  # noqa: F401  (TRITON_INTERPRET=1 before any kernel exists)
import torch

from dms_megatron.core.gating import relaxed_decisions
from dms_megatron.core.noise import logistic_from_uniform
from dms_megatron.core.shift import same_doc_as_next, shifted_log_keep
from dms_megatron.kernels.decisions import fused_decisions


def _docs(rng: random.Random, T: int) -> list[int]:
    ids, doc = [], 0
    while len(ids) < T:
        ids += [doc] * rng.randint(1, max(1, T // 3))
        doc += 1
    return ids[:T]


def case(seed: int) -> dict:
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    B, H, T = rng.randint(1, 2), rng.randint(1, 4), rng.choice([1, 2, 13, 300, 1500])
    tau = rng.choice([0.1, 1.0])
    strided = rng.random() < 0.5  # logits as a permuted view, as the Megatron layer hands them over
    logits = torch.randn(T, B, H, generator=gen).permute(1, 2, 0) * 3
    if not strided:
        logits = logits.contiguous()
    draw = rng.choice(["none", "noise", "uniforms"])
    per_layer = rng.random() < 0.4  # one draw per layer, expanded over the heads
    shape = (B, 1 if per_layer else H, T)
    uniforms = ((torch.randint(0, 2**24, shape, generator=gen).float() + 0.5) / 2**24).expand(B, H, T)
    noise = logistic_from_uniform(uniforms)
    doc_ids = torch.tensor(_docs(rng, T)) if rng.random() < 0.6 else None
    same = None if doc_ids is None else same_doc_as_next(doc_ids.expand(B, T))
    g_dec, g_lk = torch.randn(B, H, T, generator=gen), torch.randn(B, H, T, generator=gen)

    x_ref = logits.clone().requires_grad_(True)
    dec_ref, relaxed = relaxed_decisions(x_ref, None if draw == "none" else noise, tau)
    lk_ref = shifted_log_keep(relaxed, doc_ids)
    ((dec_ref * g_dec).sum() + (lk_ref * g_lk).sum()).backward()
    x = logits.detach().clone().requires_grad_(True)  # clone keeps the permuted strides
    kwargs = {"uniforms": uniforms} if draw == "uniforms" else {}
    dec, lk = fused_decisions(x, noise if draw == "noise" else None, tau, same, **kwargs)
    ((dec * g_dec).sum() + (lk * g_lk).sum()).backward()
    last_keys_zero = True if same is None else bool((lk[:, :, ~same[0]] == 0).all())
    return {
        "shape": [B, H, T],
        "draw": draw,
        "per_layer": per_layer,
        "strided": strided and not x.is_contiguous(),
        "documents": doc_ids is not None,
        "dtypes": [str(dec.dtype), str(lk.dtype)],
        "hard_equal": bool(torch.equal(dec.round(), dec_ref.round())),
        "decisions_max_error": float((dec - dec_ref).abs().max()),
        "log_keep_max_error": float((lk - lk_ref).abs().max()),
        "grad_max_error": float((x.grad - x_ref.grad).abs().max()),
        "grad_max": float(x_ref.grad.abs().max()),
        "last_keys_zero": last_keys_zero and bool((lk[..., -1] == 0).all()),
    }


def rejected(*args: object, **kwargs: object) -> bool:
    try:
        fused_decisions(*args, **kwargs)  # type: ignore[arg-type]
    except ValueError:
        return True
    return False


def main(n: int) -> None:
    rows = [case(seed) for seed in range(n)]
    x = torch.zeros(1, 2, 4)
    checks = [
        rejected(x, torch.zeros(1, 2, 3), 1.0),
        rejected(x, torch.zeros(1, 2, 4), 1.0, None, uniforms=torch.full((1, 2, 4), 0.5)),
        rejected(x, None, 1.0, torch.ones(1, 3, dtype=torch.bool)),
        rejected(x, None, 0.0),
    ]
    print(json.dumps({"cases": rows, "bad_inputs_rejected": checks}))


if __name__ == "__main__":
    main(int(sys.argv[1]))
