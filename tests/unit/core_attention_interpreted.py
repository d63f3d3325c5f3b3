"""Runs megatron's ``DMSCoreAttention`` in training mode with the Triton attention backend under the
Triton interpreter on CPU (decisions and bias through ``kernels.decisions``; and once more through the
core's torch ops in front of the same kernel) and with the reference backend, on the same inputs and
noise, and prints as JSON the largest differences of the output, the decisions and every gradient, and
the launches each way (aten ops that launch a GPU kernel, plus one per Triton kernel); started by
``test_fused_decisions.py``."""

from __future__ import annotations

import json
from types import SimpleNamespace

import interpreter_setup  # noqa: F401  (TRITON_INTERPRET=1 before any kernel exists)
import torch
import triton.runtime.interpreter as interpreter
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig
from torch.utils._python_dispatch import TorchDispatchMode

from dms_megatron.config import DMSConfig
from dms_megatron.megatron.attention import DMSCoreAttention
from dms_megatron.megatron.state import DMSRunState

# ops that launch no kernel on a GPU (views, allocation)
_NO_LAUNCH = {
    "view", "_unsafe_view", "expand", "permute", "t", "transpose", "unsqueeze", "squeeze", "slice",
    "select", "alias", "detach", "as_strided", "split", "split_with_sizes", "chunk", "narrow", "empty",
    "empty_like", "new_empty", "empty_strided", "lift_fresh", "is_nonzero", "_local_scalar_dense",
}  # fmt: skip


class LaunchCount(TorchDispatchMode):
    """Counts the aten ops that would launch a GPU kernel, plus one per Triton kernel (whose interpreter
    runs its own tensor ops, not counted)."""

    active: LaunchCount | None = None

    def __init__(self) -> None:
        super().__init__()
        self.ops, self.kernels, self.paused = 0, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused and func.overloadpacket.__name__ not in _NO_LAUNCH:
            self.ops += 1
        return func(*args, **(kwargs or {}))


_grid_call = interpreter.GridExecutor.__call__


def _counted_grid_call(self, *args, **kwargs):
    counter = LaunchCount.active
    if counter is None:
        return _grid_call(self, *args, **kwargs)
    counter.kernels += 1
    counter.paused += 1
    try:
        return _grid_call(self, *args, **kwargs)
    finally:
        counter.paused -= 1


interpreter.GridExecutor.__call__ = _counted_grid_call


class _OneRank:
    def size(self) -> int:
        return 1

    def rank(self) -> int:
        return 0


def run(backend: str, thd: bool, inputs: dict, fused: bool = True) -> dict:
    config = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, num_query_groups=2)
    dms = DMSConfig(variant="adapter", window=3, tau=0.5, attention_backend=backend)
    core = DMSCoreAttention(
        config, 1, AttnMaskType.causal, pg_collection=SimpleNamespace(tp=_OneRank()),
        dms_config=dms, dms_state=DMSRunState(step=3),
    )  # fmt: skip
    core.train()
    if not fused:  # the core's torch decisions and bias in front of the same attention kernel
        core._fuses_decisions = lambda q: False  # type: ignore[method-assign]
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
    gen = torch.Generator().manual_seed(11)
    counter = LaunchCount()
    LaunchCount.active = counter
    try:
        with counter:
            out = core(q, k, v, None, packed_seq_params=packed, dms_logits=leaves["logits"])
            forward = counter.ops + counter.kernels
            counter.paused += 1  # the test's own loss is not the layer's
            g_out = torch.randn(out.shape, generator=gen)
            g_dec = torch.randn(captured["decisions"].shape, generator=gen)
            loss = (out * g_out).sum() + (captured["decisions"] * g_dec).sum()
            counter.paused -= 1
            before_backward = counter.ops + counter.kernels
            loss.backward()
    finally:
        LaunchCount.active = None
    launches = {"forward": forward, "backward": counter.ops + counter.kernels - before_backward}
    return {"out": out.detach(), "decisions": captured["decisions"].detach(), "launches": launches} | {
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
        unfused = run("triton", thd, inputs, fused=False)
        tensors = [k for k in ref if k != "launches"]
        report["thd" if thd else "sbhd"] = {k: float((fused[k] - ref[k]).abs().max()) for k in tensors} | {
            "hard_equal": bool(torch.equal(fused["decisions"].round(), ref["decisions"].round())),
            "unfused_max_difference": max(float((unfused[k] - fused[k]).abs().max()) for k in tensors),
            "launches_fused": fused["launches"],
            "launches_unfused": unfused["launches"],
        }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
