"""DMS attention modules for megatron-core's layer specs.

``DMSSelfAttention`` (a ``SelfAttention`` subclass) computes the eviction logits where the
algorithm needs them: the neuron variant reads q channel D-1 of each KV group's first head after
q-layernorm and before RoPE (and zeroes it); the adapter variant reads the layer's pre-norm
residual. The logits reach ``DMSCoreAttention`` (the ``core_attention`` slot) either directly
(``pending_logits``) or, under selective recompute of the core attention, as a checkpoint input
through megatron's ``core_attention_extra_kwargs`` so their gradient survives recompute.

Packed (THD) micro-batches with megatron's unfused RoPE: ``DMSSelfAttention`` rotates q and k itself,
once per layer, with per-token frequencies (positions restart at every document, as in megatron's THD
path), instead of megatron's THD RoPE, which loops over the documents (a host sync and ~10 small
kernels per document, layer and tensor). Fused RoPE (Transformer Engine) and context parallelism keep
megatron's path. ``tests/megatron/test_dms_megatron.py`` holds the two paths equal.

Shape legend (Megatron layout, per TP rank): hidden ``[s(/tp), b, h]``; query ``[s, b, np, hn]``;
key/value ``[s, b, ng, hn]``; THD: ``[t, np|ng, hn]``; logits ``[s, b, ng]`` (THD ``[t, 1, ng]``).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_layer import TransformerLayer

from dms_megatron.config import DMSConfig
from dms_megatron.core.dms_rules import evicts
from dms_megatron.core.gating import (
    EvictionAdapter,
    fade_neuron,
    neuron_evict_logits,
    relaxed_decisions,
)
from dms_megatron.core.noise import NoiseKey
from dms_megatron.core.shift import doc_ids_from_cu_seqlens
from dms_megatron.kernels import dms_attention, resolve_backend
from dms_megatron.kernels.bias import same_next_mask
from dms_megatron.kernels.noise import logistic_noise, uniform_from_hash
from dms_megatron.kernels.triton_device import triton_runs_on
from dms_megatron.megatron.state import DecisionAccumulator, DMSRunState

log = logging.getLogger(__name__)


def validate_parallel_layout(config: Any, tp_size: int) -> None:
    """Build-time checks for layouts DMS does not support (clear errors, not silent garbage)."""
    if getattr(config, "context_parallel_size", 1) > 1:
        raise NotImplementedError(
            "DMS attention does not support context parallelism yet (context_parallel_size="
            f"{config.context_parallel_size}); set context_parallel_size=1"
        )
    if getattr(config, "fused_single_qkv_rope", False):
        raise ValueError("DMS needs the separate q tensor: set TransformerConfig.fused_single_qkv_rope=False")
    ng = config.num_query_groups or config.num_attention_heads
    if ng % tp_size != 0:
        raise ValueError(
            f"DMS needs whole KV heads per tensor-parallel rank: num_query_groups={ng} is not divisible "
            f"by tensor_model_parallel_size={tp_size} (KV-head replication is not supported)"
        )


class DMSSelfAttention(SelfAttention):
    """Self-attention that produces DMS eviction logits for its core attention."""

    def __init__(
        self,
        config: Any,
        submodules: Any,
        layer_number: int,
        *args: Any,
        dms_config: DMSConfig,
        dms_state: DMSRunState,
        residual_is_input: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(config, submodules, layer_number, *args, **kwargs)
        self.dms_config, self.dms_state = dms_config, dms_state
        tp = self.pg_collection.tp
        self.tp_size, self.tp_rank = tp.size(), tp.rank()
        validate_parallel_layout(self.config, self.tp_size)
        self.num_kv_heads = self.config.num_query_groups or self.config.num_attention_heads
        # With the TE spec the input norm is fused into linear_qkv, so forward() sees the pre-norm
        # residual; with the local spec DMSTransformerLayer hands it over in ``dms_residual``.
        self.residual_is_input = residual_is_input
        self.dms_residual: torch.Tensor | None = None
        self._token_freqs: tuple[torch.Tensor, torch.Tensor] | None = None  # (q, k) during forward
        self._rotary_tables: dict | None = None  # the micro-batch's fused-rotary tables, during forward
        self.adapter: EvictionAdapter | None = None
        if dms_config.variant == "adapter":
            self.adapter = EvictionAdapter(
                self.config.hidden_size,
                self.num_kv_heads,
                scale=dms_config.logit_scale,
                offset=dms_config.logit_offset,
                eps=dms_config.adapter_eps,
                bias=dms_config.adapter_bias,
                dtype=self.config.params_dtype,
            )
            for p in self.adapter.parameters():
                # replicated over TP; under SP each rank sees a sequence shard, so the grads are
                # partial sums that finalize_model_grads all-reduces over TP (params tagged so)
                p.sequence_parallel = self.config.sequence_parallel

    # -- logits -------------------------------------------------------------------------------
    def _adapter_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states if self.residual_is_input else self.dms_residual
        if x is None:
            raise RuntimeError("adapter variant needs the pre-norm residual; build the spec with apply_dms")
        logits = self.adapter(x)  # [s(/tp), b, Hkv] (all KV heads)
        if self.tp_size == 1:
            return logits
        tp = self.pg_collection.tp
        if self.config.sequence_parallel:
            # tiny [s/tp, b, Hkv] gather instead of gathering the hidden states; backward
            # reduce-scatters, so each rank's head slice gradient reaches the right sequence shard
            logits = tensor_parallel.gather_from_sequence_parallel_region(logits, group=tp)
            ng = self.num_query_groups_per_partition
            return logits[..., self.tp_rank * ng : (self.tp_rank + 1) * ng]
        # full sequence on every rank: keep this rank's heads; backward all-gathers so every rank
        # holds the full (identical) adapter gradient, as for any replicated parameter
        return tensor_parallel.scatter_to_tensor_model_parallel_region(logits, group=tp)

    def _per_layer(self, logits: torch.Tensor) -> torch.Tensor:
        """Broadcast global KV head 0's logit to this rank's heads."""
        if self.tp_size > 1:
            # head 0 lives on rank 0; backward reduce-scatters so every rank's use of it counts
            logits = tensor_parallel.all_gather_last_dim_from_tensor_parallel_region(
                logits.contiguous(), group=self.pg_collection.tp
            )
        return logits[..., :1].expand(*logits.shape[:-1], self.num_query_groups_per_partition)

    # -- RoPE of packed sequences ---------------------------------------------------------------
    def _rotates_packed_itself(self, kwargs: dict[str, Any]) -> bool:
        packed = kwargs.get("packed_seq_params")
        return (
            kwargs.get("rotary_pos_emb") is not None
            and packed is not None
            and getattr(packed, "qkv_format", None) == "thd"
            and not self.config.apply_rope_fusion
            and self.pg_collection.cp.size() == 1
            and kwargs.get("inference_context") is None
            and kwargs.get("inference_params") is None
        )

    def forward(self, *args: Any, **kwargs: Any):  # type: ignore[override]
        if not self._rotates_packed_itself(kwargs):
            return super().forward(*args, **kwargs)
        rope = kwargs.pop("rotary_pos_emb")
        q_freqs, k_freqs = rope if isinstance(rope, tuple) else (rope, rope)
        hidden = args[0] if args else kwargs["hidden_states"]
        total = hidden.shape[0] * hidden.shape[1] * (self.tp_size if self.config.sequence_parallel else 1)
        packed = kwargs["packed_seq_params"]
        cached = getattr(packed, "_dms_token_freqs", None)  # every layer of a model shares its tables
        if cached is None or cached[0] is not q_freqs or cached[1] is not k_freqs:
            positions = packed_positions(packed, total)
            q_tok = q_freqs[positions]  # [t, 1, 1, d]
            k_tok = q_tok if k_freqs is q_freqs else k_freqs[positions]
            cached = (q_freqs, k_freqs, (q_tok, k_tok), {})  # {}: fused-rotary tables by dtype
            packed._dms_token_freqs = cached
        self._token_freqs, self._rotary_tables = cached[2], cached[3]
        try:
            return super().forward(*args, rotary_pos_emb=None, **kwargs)
        finally:
            self._token_freqs = self._rotary_tables = None

    def _fuses_rotary(self, query: torch.Tensor, key: torch.Tensor) -> bool:
        """RoPE of q and k in one Triton launch each way (``kernels.fused_elementwise.rotary_with_grad``)
        where Triton runs, for megatron's plain rotate-half RoPE over the whole head of one packed row."""
        q_freqs, k_freqs = self._token_freqs  # type: ignore[misc]
        d = query.shape[-1]
        return (
            triton_runs_on(query.device)
            and q_freqs is k_freqs
            and not self.config.rotary_interleaved
            and not self.config.multi_latent_attention
            and q_freqs.shape[-1] == d == key.shape[-1]
            and d >= 2
            and d & (d - 1) == 0
            and query.dim() == key.dim() == 4
            and query.shape[1] == key.shape[1] == 1
            and query.dtype == key.dtype
        )

    def _rotate(self, query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q_freqs, k_freqs = self._token_freqs  # type: ignore[misc]
        if self._fuses_rotary(query, key):
            from dms_megatron.kernels.fused_elementwise import rotary_tables, rotary_with_grad

            mscale = self._yarn_concentration_factor
            tables = self._rotary_tables.get((query.dtype, mscale))  # type: ignore[union-attr]
            if tables is None:  # once per micro-batch, model and dtype: every layer shares them
                tables = rotary_tables(q_freqs, query.dtype, mscale)
                self._rotary_tables[(query.dtype, mscale)] = tables  # type: ignore[index]
            q3 = query.reshape(query.shape[0], query.shape[2], query.shape[3])
            k3 = key.reshape(key.shape[0], key.shape[2], key.shape[3])
            q_out, k_out = rotary_with_grad(q3, k3, *tables)
            return q_out.view(query.shape), k_out.view(key.shape)
        common = {
            "config": self.config,
            "mscale": self._yarn_concentration_factor,
            "cp_group": self.pg_collection.cp,
        }
        return apply_rotary_pos_emb(query, q_freqs, **common), apply_rotary_pos_emb(key, k_freqs, **common)

    def get_query_key_value_tensors(self, hidden_states, key_value_states=None, *args, **kwargs):
        out = super().get_query_key_value_tensors(hidden_states, key_value_states, *args, **kwargs)
        query = out[0]
        ng = self.num_query_groups_per_partition
        if self.dms_config.variant == "neuron":
            logits = neuron_evict_logits(
                query, ng, self.dms_config.logit_scale, self.dms_config.logit_offset, head_axis=-2
            )
            keep = self.dms_state.channel_keep if self.training else 0.0
            if keep > 0.0:  # fading the channel out: eviction off (the adapter's start, noise only)
                logits = torch.full_like(logits, -self.dms_config.logit_offset)
            query = fade_neuron(query, ng, keep)  # before RoPE (the core zeroes again after RoPE)
            out = (query, *out[1:])
        else:
            if self.adapter is None:
                raise RuntimeError("adapter variant without an adapter")
            if self.dms_config.decisions_per == "layer":
                x = hidden_states if self.residual_is_input else self.dms_residual
                head0 = self.adapter(x)[..., :1]
                if self.tp_size > 1:
                    tp = self.pg_collection.tp
                    if self.config.sequence_parallel:  # backward reduce-scatters every rank's use
                        head0 = tensor_parallel.gather_from_sequence_parallel_region(head0, group=tp)
                    else:  # every rank uses head 0: backward all-reduces, so replicas get the full grad
                        head0 = tensor_parallel.copy_to_tensor_model_parallel_region(head0, group=tp)
                logits = head0.expand(*head0.shape[:-1], ng)
            else:
                logits = self._adapter_logits(hidden_states)
        if self.dms_config.decisions_per == "layer" and self.dms_config.variant == "neuron":
            logits = self._per_layer(logits)
        self.core_attention.pending_logits = logits
        if self._token_freqs is not None:  # RoPE last, where megatron's forward would apply it
            out = (*self._rotate(out[0], out[1]), *out[2:])
        return out

    def _checkpointed_attention_forward(self, query, key, value, attention_mask, *args, **kwargs):
        # selective recompute: pass the logits as a checkpoint input so their gradient survives
        extra = dict(kwargs.pop("core_attention_extra_kwargs", None) or {})
        extra["dms_logits"] = self.core_attention.pending_logits
        self.core_attention.pending_logits = None
        return super()._checkpointed_attention_forward(
            query, key, value, attention_mask, *args, core_attention_extra_kwargs=extra, **kwargs
        )


def _cu_seqlens(packed_seq_params: Any) -> torch.Tensor:
    cu = packed_seq_params.cu_seqlens_q_padded
    return packed_seq_params.cu_seqlens_q if cu is None else cu


def packed_doc_ids(packed_seq_params: Any, total_len: int) -> torch.Tensor:
    """Per-token document ids ``[t]`` of a THD micro-batch: the ones ``pack_thd`` attached (built on
    the host with the batch, so no device sync), else derived from (and checking) ``cu_seqlens``; kept
    on ``packed_seq_params`` so that every layer reuses them."""
    doc_ids = getattr(packed_seq_params, "_dms_doc_ids", None)
    if doc_ids is None or doc_ids.shape[-1] != total_len:
        doc_ids = doc_ids_from_cu_seqlens(_cu_seqlens(packed_seq_params).to(torch.long), total_len=total_len)
        packed_seq_params._dms_doc_ids = doc_ids
    return doc_ids


def packed_positions(packed_seq_params: Any, total_len: int) -> torch.Tensor:
    """Per-token position inside its document ``[t]`` (long) of a THD micro-batch (no host sync once
    the document ids exist), kept on ``packed_seq_params`` for the other layers."""
    pos = getattr(packed_seq_params, "_dms_positions", None)
    if pos is None or pos.shape[-1] != total_len:
        doc_ids = packed_doc_ids(packed_seq_params, total_len).reshape(-1)
        cu = _cu_seqlens(packed_seq_params).to(device=doc_ids.device, dtype=torch.long)
        pos = torch.arange(total_len, device=doc_ids.device) - cu[doc_ids]
        packed_seq_params._dms_positions = pos
    return pos


@torch.no_grad()
def zero_repurposed_q_rows(model: torch.nn.Module) -> int:
    """Zero the q-projection rows (and biases) that produce the neuron variant's repurposed channel
    (D-1 of each KV group's first head), so every eviction logit reads ``-logit_offset``. Megatron's
    ``linear_qkv`` interleaves rows per query group: ``[g query heads, key, value] x D``. Returns the
    number of rows zeroed on this rank. Call only once the channel no longer feeds attention (after the
    fade), then refresh the optimizer's main params (``optimizer.reload_model_params()``)."""
    rows = 0
    for module in model.modules():
        if not isinstance(module, DMSSelfAttention) or module.dms_config.variant != "neuron":
            continue
        ng = module.num_query_groups_per_partition
        g = module.num_attention_heads_per_partition // ng
        d = module.hidden_size_per_attention_head
        idx = torch.arange(ng) * (g + 2) * d + d - 1
        for name in ("weight", "bias"):
            param = getattr(module.linear_qkv, name, None)
            if isinstance(param, torch.Tensor) and param.numel():
                param.data[idx.to(param.device)] = 0
        rows += ng
    return rows


class DMSCoreAttention(MegatronModule):
    """Delayed-eviction core attention: noise, relaxed decisions, the attention backend, and the
    decision bookkeeping (compression-loss channel, per-head statistics).

    Masking is always causal (plus document boundaries from ``packed_seq_params``); megatron's
    ``attention_mask`` argument, a causal mask for GPT training, is not read. In training mode the
    decisions are the noisy relaxation; in eval mode they are hard (logit > 0 evicts once the key
    leaves the window), i.e. what a compressed KV cache computes."""

    def __init__(
        self,
        config: Any,
        layer_number: int,
        attn_mask_type: Any,
        attention_type: str = "self",
        cp_comm_type: str | None = None,
        softmax_scale: float | None = None,
        pg_collection: Any = None,
        *,
        dms_config: DMSConfig,
        dms_state: DMSRunState,
        **_: Any,
    ) -> None:
        super().__init__(config=config)
        self.layer_number, self.attn_mask_type = layer_number, attn_mask_type
        self.dms_config, self.dms_state = dms_config, dms_state
        self.softmax_scale = softmax_scale
        if pg_collection is None:
            from megatron.core.process_groups_config import ProcessGroupCollection

            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        self.tp_group = pg_collection.tp
        self.pending_logits: torch.Tensor | None = None
        self.dms_accumulator: DecisionAccumulator | None = None  # set by attach_dms_pipeline

    def _noise(
        self, B: int, H: int, T: int, device: torch.device, uniforms: bool = False
    ) -> torch.Tensor | None:
        """The layer's logistic noise ``[B, H, T]`` (or, with ``uniforms``, the uniforms it is drawn from);
        None without training noise."""
        if not (self.training and self.dms_config.train_noise):
            return None
        per_layer = self.dms_config.decisions_per == "layer"
        key = NoiseKey(
            seed=self.dms_config.seed,
            step=self.dms_state.step,
            micro_batch=self.dms_state.micro_batch,
            dp_rank=parallel_state.get_data_parallel_rank()
            if parallel_state.model_parallel_is_initialized()
            else 0,
            layer=self.layer_number - 1,
        )
        head_offset = 0 if per_layer else self.tp_group.rank() * H
        draw = uniform_from_hash if uniforms else logistic_noise
        n = draw(key, (B, 1 if per_layer else H, T), head_offset=head_offset, device=device)
        return n.expand(B, H, T) if per_layer else n

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: Any = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: Any = None,
        dms_logits: torch.Tensor | None = None,
        **_: Any,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise NotImplementedError("DMS attention does not take an additive attention_bias")
        logits = dms_logits if dms_logits is not None else self.pending_logits
        self.pending_logits = None
        ng = key.shape[-2]
        if self.dms_config.variant == "neuron":
            keep = self.dms_state.channel_keep if self.training else 0.0
            query = fade_neuron(query, ng, keep)  # after RoPE: RoPE rotated channel D/2-1 into D-1
        thd = packed_seq_params is not None and getattr(packed_seq_params, "qkv_format", None) == "thd"
        doc_ids = None
        if thd:  # [t, heads, hn] -> [1, heads, t, hn]
            q, k, v = (x.unsqueeze(0).transpose(1, 2) for x in (query, key, value))
            doc_ids = packed_doc_ids(packed_seq_params, q.shape[2])  # once per micro-batch, not per layer
            logits_bht = None if logits is None else logits.reshape(q.shape[2], ng).t().unsqueeze(0)
        else:  # [s, b, heads, hn] -> [b, heads, s, hn]
            q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
            logits_bht = None if logits is None else logits.permute(1, 2, 0)
        B, _, T, _ = q.shape
        relaxed = log_keep = None
        if self.dms_config.teacher_mode or self.dms_state.teacher_pass or logits_bht is None:
            pass
        elif self.training and self._fuses_decisions(q):  # noise, decisions, shifted bias: one launch
            from dms_megatron.kernels.decisions import fused_decisions

            uniforms = self._noise(B, ng, T, q.device, uniforms=True)
            same = None if doc_ids is None else same_next_mask(doc_ids, B, T, q.device)
            decisions, log_keep = fused_decisions(
                logits_bht, None, self.dms_config.tau, same, uniforms=uniforms
            )
        elif self.training:
            noise = self._noise(B, ng, T, q.device)
            decisions, relaxed = relaxed_decisions(logits_bht, noise, self.dms_config.tau)
        else:  # inference semantics (eval mode): hard decisions, no noise, no temperature
            hard = evicts(logits_bht)
            decisions = hard.float()
            relaxed = torch.where(hard, float("inf"), float("-inf"))
        out = dms_attention(
            q,
            k,
            v,
            relaxed,
            self.dms_config.window,
            self.softmax_scale,
            doc_ids,
            backend=self.dms_config.attention_backend,
            log_keep=log_keep,
        )
        # [b, np, s, hn] -> [s, b, np*hn]   (THD: [t, np*hn], reshaped by Attention.forward)
        out = out.permute(2, 0, 1, 3).reshape(T, B, -1)
        if thd:
            out = out.squeeze(1)
        if relaxed is not None or log_keep is not None:
            out = self._account(out, decisions, thd)
        return out

    def _fuses_decisions(self, q: torch.Tensor) -> bool:
        """Training decisions through ``kernels.decisions`` (with the kernel attention backends, where
        Triton runs) instead of the core's torch ops (the reference backend, CPU)."""
        backend = resolve_backend(self.dms_config.attention_backend, q)
        return backend != "reference" and triton_runs_on(q.device)

    def _account(self, out: torch.Tensor, decisions: torch.Tensor, thd: bool) -> torch.Tensor:
        """Record statistics and wire this layer's decisions into the compression-loss channel."""
        acc = self.dms_accumulator
        if acc is not None and acc.open:
            self.dms_state.record(
                self.layer_number - 1,
                decisions.detach().sum(dim=(0, 2)),
                torch.full(
                    (decisions.shape[1],),
                    decisions.shape[0] * decisions.shape[2],
                    dtype=torch.float32,
                    device=decisions.device,
                ),
            )
        if acc is None or self.dms_config.compression_loss != "global":
            return out
        count = decisions.sum(dim=1).t()  # [s, b]: decisions summed over this rank's KV heads
        if self.tp_group.size() > 1:
            if self.config.sequence_parallel:
                count = tensor_parallel.reduce_scatter_to_sequence_parallel_region(count, group=self.tp_group)
            else:
                count = tensor_parallel.reduce_from_tensor_model_parallel_region(count, group=self.tp_group)
        return acc.add(out, count)


class DMSTransformerLayer(TransformerLayer):
    """Hands the pre-norm residual to the DMS adapter (local spec: the input norm is a module of
    the layer, so ``SelfAttention.forward`` only sees normalised states)."""

    def _forward_attention(self, hidden_states, *args, **kwargs):
        self.self_attention.dms_residual = hidden_states
        try:
            return super()._forward_attention(hidden_states, *args, **kwargs)
        finally:
            self.self_attention.dms_residual = None
