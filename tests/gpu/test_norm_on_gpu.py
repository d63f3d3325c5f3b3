"""The local norms on CUDA: bf16 activations with fp32 weights reach torch's fused RMSNorm kernel (one
``aten::_fused_rms_norm`` instead of the composite's pow / mean / rsqrt / mul chain) and stay within bf16
rounding of the fp32 norm."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dms_megatron.megatron.norm import LocalNorm


class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_bf16_rms_norm_dispatches_to_the_fused_kernel() -> None:
    config = SimpleNamespace(
        layernorm_zero_centered_gamma=False, normalization="RMSNorm", sequence_parallel=False
    )
    norm = LocalNorm(config, 576, eps=1e-5).cuda()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 2048, 576, device="cuda")
    xb = x.bfloat16().requires_grad_()
    grad = torch.randn_like(xb)
    with _Ops() as rec:  # the norm's forward and backward alone
        y = norm(xb)
        y.backward(grad)
    print("ops:", rec.ops)
    assert any("_fused_rms_norm" in op for op in rec.ops), rec.ops
    assert not any(op.startswith("aten.pow") or op.startswith("aten.rsqrt") for op in rec.ops), rec.ops
    ref = norm(x).detach()
    assert y.dtype == torch.bfloat16
    assert float((y.detach().float() - ref).abs().max()) <= 2**-7 * float(ref.abs().max())
    assert norm.weight.grad is not None and norm.weight.grad.dtype == torch.float32
