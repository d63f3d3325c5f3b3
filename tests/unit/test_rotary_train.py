"""The training rotary (``kernels.fused_elementwise.rotary_with_grad``: RoPE of q and k in one launch,
its backward in one) equals megatron's unfused RoPE bit for bit, output and gradients, over seeded
shapes (GQA, head dims 16-64, a YaRN-style mscale), and a tiny DMS GPT's packed forward / backward with
it equals the same model with megatron's. Run by the Triton interpreter on CPU (fp32 and fp16; bf16 on
a GPU: tests/gpu/test_core_on_gpu.py)."""

from __future__ import annotations

import pytest

pytest.importorskip("triton")
from tests.unit.interpreted import run_interpreted


@pytest.fixture(scope="module")
def report() -> dict:
    return run_interpreted("rotary_train_interpreted.py")


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_output_and_gradients_equal_megatrons_rope(report, dtype) -> None:
    rows = report[dtype]
    assert len(rows) == 6 and any(r["mscale"] != 1.0 for r in rows) and any(r["shape"][2] > 1 for r in rows)
    for r in rows:
        assert r["q"] == r["k"] == r["dq"] == r["dk"] == 0.0, r


def test_a_dms_gpt_with_it_equals_the_model_with_megatrons_rope(report) -> None:
    m = report["model"]
    assert m["fused_calls"] == 4, "one fused call per layer of the tiny GPT"
    assert m["out"] == 0.0 and m["grads"] == 0.0 and m["same_grad_names"], m
