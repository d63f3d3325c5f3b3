"""Runs the training rotary (``kernels.fused_elementwise.rotary_with_grad``) under the Triton interpreter
on CPU and prints, as JSON: its output and q / k gradients against megatron's unfused RoPE
(``_apply_rotary_pos_emb_bshd``, what the DMS attention of packed sequences used before) for seeded
cases; and a tiny DMS GPT's packed forward / backward with the fused rotary against the same model with
megatron's. Started by ``test_rotary_train.py`` in a fresh interpreter."""

from __future__ import annotations

import json
import random

import interpreter_setup  # noqa: F401  (TRITON_INTERPRET=1 before any kernel exists)
import torch
from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

from dms_megatron.kernels.fused_elementwise import rotary_tables, rotary_with_grad


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def case(seed: int, dtype: torch.dtype) -> dict:
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    T, HQ, HK, D = rng.randint(1, 40), rng.choice([1, 3, 4]), rng.choice([1, 2]), rng.choice([16, 32, 64])
    mscale = rng.choice([1.0, 1.0, 0.87])
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    pos = torch.randint(0, 3000, (T,), generator=gen).float()
    half = torch.outer(pos, inv)
    freqs = torch.cat((half, half), dim=-1).reshape(T, 1, 1, D)  # megatron's table layout
    q = torch.randn(T, 1, HQ, D, generator=gen).to(dtype).requires_grad_()
    k = torch.randn(T, 1, HK, D, generator=gen).to(dtype).requires_grad_()
    dq_out = torch.randn(T, 1, HQ, D, generator=gen).to(dtype)
    dk_out = torch.randn(T, 1, HK, D, generator=gen).to(dtype)

    want_q = _apply_rotary_pos_emb_bshd(q, freqs, mscale=mscale)
    want_k = _apply_rotary_pos_emb_bshd(k, freqs, mscale=mscale)
    want_dq, want_dk = torch.autograd.grad((want_q, want_k), (q, k), (dq_out, dk_out))

    tables = rotary_tables(freqs, dtype, mscale)
    got_q, got_k = rotary_with_grad(q.reshape(T, HQ, D), k.reshape(T, HK, D), *tables)
    got_dq, got_dk = torch.autograd.grad(
        (got_q, got_k), (q, k), (dq_out.reshape(T, HQ, D), dk_out.reshape(T, HK, D))
    )
    return {
        "shape": [T, HQ, HK, D],
        "mscale": mscale,
        "q": _max_diff(got_q.reshape(want_q.shape), want_q),
        "k": _max_diff(got_k.reshape(want_k.shape), want_k),
        "dq": _max_diff(got_dq, want_dq),
        "dk": _max_diff(got_dk, want_dk),
    }


def model_case() -> dict:
    """A tiny DMS GPT (head dim 16) on a packed micro-batch: output and every gradient with the fused
    rotary vs megatron's (the attention itself on the reference backend)."""
    import os
    import socket

    import torch.distributed as dist

    from dms_megatron.megatron import apply_dms
    from dms_megatron.megatron.attention import DMSSelfAttention
    from dms_megatron.megatron.families import local_layer_spec
    from dms_megatron.megatron.patches.cpu_training import enable_cpu_training
    from dms_megatron.testing import tiny_gpt
    from dms_megatron.testing.tiny_dms import dms_test_config
    from dms_megatron.training.batches import pack_thd

    enable_cpu_training()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    spec = apply_dms(local_layer_spec(), dms_test_config())
    model = tiny_gpt.build_tiny_gpt(1, 1, seed=7, layer_spec=spec)
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, tiny_gpt.VOCAB, (2, tiny_gpt.SEQ_LEN), generator=gen)
    pos = torch.arange(tiny_gpt.SEQ_LEN).repeat(2, 1)
    pos[:, 9:] -= 9  # two documents a row
    calls = {"fused": 0}
    original = DMSSelfAttention._fuses_rotary

    def counted(self, query, key):
        used = original(self, query, key)
        calls["fused"] += used
        return used

    def run(fused: bool):
        DMSSelfAttention._fuses_rotary = counted if fused else (lambda self, q, k: False)
        model.zero_grad(set_to_none=True)
        p = pack_thd({"tokens": tokens, "position_ids": pos}, "cpu")
        out = model(
            input_ids=p["input_ids"],
            position_ids=p["position_ids"],
            attention_mask=None,
            packed_seq_params=p["packed_seq_params"],
        )
        out.float().square().mean().backward()
        return out.detach(), {n: w.grad.clone() for n, w in model.named_parameters() if w.grad is not None}

    out_m, grads_m = run(False)
    out_f, grads_f = run(True)
    DMSSelfAttention._fuses_rotary = original
    return {
        "fused_calls": calls["fused"],
        "out": _max_diff(out_f, out_m),
        "grads": max(_max_diff(grads_f[n], grads_m[n]) for n in grads_m),
        "same_grad_names": sorted(grads_f) == sorted(grads_m),
    }


def main() -> None:
    report = {
        "fp32": [case(s, torch.float32) for s in range(6)],
        "fp16": [case(100 + s, torch.float16) for s in range(6)],
        "model": model_case(),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
