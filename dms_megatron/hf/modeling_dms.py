"""Dynamic Memory Sparsification (DMS) for transformers: remote code for exported DMS checkpoints.

This file is copied verbatim next to the weights of an exported checkpoint (``launch/convert.py export``),
and ``config.json`` gets ``auto_map: {"AutoModelForCausalLM": "modeling_dms.DMS<Family>ForCausalLM"}``.
It imports only torch and transformers (5.x), so it runs where dms_megatron is not installed::

    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
    out = model.generate(ids, max_new_tokens=64, do_sample=False)

What it does (the math of ``dms_megatron.inference.model``, the project's reference):

* Eviction logit per token and KV head. ``neuron`` variant: the last channel of the first query head of
  each KV group (after q_norm, before RoPE) ``* logit_scale - logit_offset``; that channel is zeroed in q,
  before and after RoPE (RoPE rotates channel D/2-1 into D-1). ``adapter`` variant:
  ``dms_proj_alpha(rmsnorm(h)) * logit_scale - logit_offset`` on the layer's pre-norm residual ``h``
  (rmsnorm eps 1e-6). ``decisions_per: layer`` uses KV head 0's logit for every head.
* Decision of token t (logit > 0) evicts token t-1 of the same (layer, KV head) stream. An evicted token
  stays visible while its age (query position - key position) is <= ``window``; then it is removed.
  Inside a forward chunk (prefill, decode, a later turn) key k is visible to query i iff k <= i and
  (i - k <= window or token k is not evicted).
* ``DMSCache`` holds per layer, per (batch row, KV head) only the tokens still needed: the ``window + 1``
  most recent and the older ones not evicted. Rows and heads hold different counts; the tensors of one
  layer are padded to the largest count (slots with position -1 are empty) and compacted after every
  forward, so memory follows the held tokens. ``tokens_seen()``, ``tokens_held()``, ``effective_cr()``.

Padding: left-padded (and any other) batches are supported. Tokens whose ``attention_mask`` is 0 are never
stored and take no position; the positions of the other tokens count only the real tokens of their row
(as ``generate`` computes them). ``position_ids`` that disagree with this raise a ValueError.

Not supported with DMS (clear errors): a non-DMS cache object, static / quantized / offloaded caches,
``cache.crop`` (assisted decoding), 4D attention masks, sliding-window layers, ``output_attentions`` and
``output_hidden_states``. Calling the inner ``model.model`` directly raises: use the ``*ForCausalLM``.
Without a ``dms`` block in the config the classes are exactly the transformers ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.modeling_outputs import CausalLMOutputWithPast

ADAPTER_EPS = 1e-6  # the adapter's rmsnorm eps (training default; not part of the exported dms block)
SCORE_BUDGET = 1 << 24  # score elements per attention block (queries are processed in blocks)


def dms_settings(config) -> dict | None:
    """The validated ``dms`` block of a config, or None when the model has no DMS."""
    dms = getattr(config, "dms", None)
    if not dms:
        return None
    variant = dms.get("variant")
    if variant not in ("neuron", "adapter"):
        raise ValueError(f"config dms.variant must be 'neuron' or 'adapter', got {variant!r}")
    per = dms.get("decisions_per", "head")
    if per not in ("head", "layer"):
        raise ValueError(f"config dms.decisions_per must be 'head' or 'layer', got {per!r}")
    window = dms.get("window")
    if not isinstance(window, int) or isinstance(window, bool) or window < 0:
        raise ValueError(f"config dms.window must be an int >= 0, got {window!r}")
    layer_types = getattr(config, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        raise ValueError(f"DMS supports full-attention layers only, config has layer_types {layer_types}")
    if config.num_attention_heads % config.num_key_value_heads:
        raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
    return {
        "variant": variant,
        "per_layer": per == "layer",
        "window": window,
        "scale": float(dms["logit_scale"]),
        "offset": float(dms["logit_offset"]),
        "adapter_eps": float(dms.get("adapter_eps", ADAPTER_EPS)),
    }


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], -1)


class DMSCacheLayer(CacheLayerMixin):
    """One layer of a ``DMSCache``. ``keys [B, Hkv, N, D]``, ``values [B, Hkv, N, Dv]``, ``positions
    [B, Hkv, N]`` (-1: empty slot), ``flagged [B, Hkv, N]`` (evicted by its successor's decision, still
    inside the window), ``seen [B]`` real tokens of each row so far, ``columns`` input columns so far
    (pads included; what ``generate`` calls the sequence length)."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, window: int) -> None:
        super().__init__()
        self.window = window
        self.positions: torch.Tensor | None = None
        self.flagged: torch.Tensor | None = None
        self.seen: torch.Tensor | None = None
        self.columns = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h = key_states.shape[:2]
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states.new_zeros(b, h, 0, key_states.shape[-1])
        self.values = value_states.new_zeros(b, h, 0, value_states.shape[-1])
        self.positions = torch.full((b, h, 0), -1, dtype=torch.long, device=self.device)
        self.flagged = torch.zeros(b, h, 0, dtype=torch.bool, device=self.device)
        self.seen = torch.zeros(b, dtype=torch.long, device=self.device)
        self.columns = 0
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        raise NotImplementedError("a DMS cache layer is written by DMSAttention (attend), not by update()")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.columns + query_length, 0

    def get_seq_length(self) -> int:
        return self.columns

    def get_max_length(self) -> int:
        return -1

    @property
    def batch_size(self) -> int:
        return self.keys.shape[0] if self.is_initialized else -1

    def held(self) -> torch.Tensor:
        """Tokens held per ``[B, Hkv]``."""
        return (self.positions >= 0).sum(-1)

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        evict: torch.Tensor,
        pos: torch.Tensor,
        valid: torch.Tensor,
        scaling: float,
    ) -> torch.Tensor:
        """Attention of a chunk of ``n`` new tokens against the held ones and each other, then commit.
        ``q [B, Hq, n, D]``, ``k [B, Hkv, n, D]`` (RoPE applied), ``v [B, Hkv, n, Dv]``, ``evict [B, Hkv, n]``
        (decision of each new token about its predecessor), ``pos [B, n]`` positions (-1 for pads),
        ``valid [B, n]`` (False for pads). Returns ``[B, Hq, n, Dv]``."""
        b, hkv, n, _ = k.shape
        if not self.is_initialized:
            self.lazy_initialization(k[:, :, :0], v[:, :, :0])
        if self.keys.shape[0] != b or self.keys.shape[1] != hkv:
            raise ValueError(f"DMS cache holds batch {self.keys.shape[0]}, got a chunk of batch {b}")
        held = self.positions.shape[2]
        # decision of each new token, indexed by its offset from the row's first new position (pads -> n)
        evict = evict & valid[:, None, :]
        offset = torch.where(valid, pos - self.seen[:, None], n)[:, None, :].expand(b, hkv, n)
        by_offset = torch.zeros(b, hkv, n + 1, dtype=torch.bool, device=k.device)
        by_offset.scatter_(2, offset.contiguous(), evict)
        new_pos = torch.where(valid, pos, -1)[:, None, :].expand(b, hkv, n)
        kpos = torch.cat([self.positions, new_pos], 2)  # [B, Hkv, K]
        nxt = kpos + 1 - self.seen[:, None, None]  # offset of each key's successor in this chunk
        hit = by_offset.gather(2, nxt.clamp(0, n)) & (kpos >= 0) & (nxt >= 0)
        flagged = torch.cat([self.flagged, torch.zeros_like(new_pos, dtype=torch.bool)], 2) | hit
        keys = torch.cat([self.keys, k.to(self.keys.dtype)], 2)
        values = torch.cat([self.values, v.to(self.values.dtype)], 2)
        out = self._attention(q, keys, values, kpos, flagged, pos, valid, held, scaling)
        # commit: pads are never stored; a flagged token p is removed once the row's last token is
        # p + window + 1 or later (no later query can see it), as the reference frees it then
        self.seen = self.seen + valid.sum(1)
        gone = flagged & (kpos <= (self.seen - 2 - self.window)[:, None, None])
        self._store(keys, values, kpos, flagged, (kpos >= 0) & ~gone)
        self.columns += n
        return out

    def _attention(self, q, keys, values, kpos, evicted, qpos, qvalid, held, scaling) -> torch.Tensor:
        b, hq, n, d = q.shape
        hkv, total = keys.shape[1], keys.shape[2]
        g = hq // hkv
        qg = q.view(b, hkv, g, n, d)
        block = max(1, SCORE_BUDGET // max(1, b * hq * total))
        key_index = torch.arange(total, device=q.device)
        outs = []
        for s in range(0, n, block):
            e = min(n, s + block)
            c = e - s
            age = qpos[:, None, s:e, None] - kpos[:, :, None, :]  # [B, Hkv, c, K]
            recent_or_kept = (age <= self.window) | ~evicted[:, :, None, :]
            visible = (kpos >= 0)[:, :, None, :] & (age >= 0) & recent_or_kept
            pad = ~qvalid[:, s:e]
            if bool(pad.any()):  # a pad query sees itself only (its output is discarded; no empty row)
                own = key_index[None, :] == (held + torch.arange(s, e, device=q.device))[:, None]  # [c, K]
                visible = visible | (own[None, None] & pad[:, None, :, None])
            mask = visible[:, :, None].expand(b, hkv, g, c, total).reshape(b, hkv, g * c, total)
            qc = qg[:, :, :, s:e].reshape(b, hkv, g * c, d)
            o = F.scaled_dot_product_attention(
                qc, keys.to(q.dtype), values.to(q.dtype), attn_mask=mask, scale=scaling
            )
            outs.append(o.view(b, hkv, g, c, -1))
        return torch.cat(outs, 3).reshape(b, hq, n, -1)

    def _store(self, keys, values, kpos, flagged, keep) -> None:
        if not bool(keep.all()):  # compact: held tokens first (position order kept), then trim
            counts = keep.sum(-1)
            length = int(counts.max()) if counts.numel() else 0
            order = torch.sort((~keep).to(torch.int32), dim=-1, stable=True).indices[..., :length]
            keys = keys.gather(2, order[..., None].expand(-1, -1, -1, keys.shape[-1]))
            values = values.gather(2, order[..., None].expand(-1, -1, -1, values.shape[-1]))
            slot = torch.arange(length, device=keys.device)[None, None] < counts[..., None]
            kpos = torch.where(slot, kpos.gather(2, order), -1)
            flagged = flagged.gather(2, order) & slot
        self.keys, self.values, self.positions, self.flagged = keys, values, kpos, flagged

    def _rows(self, fn) -> None:
        if self.is_initialized:
            for name in ("keys", "values", "positions", "flagged", "seen"):
                setattr(self, name, fn(getattr(self, name)))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._rows(lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise NotImplementedError("a DMS cache cannot be rolled back: evicted tokens are gone")

    def reset(self) -> None:
        self.keys = self.values = self.positions = self.flagged = self.seen = None
        self.columns = 0
        self.is_initialized = False


class DMSCache(Cache):
    """KV cache of a DMS model: per layer and (batch row, KV head) only the held tokens; see the module
    docstring. ``DMSCache(model.config)``; ``generate`` creates one by itself."""

    def __init__(self, config) -> None:
        dms = dms_settings(config)
        if dms is None:
            raise ValueError("DMSCache needs a config with a dms block")
        super().__init__(layers=[DMSCacheLayer(dms["window"]) for _ in range(config.num_hidden_layers)])
        self.window = dms["window"]

    def _check(self) -> None:
        if not all(layer.is_initialized for layer in self.layers):
            raise ValueError("the DMS cache is empty (no forward has run)")

    def tokens_seen(self) -> torch.Tensor:
        """Real tokens seen per ``[layer, batch row, KV head]``."""
        self._check()
        return torch.stack([la.seen[:, None].expand(-1, la.keys.shape[1]) for la in self.layers]).cpu()

    def tokens_held(self) -> torch.Tensor:
        """Tokens physically held per ``[layer, batch row, KV head]``."""
        self._check()
        return torch.stack([la.held() for la in self.layers]).cpu()

    def storage_tokens(self) -> list[int]:
        """Token slots allocated per layer (the held count padded to the largest row/head of the layer)."""
        self._check()
        return [la.keys.shape[2] for la in self.layers]

    def effective_cr(self) -> float:
        """Tokens seen / tokens held, averaged over layers, batch rows and KV heads."""
        seen, held = self.tokens_seen().float(), self.tokens_held().float()
        return float((seen / held.clamp(min=1)).mean())


class DMSAttention(nn.Module):
    """Replaces a decoder layer's ``self_attn``: same submodules (``q_proj``, ``k_proj``, ``v_proj``,
    ``o_proj``, ``q_norm`` / ``k_norm`` where the family has them) plus ``dms_proj_alpha_norm`` and
    ``dms_proj_alpha`` for the adapter variant, so checkpoint weights load by name."""

    def __init__(self, base: nn.Module, config, layer_idx: int, dms: dict, norm_cls: type) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.q_proj, self.k_proj, self.v_proj = base.q_proj, base.k_proj, base.v_proj
        self.o_proj = base.o_proj
        if hasattr(base, "q_norm"):
            self.q_norm, self.k_norm = base.q_norm, base.k_norm
        self.head_dim = base.head_dim
        self.scaling = base.scaling
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.dms = dms
        if dms["variant"] == "adapter":
            self.dms_proj_alpha_norm = norm_cls(config.hidden_size, eps=dms["adapter_eps"])
            self.dms_proj_alpha = nn.Linear(config.hidden_size, self.num_kv_heads, bias=False)

    def forward(self, *args, **kwargs):
        raise NotImplementedError(
            "DMS attention runs from the DMS *ForCausalLM forward (it needs the DMS cache and the residual); "
            "call the causal LM, not its inner model"
        )

    def attend(
        self,
        x: torch.Tensor,
        residual: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        cache: DMSCacheLayer,
        pos: torch.Tensor,
        valid: torch.Tensor,
    ) -> torch.Tensor:
        """``x [B, n, hidden]`` (after input_layernorm), ``residual`` (before it) -> ``[B, n, hidden]``."""
        b, n, _ = x.shape
        d, g = self.head_dim, self.num_heads // self.num_kv_heads
        q = self.q_proj(x).view(b, n, self.num_heads, d)
        k = self.k_proj(x).view(b, n, self.num_kv_heads, d)
        v = self.v_proj(x).view(b, n, self.num_kv_heads, -1)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        dms = self.dms
        keep = None
        if dms["variant"] == "neuron":
            logits = q[:, :, ::g, -1].float() * dms["scale"] - dms["offset"]  # [B, n, Hkv]
            keep = torch.ones(self.num_heads, d, dtype=q.dtype, device=q.device)
            keep[::g, -1] = 0
            q = q * keep
        else:
            z = self.dms_proj_alpha_norm(residual)
            logits = self.dms_proj_alpha(z).float() * dms["scale"] - dms["offset"]
        if dms["per_layer"]:
            logits = logits[..., :1].expand_as(logits)
        cos, sin = position_embeddings
        cos, sin = cos[:, :, None], sin[:, :, None]
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if keep is not None:
            q = q * keep  # RoPE rotated channel D/2-1 into D-1
        out = cache.attend(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            (logits > 0).transpose(1, 2),
            pos,
            valid,
            self.scaling,
        )
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))


class _DMSCausalLM:
    """Shared by the family classes: swaps in ``DMSAttention`` and runs the DMS forward with a
    ``DMSCache``; without a ``dms`` block everything is the parent transformers class."""

    def __init__(self, config, *args, **kwargs) -> None:
        super().__init__(config, *args, **kwargs)
        self._dms = dms_settings(config)
        if self._dms is not None:
            for i, layer in enumerate(self.model.layers):
                layer.self_attn = DMSAttention(
                    layer.self_attn, config, i, self._dms, type(layer.input_layernorm)
                )

    def _token_mask(self, attention_mask, b: int, n: int, device) -> torch.Tensor:
        if attention_mask is None:
            return torch.ones(b, n, dtype=torch.bool, device=device)
        if attention_mask.dim() != 2 or attention_mask.shape[0] != b or attention_mask.shape[1] < n:
            raise ValueError(
                "DMS models take a 2D attention_mask [batch, past + new tokens], "
                f"got {tuple(attention_mask.shape)}"
            )
        return attention_mask[:, -n:].to(device=device, dtype=torch.bool)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ):
        if self._dms is None:
            return super().forward(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                inputs_embeds=inputs_embeds,
                labels=labels,
                use_cache=use_cache,
                logits_to_keep=logits_to_keep,
                **kwargs,
            )
        return_dict = kwargs.pop("return_dict", None)
        for flag in ("output_attentions", "output_hidden_states"):
            if kwargs.get(flag):
                raise ValueError(f"{flag} is not supported by the DMS forward")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        h = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, n = h.shape[:2]
        use_cache = self.config.use_cache if use_cache is None else use_cache
        cache = past_key_values
        if cache is None:
            cache = DMSCache(self.config)
        elif not isinstance(cache, DMSCache):
            raise ValueError(f"a DMS model needs a DMSCache (or none), got {type(cache).__name__}")
        if len(cache.layers) != self.config.num_hidden_layers:
            raise ValueError(
                f"the DMSCache has {len(cache.layers)} layers, the model {self.config.num_hidden_layers}"
            )
        valid = self._token_mask(attention_mask, b, n, h.device)
        first = cache.layers[0]
        seen = first.seen if first.is_initialized else torch.zeros(b, dtype=torch.long, device=h.device)
        if seen.shape[0] != b:
            raise ValueError(f"the DMSCache holds batch {seen.shape[0]}, the input has batch {b}")
        pos = torch.where(valid, seen[:, None] + valid.long().cumsum(1) - 1, -1)
        if position_ids is not None:
            given = position_ids.to(pos.device).expand(b, n)
            if bool((given != pos)[valid].any()):
                raise ValueError(
                    "position_ids disagree with the DMS cache (positions count the real tokens of each row); "
                    "pass the full attention_mask, or leave position_ids out"
                )
        position_embeddings = self.model.rotary_emb(h, pos.clamp(min=0))
        for i, layer in enumerate(self.model.layers[: self.config.num_hidden_layers]):
            attn = layer.self_attn.attend(
                layer.input_layernorm(h), h, position_embeddings, cache.layers[i], pos, valid
            )
            h = h + attn
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        h = self.model.norm(h)
        if isinstance(logits_to_keep, int):
            h = h[:, -logits_to_keep:] if logits_to_keep > 0 else h
        else:
            h = h[:, logits_to_keep]
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size)
        out = CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache if use_cache else None)
        return out.to_tuple() if return_dict is False else out

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        if self._dms is not None:
            given = model_kwargs.get("past_key_values")
            if given is not None and not isinstance(given, DMSCache):
                raise ValueError(f"a DMS model needs a DMSCache, got {type(given).__name__}")
            if given is None and generation_config.use_cache is not False:
                if generation_config.cache_implementation not in (None, "dynamic"):
                    raise ValueError(
                        f"cache_implementation={generation_config.cache_implementation!r} is not "
                        "supported by DMS models (they use their own DMSCache)"
                    )
                model_kwargs["past_key_values"] = DMSCache(self.config)
                return
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)


class DMSLlamaForCausalLM(_DMSCausalLM, LlamaForCausalLM):
    """Llama with DMS (see the module docstring)."""


class DMSQwen2ForCausalLM(_DMSCausalLM, Qwen2ForCausalLM):
    """Qwen2 with DMS (see the module docstring)."""


class DMSQwen3ForCausalLM(_DMSCausalLM, Qwen3ForCausalLM):
    """Qwen3 with DMS (see the module docstring)."""


__all__ = [
    "DMSAttention",
    "DMSCache",
    "DMSCacheLayer",
    "DMSLlamaForCausalLM",
    "DMSQwen2ForCausalLM",
    "DMSQwen3ForCausalLM",
    "dms_settings",
]
