"""The flex backend's captured window tensor: made once per (window, device), never an inference tensor."""

from __future__ import annotations

import torch

from dms_megatron.kernels.flex import _window_tensor


def test_window_tensor_is_cached_and_usable_by_training_after_inference() -> None:
    _window_tensor.cache_clear()
    with torch.inference_mode():
        first = _window_tensor(37, torch.device("cpu"))
    assert not first.is_inference()
    assert _window_tensor(37, torch.device("cpu")) is first
    assert first.dtype == torch.int32 and int(first) == 37
    assert _window_tensor(38, torch.device("cpu")) is not first
    x = torch.ones(3, requires_grad=True)
    (x * first).sum().backward()  # saved for backward: fails for an inference tensor
    assert torch.equal(x.grad, torch.full((3,), 37.0))
