"""The plain-torch DMS model: equals transformers without eviction, and decoding token by token with
physically compressed per-head caches equals the hard-eviction dense oracle."""

from __future__ import annotations

import pytest
import torch

from dms_megatron.inference.model import DecodeSession, DMSCausalLM
from dms_megatron.inference.paged_cache import BlockPool


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        initializer_range=0.1,
    )
    hf = tf.LlamaForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("tiny") / "hf"
    hf.save_pretrained(path)
    return hf, path


def test_no_dms_matches_transformers(tiny) -> None:
    hf, path = tiny
    model = DMSCausalLM.from_pretrained(path)
    ids = torch.randint(0, 96, (40,), generator=torch.Generator().manual_seed(1))
    logits, decisions = model.forward_dense(ids)
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)
    assert decisions == []


def test_merged_projections_equal_the_separate_linears(tiny) -> None:
    """Each layer's q/k/v and gate/up weights live in one tensor (the separate names are views of it);
    one GEMM over it, split, equals the separate linears, biases included (Qwen2 has them on q/k/v only);
    reassigning the weights (another dtype) merges them again."""
    from dms_megatron.inference.model import MERGED

    _, path = tiny
    model = DMSCausalLM.from_pretrained(path)
    gen = torch.Generator().manual_seed(4)
    weights = dict(model.w)
    for name, n in (("q_proj", 64), ("k_proj", 32), ("v_proj", 32)):
        weights[f"model.layers.1.self_attn.{name}.bias"] = torch.randn(n, generator=gen)
    model.w = weights
    x = torch.randn(5, 64, generator=gen)
    for names in MERGED:
        merged = model._project(x, 1, names, fused=True)
        separate = model._project(x, 1, names, fused=False)
        for a, b in zip(merged, separate, strict=True):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    qkv = model._merged[(1, MERGED[0])][0]
    q = model.w["model.layers.1.self_attn.q_proj.weight"]
    assert q.untyped_storage().data_ptr() == qkv.untyped_storage().data_ptr()  # a view, not a copy
    model.w = {k: v.double() for k, v in model.w.items()}
    assert all(w.dtype == torch.float64 for w, _, _ in model._merged.values())


def test_batched_teacher_pass_equals_the_oracle(tiny) -> None:
    """``dense_last_logits`` (batched rows, torch's fused causal attention) == the oracle's last logits
    per row; it refuses a model with eviction."""
    from dms_megatron.inference.model import dense_last_logits

    _, path = tiny
    model = DMSCausalLM.from_pretrained(path)
    ids = torch.randint(0, 96, (3, 37), generator=torch.Generator().manual_seed(2))
    got = dense_last_logits(model, ids)
    want = torch.stack([model.forward_dense(row)[0][-1] for row in ids])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="original model"):
        dense_last_logits(_with_dms(path, "adapter", "head", 4), ids)


def _with_dms(path, variant: str, per: str, window: int) -> DMSCausalLM:
    model = DMSCausalLM.from_pretrained(path)
    gen = torch.Generator().manual_seed(7)
    if variant == "adapter":
        for i in range(model.arch.num_layers):
            model.w[f"model.layers.{i}.self_attn.dms_proj_alpha_norm.weight"] = torch.ones(64)
            model.w[f"model.layers.{i}.self_attn.dms_proj_alpha.weight"] = (
                torch.randn(2, 64, generator=gen) * 0.3
            )
        model.dms = {
            "variant": "adapter",
            "decisions_per": per,
            "window": window,
            "logit_scale": 1.0,
            "logit_offset": -0.5,
        }
    else:
        model.dms = {
            "variant": "neuron",
            "decisions_per": per,
            "window": window,
            "logit_scale": 20.0,
            "logit_offset": 0.0,
        }
    return model


@pytest.mark.parametrize(
    ("variant", "per", "window"), [("adapter", "head", 4), ("adapter", "layer", 0), ("neuron", "head", 3)]
)
def test_cached_decode_equals_dense_oracle(tiny, variant, per, window) -> None:
    _, path = tiny
    model = _with_dms(path, variant, per, window)
    ids = torch.randint(0, 96, (48,), generator=torch.Generator().manual_seed(2))
    dense, decisions = model.forward_dense(ids)
    rate = torch.stack(decisions).float()[:, :, 1:].mean().item()
    assert 0.2 < rate < 0.9, rate  # mixed decisions, so eviction really happens
    pool = BlockPool(num_blocks=3 * 2 * 16, block_size=4, head_dim=16)
    session = DecodeSession(model, pool)
    for t, tok in enumerate(ids.tolist()):
        torch.testing.assert_close(session.step(tok), dense[t], atol=1e-4, rtol=1e-4)
    T = len(ids)
    for layer, dec in enumerate(decisions):
        for head in range(2):
            expect = sum(1 for p in range(T) if p >= T - 1 - window or not dec[head, p + 1])
            assert session.held()[layer, head] == expect
    assert session.held().sum() < 0.8 * T * 3 * 2  # memory really shrank
    session.release()
    assert pool.free_blocks == pool.num_blocks


@pytest.mark.parametrize("chunk", [2, 5, 16, 64])
def test_chunked_prefill_and_multi_turn_equal_the_oracle(tiny, chunk) -> None:
    _, path = tiny
    model = _with_dms(path, "adapter", "head", 4)
    ids = torch.randint(0, 96, (60,), generator=torch.Generator().manual_seed(3))
    dense, _ = model.forward_dense(ids)
    pool = BlockPool(num_blocks=3 * 2 * 20, block_size=4, head_dim=16)
    session = DecodeSession(model, pool)
    first = session.prefill(ids[:30].tolist(), chunk_size=chunk)  # turn 1
    decoded = torch.stack([session.step(t) for t in ids[30:40].tolist()])  # decode
    second = session.prefill(ids[40:].tolist(), chunk_size=chunk)  # turn 2 continues the compressed cache
    torch.testing.assert_close(torch.cat([first, decoded, second]), dense, atol=1e-4, rtol=1e-4)


def test_a_dms_block_missing_fields_is_a_clear_error(tiny) -> None:
    model = DMSCausalLM.from_pretrained(tiny[1])
    with pytest.raises(ValueError, match=r"lacks \['window', 'logit_scale'"):
        DMSCausalLM(model.arch, model.w, {"variant": "neuron", "decisions_per": "head", "logit_offset": 0.0})
    with pytest.raises(ValueError, match=r"dms.variant='x' is invalid: choose one of neuron, adapter"):
        DMSCausalLM(
            model.arch,
            model.w,
            {"variant": "x", "decisions_per": "head", "window": 4, "logit_scale": 1, "logit_offset": 0},
        )
