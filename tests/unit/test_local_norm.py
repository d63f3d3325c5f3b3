"""``megatron.norm``: the norms keep fp32 weights but run in the activations' dtype (torch's fused
kernel), equal to the plain torch norms when the dtypes already agree."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch

from dms_megatron.megatron.norm import LocalNorm


def _config(normalization: str, sp: bool = False) -> SimpleNamespace:
    return SimpleNamespace(
        layernorm_zero_centered_gamma=False, normalization=normalization, sequence_parallel=sp
    )


@pytest.mark.parametrize("normalization", ["RMSNorm", "LayerNorm"])
def test_fp32_inputs_match_the_torch_norm_bitwise(normalization) -> None:
    torch.manual_seed(0)
    norm = LocalNorm(_config(normalization), 64, eps=1e-5)
    plain = getattr(torch.nn, normalization)(64, eps=1e-5)
    with torch.no_grad():
        for p in norm.parameters():
            p.uniform_(0.5, 1.5)
    plain.load_state_dict(norm.state_dict())
    assert type(norm).__name__ == normalization and norm.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(3, 7, 64)
    assert torch.equal(norm(x), plain(x))


@pytest.mark.parametrize("normalization", ["RMSNorm", "LayerNorm"])
def test_bf16_inputs_run_in_bf16_with_fp32_weight_gradients(normalization) -> None:
    """No mixed-dtype fallback (its warning), a bf16 output within bf16 rounding of the fp32 norm, and
    gradients that reach the fp32 weights as fp32."""
    torch.manual_seed(1)
    norm = LocalNorm(_config(normalization, sp=True), 64, eps=1e-5)
    with torch.no_grad():
        for p in norm.parameters():
            p.uniform_(0.5, 1.5)
    assert all(p.dtype == torch.float32 and p.sequence_parallel for p in norm.parameters())
    x = torch.randn(4, 9, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when a mixed-dtype norm cannot use the fused kernel
        y = norm(x.bfloat16().requires_grad_())
    assert y.dtype == torch.bfloat16
    ref = norm(x).detach()
    assert float((y.detach().float() - ref).abs().max()) <= 2**-7 * float(ref.abs().max())
    y.float().square().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in norm.parameters())
