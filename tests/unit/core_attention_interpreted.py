"""Runs megatron's ``DMSCoreAttention`` in training mode with the Triton attention backend under the
Triton interpreter on CPU (decisions and bias through ``kernels.decisions``) and with the reference
backend (the core's torch ops), on the same inputs and noise, and prints the largest differences of the
output, the decisions and every gradient as JSON; started by ``test_fused_decisions.py``."""

from __future__ import annotations

import json
from types import SimpleNamespace

import interpreter_setup  # noqa: F401  (TRITON_INTERPRET=1 before any kernel exists)
import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from dms_megatron.config import DMSConfig
from dms_megatron.megatron.attention import DMSCoreAttention
from dms_megatron.megatron.state import DMSRunState


class _OneRank:
    def size(self) -> int:
        return 1

    def rank(self) -> int:
        return 0


def run(backend: str, thd: bool, inputs: dict) -> dict:
    config = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, num_query_groups=2)
    dms = DMSConfig(variant="adapter", window=3, tau=0.5, attention_backend=backend)
    core = DMSCoreAttention(
        config, 1, AttnMaskType.causal, pg_collection=SimpleNamespace(tp=_OneRank()),
        dms_config=dms, dms_state=DMSRunState(step=3),
    )  # fmt: skip
    core.train()
    captured = {}

    def account(out, decisions, thd):
        captured["decisions"] = decisions
        return out

    core._account = account  # type: ignore[method-assign]
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items() if k != "cu"}
    packed = None
    if thd:
        cu = inputs["cu"]
        packed = SimpleNamespace(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_q_padded=None)
    q, k, v = leaves["q"], leaves["k"], leaves["v"]
    out = core(q, k, v, None, packed_seq_params=packed, dms_logits=leaves["logits"])
    gen = torch.Generator().manual_seed(11)
    g_out = torch.randn(out.shape, generator=gen)
    g_dec = torch.randn(captured["decisions"].shape, generator=gen)
    ((out * g_out).sum() + (captured["decisions"] * g_dec).sum()).backward()
    return {"out": out.detach(), "decisions": captured["decisions"].detach()} | {
        f"grad_{k}": v.grad for k, v in leaves.items()
    }


def main() -> None:
    gen = torch.Generator().manual_seed(7)
    report = {}
    for thd in (False, True):
        s, b = (23, 1) if thd else (19, 2)
        shape_q, shape_kv = ((s, 4, 16), (s, 2, 16)) if thd else ((s, b, 4, 16), (s, b, 2, 16))
        inputs = {
            "q": torch.randn(shape_q, generator=gen),
            "k": torch.randn(shape_kv, generator=gen),
            "v": torch.randn(shape_kv, generator=gen),
            "logits": torch.randn((s, 1, 2) if thd else (s, b, 2), generator=gen) * 2,
            "cu": torch.tensor([0, 5, 6, 15, 23]),
        }
        ref = run("reference", thd, inputs)
        fused = run("triton", thd, inputs)
        report["thd" if thd else "sbhd"] = {k: float((fused[k] - ref[k]).abs().max()) for k in ref} | {
            "hard_equal": bool(torch.equal(fused["decisions"].round(), ref["decisions"].round()))
        }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
