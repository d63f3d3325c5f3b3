"""Rank-side jobs for the DMS Megatron tests (run inside ``runner.run_distributed``).

Each job builds the tiny GPT with a DMS layer spec at some TP/PP/SP layout from the same master
weights, runs megatron's schedule on the same micro-batches with loss = vocab-parallel KD against
fixed teacher logits + the exact global compression loss, and returns losses, full gradients and
per-[layer, KV head] decision rates as CPU tensors.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from megatron.core import parallel_state

from dms_megatron.megatron import (
    adjust_p2p_shapes,
    apply_dms,
    attach_dms_pipeline,
    dms_compression_loss,
    reduce_decision_stats,
)
from dms_megatron.megatron.families import local_layer_spec
from dms_megatron.testing import tiny_gpt
from dms_megatron.testing.tiny_dms import dms_test_config, run_dms_schedule

NUM_MICROBATCHES = 2


def merge_grads(results: list[dict]) -> dict[str, torch.Tensor]:
    """Union of the ranks' full gradients (PP stages); replicas (TP/DP copies) must agree."""
    grads: dict[str, torch.Tensor] = {}
    for r in results:
        for name, g in r["grads"].items():
            if name in grads:
                torch.testing.assert_close(
                    grads[name], g, rtol=0, atol=1e-6, msg=f"replicas disagree on {name}"
                )
            grads[name] = g
    return grads


def parity_job(
    rank: int,
    world_size: int,
    tp: int,
    pp: int,
    sp: bool,
    dms_kwargs: dict[str, Any],
    **config_overrides: Any,
) -> dict:
    cfg = dms_test_config(**dms_kwargs)
    spec = apply_dms(local_layer_spec(), cfg)
    model = tiny_gpt.build_tiny_gpt(tp, pp, seed=7, sequence_parallel=sp, layer_spec=spec, **config_overrides)
    state = attach_dms_pipeline(model)
    state.step = 3
    calls = [0]
    for m in model.modules():
        if type(m).__name__ == "DMSCoreAttention":
            m.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    losses = run_dms_schedule(model, tiny_gpt.make_batches(NUM_MICROBATCHES), state, 2)
    rates = reduce_decision_stats(state, tiny_gpt.NUM_LAYERS, 2)
    grads = tiny_gpt.gather_full_grads(model)
    return {"losses": losses, "grads": grads, "rates": rates.cpu(), "core_calls": calls[0]}


def recompute_job(rank: int, world_size: int, variant: str) -> dict:
    """The same step without recompute, with selective core-attention recompute, and with full-layer
    recompute: logits, decisions and the compression-channel gradient must survive recompute."""
    modes = {
        "none": {},
        "selective": {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]},
        "full": {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
    }
    return {
        name: parity_job(rank, world_size, 1, 1, False, {"variant": variant}, **kw)
        for name, kw in modes.items()
    }


# ------------------------------------------------------------------------------------ teacher parity


def _neuron_rows(rows: int, group_size: int, head_dim: int) -> list[int]:
    """linear_qkv rows of q channel D-1 of each group's first head ([g q heads, k, v] x hn per group)."""
    per_group = (group_size + 2) * head_dim
    return [grp * per_group + head_dim - 1 for grp in range(rows // per_group)]


def _zero_neuron_rows(model, group_size: int, head_dim: int) -> None:
    """Stock-model equivalent of the pre-RoPE zeroing: zero those rows of linear_qkv."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("linear_qkv.weight"):
                p[_neuron_rows(p.shape[0], group_size, head_dim)] = 0.0


def _zero_query_channel_hook(group_size: int):
    def hook(module, args, kwargs):
        q = args[0].clone()
        q[:, :, ::group_size, -1] = 0.0
        return (q, *args[1:]), kwargs

    return hook


def teacher_parity_job(rank: int, world_size: int, variant: str) -> dict:
    """Eviction off (teacher mode): DMS model vs stock model on the same weights, logits + grads."""
    batches = tiny_gpt.make_batches(1)
    results = {}
    for kind in ("dms", "stock"):
        if kind == "dms":
            cfg = dms_test_config(variant=variant, teacher_mode=True)
            spec = apply_dms(local_layer_spec(), cfg)
        else:
            spec = local_layer_spec()
        model = tiny_gpt.build_tiny_gpt(1, 1, seed=11, layer_spec=spec)
        if kind == "stock" and variant == "neuron":
            _zero_neuron_rows(model, group_size=2, head_dim=tiny_gpt.HIDDEN // 4)
            for layer in model.decoder.layers:
                layer.self_attention.core_attention.register_forward_pre_hook(
                    _zero_query_channel_hook(2), with_kwargs=True
                )
        model.train()
        logits = model(
            input_ids=batches[0]["tokens"], position_ids=batches[0]["position_ids"], attention_mask=None
        )
        logits.float().pow(2).mean().backward()
        grads, neuron_row_grads = {}, []
        for name, p in model.named_parameters():
            if p.grad is not None:
                grads[name] = p.grad.detach().clone()
            elif "adapter" not in name:
                raise AssertionError(f"{name} got no gradient")
            if variant == "neuron" and name.endswith("linear_qkv.weight"):
                # the repurposed channel is dead in the DMS model (multiplied by 0), while the stock
                # model's zeroed row still receives a gradient through RoPE's rotation: compare the
                # other rows, and report the DMS rows' gradient separately
                rows = _neuron_rows(p.shape[0], 2, tiny_gpt.HIDDEN // 4)
                neuron_row_grads.append(grads[name][rows].clone())
                grads[name][rows] = 0.0
        results[kind] = {"logits": logits.detach().clone(), "grads": grads, "neuron_rows": neuron_row_grads}
    return results


def sdpa_vanilla_job(rank: int, world_size: int) -> dict:
    """The vanilla step's fused-attention reference: the stock local spec vs the same spec with
    ``SDPACoreAttention``, same weights, logits + grads (unpacked, causal)."""
    from dms_megatron.megatron.sdpa_attention import with_sdpa_core_attention

    batches = tiny_gpt.make_batches(1)
    results = {}
    for kind, spec in (("stock", local_layer_spec()), ("sdpa", with_sdpa_core_attention(local_layer_spec()))):
        model = tiny_gpt.build_tiny_gpt(1, 1, seed=11, layer_spec=spec)
        model.train()
        logits = model(
            input_ids=batches[0]["tokens"], position_ids=batches[0]["position_ids"], attention_mask=None
        )
        logits.float().pow(2).mean().backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        core = type(model.decoder.layers[0].self_attention.core_attention).__name__
        results[kind] = {"logits": logits.detach().clone(), "grads": grads, "core": core}
    return results


# ------------------------------------------------------------------------------ core vs reference


def core_vs_reference_job(rank: int, world_size: int) -> dict:
    """DMSCoreAttention.forward == core.dms_attention_reference on the same q, k, v and logits."""
    from dms_megatron.core import dms_attention_reference, relaxed_decisions
    from dms_megatron.megatron.attention import DMSCoreAttention
    from dms_megatron.megatron.state import DMSRunState

    tiny_gpt.init_parallel(1, 1, seed=0)
    config = tiny_gpt.tiny_gpt_config(1, 1)
    out = {}
    for variant in ("adapter", "neuron"):
        cfg = dms_test_config(variant=variant, train_noise=False)
        core = DMSCoreAttention(config, 1, None, dms_config=cfg, dms_state=DMSRunState())
        gen = torch.Generator().manual_seed(0)
        s, b, nq, ng, hn = 12, 2, 4, 2, 16
        q, k, v = (torch.randn(s, b, h, hn, generator=gen, dtype=torch.float64) for h in (nq, ng, ng))
        logits = torch.randn(s, b, ng, generator=gen, dtype=torch.float64)
        got = core(q, k, v, None, dms_logits=logits)
        qr = q.clone()
        if variant == "neuron":
            qr[:, :, ::2, -1] = 0
        relaxed = relaxed_decisions(logits.permute(1, 2, 0), None, cfg.tau).relaxed
        ref = dms_attention_reference(
            qr.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3), relaxed, cfg.window
        )
        out[variant] = (got, ref.permute(2, 0, 1, 3).reshape(s, b, nq * hn))
    # packed (THD) input: documents must not see each other and the shift stops at boundaries
    from megatron.core.packed_seq_params import PackedSeqParams

    cfg = dms_test_config(train_noise=False)
    core = DMSCoreAttention(config, 1, None, dms_config=cfg, dms_state=DMSRunState())
    gen = torch.Generator().manual_seed(1)
    t = 10
    q, k, v = (torch.randn(t, h, 8, generator=gen, dtype=torch.float64) for h in (4, 2, 2))
    logits = torch.randn(t, 1, 2, generator=gen, dtype=torch.float64)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    psp = PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=6, max_seqlen_kv=6
    )
    packed = core(q, k, v, None, packed_seq_params=psp, dms_logits=logits)
    pieces = []
    for a, z in ((0, 4), (4, 10)):
        sub = core(
            q[a:z].unsqueeze(1), k[a:z].unsqueeze(1), v[a:z].unsqueeze(1), None, dms_logits=logits[a:z]
        )
        pieces.append(sub.squeeze(1))
    out["thd"] = (packed, torch.cat(pieces))
    return out


# ------------------------------------------------------------------- compression-gradient routing


def compression_only_job(rank: int, world_size: int, pp: int, target: float) -> dict:
    """Loss = compression loss only: its gradient can reach the adapter only through the decision
    channel (layer injectors, and the P2P channel for stage 0 under PP)."""
    cfg = dms_test_config(variant="adapter")
    spec = apply_dms(local_layer_spec(), cfg)
    model = tiny_gpt.build_tiny_gpt(1, pp, seed=7, layer_spec=spec)
    state = attach_dms_pipeline(model)

    def loss_func(model_chunk, batch, output):
        valid = torch.ones_like(batch["loss_mask"], dtype=torch.bool)
        cmp = dms_compression_loss(model_chunk, valid, target, tiny_gpt.NUM_LAYERS, 2)
        return cmp + 0.0 * output.sum(), {"cmp": cmp.detach().clone()}

    def forward_step(data_iterator, model_chunk):
        batch = next(data_iterator)
        out = model_chunk(input_ids=batch["tokens"], position_ids=batch["position_ids"], attention_mask=None)
        return out, partial(loss_func, model_chunk, batch)

    batches = tiny_gpt.make_batches(2)
    out = tiny_gpt.run_schedule(model, forward_step, batches, adjust_p2p_shapes if pp > 1 else None)
    grads = {n: (0.0 if p.grad is None else float(p.grad.abs().sum())) for n, p in model.named_parameters()}
    del state
    return {"grads": grads, "cmp": [float(d["cmp"]) for d in out] if out else []}


# ------------------------------------------------------------------------------- packed sequences


def thd_job(rank: int, world_size: int, variant: str) -> dict:
    """Two documents packed into one THD sequence vs each document run alone (eval, no noise)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cfg = dms_test_config(variant=variant, window=2)
    spec = apply_dms(local_layer_spec(), cfg)
    model = tiny_gpt.build_tiny_gpt(1, 1, seed=5, layer_spec=spec)
    attach_dms_pipeline(model)
    model.eval()
    gen = torch.Generator().manual_seed(3)
    lengths = [6, 10]
    tokens = torch.randint(0, tiny_gpt.VOCAB, (1, sum(lengths)), generator=gen)
    pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    cu = torch.tensor([0, lengths[0], sum(lengths)], dtype=torch.int32)
    psp = PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        max_seqlen_q=max(lengths),
        max_seqlen_kv=max(lengths),
    )
    with torch.no_grad():
        packed = model(input_ids=tokens, position_ids=pos, attention_mask=None, packed_seq_params=psp)
        alone = [
            model(input_ids=tokens[:, a:z], position_ids=pos[:, a:z], attention_mask=None)
            for a, z in ((0, lengths[0]), (lengths[0], sum(lengths)))
        ]
    # megatron's own THD RoPE (a loop over the documents) instead of our per-token rotation
    from dms_megatron.megatron.attention import DMSSelfAttention

    ours = DMSSelfAttention._rotates_packed_itself
    DMSSelfAttention._rotates_packed_itself = lambda self, kwargs: False
    try:
        with torch.no_grad():
            megatron_rope = model(
                input_ids=tokens,
                position_ids=pos,
                attention_mask=None,
                packed_seq_params=PackedSeqParams(
                    **{
                        k: getattr(psp, k)
                        for k in (
                            "qkv_format",
                            "cu_seqlens_q",
                            "cu_seqlens_kv",
                            "max_seqlen_q",
                            "max_seqlen_kv",
                        )
                    }
                ),
            )
    finally:
        DMSSelfAttention._rotates_packed_itself = ours
    return {"packed": packed, "alone": torch.cat(alone, dim=1), "megatron_rope": megatron_rope}


# ------------------------------------------------------------------------------ data-parallel stats


def dp_stats_job(rank: int, world_size: int) -> dict:
    """DP=2: replicas draw different noise (dp_rank is a noise coordinate); the reduced per-[layer, head]
    rate is the pooled rate of both replicas."""
    cfg = dms_test_config(variant="adapter")
    spec = apply_dms(local_layer_spec(), cfg)
    model = tiny_gpt.build_tiny_gpt(1, 1, seed=7, layer_spec=spec)
    state = attach_dms_pipeline(model)
    run_dms_schedule(model, tiny_gpt.make_batches(NUM_MICROBATCHES), state, 2)
    local = {layer: (s.clone(), c.clone()) for layer, (s, c) in state.stats.items()}
    reduced = reduce_decision_stats(state, tiny_gpt.NUM_LAYERS, 2)
    return {"local": local, "reduced": reduced, "dp_rank": parallel_state.get_data_parallel_rank()}


# ------------------------------------------------------------------ fused input norm (TE-style spec)


class NormFusedQKV(torch.nn.Module):
    """Test stand-in for TE's LayerNormColumnParallelLinear: RMSNorm inside linear_qkv, so the
    attention receives the pre-norm residual (as with the Transformer Engine spec)."""

    def __init__(self, input_size: int, output_size: int, *, config, **kwargs: Any) -> None:
        super().__init__()
        from megatron.core.tensor_parallel import ColumnParallelLinear

        kwargs.pop("name", None)
        self.linear = ColumnParallelLinear(input_size, output_size, config=config, **kwargs)
        self.layer_norm_weight = torch.nn.Parameter(torch.ones(input_size))
        self.eps = config.layernorm_epsilon

    def forward(self, x: torch.Tensor):
        return self.linear(torch.nn.functional.rms_norm(x, (x.shape[-1],), self.layer_norm_weight, self.eps))


def _local_name(fused_name: str) -> str:
    return fused_name.replace(
        "self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight"
    ).replace("linear_qkv.linear.", "linear_qkv.")


def fused_norm_job(rank: int, world_size: int, tp: int) -> dict:
    """Adapter DMS on the local spec vs on a fused-input-norm spec with the same weights."""
    from megatron.core.transformer.identity_op import IdentityOp

    cfg = dms_test_config(variant="adapter")
    local = local_layer_spec()
    fused = local_layer_spec()
    fused.submodules.input_layernorm = IdentityOp
    fused.submodules.self_attention.submodules.linear_qkv = NormFusedQKV
    out = {}
    for kind, spec in (("local", local), ("fused", fused)):
        model = tiny_gpt.build_tiny_gpt(tp, 1, seed=7, layer_spec=apply_dms(spec, cfg))
        if kind == "fused":  # same weights as the local model; the input norm now lives in linear_qkv
            with torch.no_grad():
                for n, p in model.named_parameters():
                    p.copy_(out["local"]["params"][_local_name(n)])
        state = attach_dms_pipeline(model)
        losses = run_dms_schedule(model, tiny_gpt.make_batches(NUM_MICROBATCHES), state, 2)
        names = {n: (n if kind == "local" else _local_name(n)) for n, _ in model.named_parameters()}
        grads = {names[n]: p.grad.detach().clone() for n, p in model.named_parameters()}
        params = {names[n]: p.detach().clone() for n, p in model.named_parameters()}
        residual_is_input = [layer.self_attention.residual_is_input for layer in model.decoder.layers]
        out[kind] = {
            "losses": losses,
            "grads": grads,
            "params": params,
            "residual_is_input": residual_is_input,
        }
    return out


# ------------------------------------------------------------------------------ neuron channel fade


def neuron_fade_job(rank: int, world_size: int, tp: int) -> dict:
    """The neuron variant's start: with the channel fully kept (``channel_keep=1``) the training-mode DMS
    model computes the stock model's logits; ``zero_repurposed_q_rows`` zeroes exactly the repurposed
    rows, after which every eviction logit is ``-offset``."""
    from dms_megatron.megatron import dms_run_state, zero_repurposed_q_rows

    batches = tiny_gpt.make_batches(1)
    cfg = dms_test_config(variant="neuron", logit_scale=100.0, logit_offset=5.0, tau=0.1, train_noise=False)
    spec = apply_dms(local_layer_spec(), cfg)
    dms = tiny_gpt.build_tiny_gpt(tp, 1, seed=11, layer_spec=spec)
    stock = tiny_gpt.build_tiny_gpt(tp, 1, seed=11, layer_spec=local_layer_spec())
    state = dms_run_state(dms)
    seen: list[torch.Tensor] = []
    for layer in dms.decoder.layers:
        layer.self_attention.core_attention.register_forward_pre_hook(
            lambda m, args: seen.append(m.pending_logits.detach().clone())
        )

    def run(model):
        model.train()
        with torch.no_grad():
            return model(
                input_ids=batches[0]["tokens"], position_ids=batches[0]["position_ids"], attention_mask=None
            )

    out = {"stock": run(stock)}
    state.channel_keep = 1.0
    out["kept"] = run(dms)
    out["kept_logits"] = torch.stack(seen)
    state.channel_keep = 0.0
    seen.clear()
    out["removed"] = run(dms)
    out["removed_logits_min"] = torch.stack(seen).abs().min()
    state.teacher_pass = True  # channel removed, eviction off
    out["removed_no_eviction"] = run(dms)
    state.teacher_pass = False
    before = {n: p.detach().clone() for n, p in dms.named_parameters()}
    out["rows"] = zero_repurposed_q_rows(dms)
    changed = {}
    for name, p in dms.named_parameters():
        diff = (p.detach() != before[name]).any(dim=-1) if p.dim() > 1 else p.detach() != before[name]
        if diff.any():
            changed[name] = diff.nonzero().flatten().tolist()
    out["changed"] = changed
    out["expected_rows"] = {
        n: _neuron_rows(p.shape[0], 2, tiny_gpt.HIDDEN // 4)
        for n, p in dms.named_parameters()
        if n.endswith("linear_qkv.weight")
    }
    seen.clear()
    out["zeroed"] = run(dms)
    out["zeroed_logits"] = torch.stack(seen)
    return out
