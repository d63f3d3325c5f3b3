"""Host-side parts of the retrofit step on CUDA: the local norms with bf16 activations and fp32 weights
reach torch's fused RMSNorm kernel (one ``aten::_fused_rms_norm`` instead of the composite's pow / mean /
rsqrt / mul chain) within bf16 rounding of the fp32 norm; the gradient norm replacing megatron-core's
TE-free fallback runs without a host synchronisation and equals the fallback's."""

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


def test_foreach_grad_norm_has_no_host_sync_and_equals_the_fallback() -> None:
    from megatron.core.utils import local_multi_tensor_l2_norm, local_multi_tensor_scale

    from dms_megatron.megatron.patches.grad_norm import foreach_l2_norm, foreach_scale

    gen = torch.Generator(device="cuda").manual_seed(0)
    grads = [torch.randn(n, device="cuda", generator=gen) for n in (576 * 576, 576, 49152 * 576 // 8, 1)]
    flag = torch.zeros(1, dtype=torch.int, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call raises
    try:
        ours, _ = foreach_l2_norm(2048 * 32, flag, [grads], False)
        scaled = [g.clone() for g in grads]
        foreach_scale(2048 * 32, flag, [scaled, scaled], 0.25)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    theirs, _ = local_multi_tensor_l2_norm(2048 * 32, flag, [grads], False)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    upstream = [g.clone() for g in grads]
    local_multi_tensor_scale(2048 * 32, flag, [upstream, upstream], 0.25)
    assert all(torch.equal(a, b) for a, b in zip(scaled, upstream, strict=True))
