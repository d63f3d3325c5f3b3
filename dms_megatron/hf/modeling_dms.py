"""Dynamic Memory Sparsification (DMS) for transformers: remote code for exported DMS checkpoints.

Export (``launch/convert.py export``) copies this file and ``dms_rules.py`` (dms_megatron's
``core/dms_rules.py``: the ``dms`` block schema, the eviction logits and the visibility rule) next to the
weights, and points ``config.json``'s ``auto_map`` at ``modeling_dms.DMS<Family>ForCausalLM``. Both files
import only torch and transformers, so the checkpoint runs where dms_megatron is not installed::

    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
    out = model.generate(ids, max_new_tokens=64, do_sample=False, return_dict_in_generate=True)
    cache = out.past_key_values      # a DMSCache (``out.cache`` on transformers >= 5.24)

What lives here is only what must live inside transformers; the model loop, generation and the family
classes are transformers' own:

* ``DMSAttention`` replaces each decoder layer's ``self_attn`` (same projections and norms, plus the
  adapter's ``dms_proj_alpha_norm`` / ``dms_proj_alpha``, so weights load by name). It computes the
  eviction logits and runs attention through its layer of the cache. The adapter reads the layer's
  pre-norm residual, which a forward pre-hook on the decoder layer hands over.
* ``DMSCache`` (a transformers ``Cache`` of ``DMSCacheLayer``) holds per layer and (batch row, KV head)
  only the tokens still needed: the ``window + 1`` most recent and the older ones not evicted. Decision of
  token t (logit > 0) evicts token t-1; an evicted token stays visible while its age is <= ``window``.
  Rows and heads hold different counts: a layer's tensors are padded to its fullest (row, head) (slots
  with position -1 are empty) and compacted after every forward. ``tokens_seen()``, ``tokens_held()``,
  ``storage_tokens()``, ``memory_cr()``, ``stream_cr_mean()``.
* ``DMS<Family>ForCausalLM.forward`` prepares the cache for the chunk (which tokens are real, their
  positions) and calls the family forward. Given no cache, or the empty default cache ``generate``
  creates, it starts a ``DMSCache`` and returns it; ``generate`` continues with the returned cache, as
  it does for every model.

Padding: tokens whose ``attention_mask`` is 0 are never stored and take no position; positions count the
real tokens of each row (what ``generate`` computes from the mask). ``position_ids`` that disagree raise a
ValueError. Not supported with DMS (clear errors): caches of other kinds (static, quantized, offloaded,
or a dynamic one holding tokens), ``cache.crop`` (assisted decoding), 4D attention masks, sliding-window
layers, ``output_attentions``, and calling the inner ``model.model`` directly. Without a ``dms`` block
the classes are the transformers ones.

Weights: loading a local folder checks its shards against the sha256 the export recorded in
``dms_megatron_manifest.json``; a hub repository's files are checked in the hub cache after the download;
then every loaded weight is checked for NaN / Inf (``from_pretrained(path, trust_remote_code=True,
verify=False)`` skips both).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re

import transformers

# Oldest and newest transformers this file is tested with (dms_megatron's tests/unit/test_hf_remote_code.py
# under both). Older releases lack the Cache API used here; newer ones get a warning, not an error.
OLDEST_TRANSFORMERS = "5.0.0"
NEWEST_TESTED_TRANSFORMERS = "5.25.0"


def _release(version: str) -> tuple[int, int, int]:
    found = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version)
    if found is None:
        raise ValueError(f"cannot read the transformers version {version!r}")
    return int(found[1]), int(found[2]), int(found[3] or 0)


def check_transformers_version(installed: str = transformers.__version__) -> None:
    """Raise (older than supported) or warn (newer than tested), naming both versions."""
    if _release(installed) < _release(OLDEST_TRANSFORMERS):
        raise ImportError(
            f"this DMS checkpoint's remote code needs transformers >= {OLDEST_TRANSFORMERS} (tested "
            f"{OLDEST_TRANSFORMERS} to {NEWEST_TESTED_TRANSFORMERS}); transformers {installed} is installed. "
            f"Upgrade: pip install 'transformers>={OLDEST_TRANSFORMERS}'"
        )
    if _release(installed) > _release(NEWEST_TESTED_TRANSFORMERS):
        import warnings

        warnings.warn(
            f"transformers {installed} is newer than the newest release this DMS remote code was tested "
            f"with ({NEWEST_TESTED_TRANSFORMERS}; oldest {OLDEST_TRANSFORMERS}). If generation fails, "
            f"pin transformers<={NEWEST_TESTED_TRANSFORMERS}.",
            stacklevel=2,
        )


check_transformers_version()  # before importing anything version-dependent

import inspect  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from transformers import LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM  # noqa: E402
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache  # noqa: E402

from .dms_rules import DMSBlock, eviction_logits, evicts, held, visible, zero_neuron  # noqa: E402

SCORE_BUDGET = 1 << 24  # score elements per attention block (queries are processed in blocks)
# transformers 5.24 renamed the cache argument of forward/generate from ``past_key_values`` to ``cache``
CACHE_ARG = (
    "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"
)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], -1)


class DMSCacheLayer(CacheLayerMixin):
    """One layer of a ``DMSCache``. ``keys [B, Hkv, N, D]``, ``values [B, Hkv, N, Dv]``, ``positions
    [B, Hkv, N]`` (-1: empty slot), ``flagged [B, Hkv, N]`` (evicted by its successor's decision, still
    inside the window), ``seen [B]`` real tokens of each row so far, ``columns`` input columns so far
    (pads included: what ``generate`` counts as the sequence length)."""

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

    def get_mask_sizes(self, query_length) -> tuple[int, int]:
        # DMS attention does not read the model's mask (visibility is the DMS rule on the held tokens):
        # sizing it to the new chunk keeps transformers from building a mask over the whole context.
        # transformers < 5.5 passes cache_position (a tensor of the chunk's columns) instead of a length.
        n = query_length.shape[-1] if isinstance(query_length, torch.Tensor) else int(query_length)
        return n, self.columns

    def get_seq_length(self) -> int:
        return self.columns

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:  # the name of get_max_length before transformers 5.3
        return -1

    @property
    def batch_size(self) -> int:
        return self.keys.shape[0] if self.is_initialized else -1

    def held(self) -> torch.Tensor:
        """Tokens held per ``[B, Hkv]``."""
        return (self.positions >= 0).sum(-1)

    def attend(self, q, k, v, evict, pos, valid, scaling: float) -> torch.Tensor:
        """Attention of a chunk of ``n`` new tokens against the held ones and each other, then commit.
        ``q [B, Hq, n, D]``, ``k [B, Hkv, n, D]`` (RoPE applied), ``v [B, Hkv, n, Dv]``, ``evict [B, Hkv, n]``
        (decision of each new token about its predecessor), ``pos [B, n]`` positions (-1 for pads),
        ``valid [B, n]`` (False for pads). Returns ``[B, Hq, n, Dv]``."""
        b, hkv, n, _ = k.shape
        if not self.is_initialized:
            self.lazy_initialization(k[:, :, :0], v[:, :, :0])
        if self.keys.shape[0] != b or self.keys.shape[1] != hkv:
            raise ValueError(f"the DMS cache holds batch {self.keys.shape[0]}, got a chunk of batch {b}")
        held_before = self.positions.shape[2]
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
        out = self._attention(q, keys, values, kpos, flagged, pos, valid, held_before, scaling)
        # commit: pads are never stored; keep what the row's last token still sees
        self.seen = self.seen + valid.sum(1)
        keep = (kpos >= 0) & held(kpos, flagged, (self.seen - 1)[:, None, None], self.window)
        self._store(keys, values, kpos, flagged, keep)
        self.columns += n
        return out

    def _attention(self, q, keys, values, kpos, evicted, qpos, qvalid, held_before, scaling) -> torch.Tensor:
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
            seen_by = (kpos >= 0)[:, :, None, :] & visible(age, evicted[:, :, None, :], self.window)
            pad = ~qvalid[:, s:e]
            if bool(pad.any()):  # a pad query sees itself only (its output is discarded; no empty row)
                own = key_index[None, :] == (held_before + torch.arange(s, e, device=q.device))[:, None]
                seen_by = seen_by | (own[None, None] & pad[:, None, :, None])
            mask = seen_by[:, :, None].expand(b, hkv, g, c, total).reshape(b, hkv, g * c, total)
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
    docstring. ``DMSCache(model.config)``; the DMS causal LM starts one by itself."""

    def __init__(self, config) -> None:
        dms = DMSBlock.from_config(config)
        if dms is None:
            raise ValueError("DMSCache needs a config with a dms block")
        super().__init__(layers=[DMSCacheLayer(dms.window) for _ in range(config.num_hidden_layers)])
        self.window = dms.window
        self.chunk: tuple[torch.Tensor, torch.Tensor] | None = None  # (pos, valid) of the chunk in flight

    def begin_chunk(self, attention_mask, position_ids, batch: int, n: int, device) -> torch.Tensor:
        """Set the positions and validity of the ``n`` new tokens of each row; returns the positions for
        RoPE (pads at 0)."""
        if attention_mask is None:
            valid = torch.ones(batch, n, dtype=torch.bool, device=device)
        elif attention_mask.dim() != 2 or attention_mask.shape[0] != batch or attention_mask.shape[1] < n:
            raise ValueError(
                "DMS models take a 2D attention_mask [batch, past + new tokens], "
                f"got {tuple(attention_mask.shape)}"
            )
        else:
            valid = attention_mask[:, -n:].to(device=device, dtype=torch.bool)
        first = self.layers[0]
        seen = first.seen if first.is_initialized else torch.zeros(batch, dtype=torch.long, device=device)
        if seen.shape[0] != batch:
            raise ValueError(f"the DMSCache holds batch {seen.shape[0]}, the input has batch {batch}")
        pos = torch.where(valid, seen[:, None] + valid.long().cumsum(1) - 1, -1)
        if position_ids is not None:
            given = position_ids.to(pos.device).expand(batch, n)
            if bool((given != pos)[valid].any()):
                raise ValueError(
                    "position_ids disagree with the DMS cache (positions count the real tokens of each row); "
                    "pass the full attention_mask, or leave position_ids out. (generate with "
                    "prefill_chunk_size under transformers 5.2.0 gives every chunk the positions of the "
                    "prompt's last chunk, wrong for any model: use another release.)"
                )
        self.chunk = (pos, valid)
        return pos.clamp(min=0)

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

    def stream_cr_mean(self) -> float:
        """Tokens seen / tokens held averaged over layers, batch rows and KV heads (a diagnostic: per-head
        spread inflates it; ``memory_cr`` is what the memory shrank by)."""
        seen, held_now = self.tokens_seen().float(), self.tokens_held().float()
        return float((seen / held_now.clamp(min=1)).mean())

    def memory_cr(self) -> float:
        """All tokens seen / all tokens held: the factor the KV memory shrank (a dense cache holds all)."""
        return float(self.tokens_seen().sum() / self.tokens_held().sum().clamp(min=1))


class DMSAttention(nn.Module):
    """Replaces a decoder layer's ``self_attn``: same submodules (``q_proj``, ``k_proj``, ``v_proj``,
    ``o_proj``, ``q_norm`` / ``k_norm`` where the family has them) plus ``dms_proj_alpha_norm`` and
    ``dms_proj_alpha`` for the adapter variant, so checkpoint weights load by name."""

    def __init__(self, base: nn.Module, config, layer_idx: int, dms: DMSBlock, norm_cls: type) -> None:
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
        self.residual: torch.Tensor | None = None  # the layer's input, set by the pre-hook (adapter)
        if dms.variant == "adapter":
            self.dms_proj_alpha_norm = norm_cls(config.hidden_size, eps=dms.adapter_eps)
            self.dms_proj_alpha = nn.Linear(config.hidden_size, self.num_kv_heads, bias=False)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values", kwargs.get("past_key_value")))
        if not isinstance(cache, DMSCache) or cache.chunk is None:
            raise ValueError(
                "DMS attention runs inside the DMS *ForCausalLM forward (it prepares the DMSCache); "
                "call the causal LM, not its inner model"
            )
        b, n, _ = hidden_states.shape
        d = self.head_dim
        q = self.q_proj(hidden_states).view(b, n, self.num_heads, d)
        k = self.k_proj(hidden_states).view(b, n, self.num_kv_heads, d)
        v = self.v_proj(hidden_states).view(b, n, self.num_kv_heads, -1)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        adapter_raw = None
        if self.dms.variant == "adapter":
            residual, self.residual = self.residual, None
            adapter_raw = self.dms_proj_alpha(self.dms_proj_alpha_norm(residual))
        logits = eviction_logits(self.dms, q, self.num_kv_heads, adapter_raw)  # [B, n, Hkv]
        if self.dms.variant == "neuron":
            q = zero_neuron(q, self.num_kv_heads)
        cos, sin = position_embeddings
        cos, sin = cos[:, :, None], sin[:, :, None]
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if self.dms.variant == "neuron":
            q = zero_neuron(q, self.num_kv_heads)  # RoPE rotated channel D/2-1 into D-1
        pos, valid = cache.chunk
        out = cache.layers[self.layer_idx].attend(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), evicts(logits).transpose(1, 2),
            pos, valid, self.scaling,
        )  # fmt: skip
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1)), None


def _hand_residual_to_attention(layer: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of a decoder layer: its input is the residual the adapter reads."""
    layer.self_attn.residual = args[0] if args else kwargs["hidden_states"]


MANIFEST = "dms_megatron_manifest.json"


def verify_manifest(folder: str | os.PathLike) -> None:
    """Check a local folder's shards against the export's ``MANIFEST`` (no manifest: nothing to check);
    a mismatch or a missing shard is a ``ValueError`` naming the file."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        return
    with open(path) as f:
        shards = json.load(f)["shards"]
    _check_shards({name: os.path.join(folder, name) for name in shards}, shards)


def _check_shards(paths: dict[str, str | None], want: dict[str, str]) -> None:
    for name, sha in want.items():
        shard = paths.get(name)
        if shard is None or not os.path.isfile(shard):
            raise ValueError(f"{shard or name}: listed in {MANIFEST} but missing")
        digest = hashlib.sha256()
        with open(shard, "rb") as f:
            while block := f.read(1 << 22):
                digest.update(block)
        if digest.hexdigest() != sha:
            raise ValueError(
                f"{shard}: sha256 differs from {MANIFEST} (corrupted or modified; verify=False skips)"
            )


def verify_cached_download(repo_id: str, revision: str | None = None, cache_dir: str | None = None) -> bool:
    """Check the hub cache's copy of ``repo_id`` (as transformers just downloaded it) against its
    ``MANIFEST``; False when the repository has no manifest in the cache. Reads the cache only."""
    from huggingface_hub import try_to_load_from_cache

    def cached(name: str) -> str | None:
        found = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir, revision=revision)
        return found if isinstance(found, str) else None

    manifest = cached(MANIFEST)
    if manifest is None:
        return False
    with open(manifest) as f:
        shards = json.load(f)["shards"]
    _check_shards({name: cached(name) for name in shards}, shards)
    return True


def check_finite_weights(model: nn.Module) -> None:
    """Refuse a model with NaN or Inf in a floating-point parameter or buffer (``ValueError`` naming it)."""
    tensors = itertools.chain(model.named_parameters(), model.named_buffers())
    for name, tensor in tensors:
        if tensor.is_floating_point() and tensor.device.type != "meta" and not bool(tensor.isfinite().all()):
            bad = int((~tensor.isfinite()).sum())
            raise ValueError(f"weight {name!r} holds {bad} NaN/Inf values (a corrupted checkpoint?)")


class _DMSCausalLM:
    """Shared by the family classes: swaps in ``DMSAttention`` and prepares the ``DMSCache`` for each
    forward; without a ``dms`` block everything is the parent transformers class."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, verify: bool = True, **kwargs):
        """The transformers loader, after checking a local folder (or, after the download, the hub cache's
        copy) against the export's sha256 manifest, then the loaded weights for NaN / Inf
        (``verify=False``: skip both)."""
        path = pretrained_model_name_or_path
        local = isinstance(path, (str, os.PathLike)) and os.path.isdir(path)
        if verify and local:
            verify_manifest(path)
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        if verify:
            if not local and isinstance(path, str):  # a hub id: check the files transformers downloaded
                verify_cached_download(path, kwargs.get("revision"), kwargs.get("cache_dir"))
            check_finite_weights(model)
        return model

    def __init__(self, config, *args, **kwargs) -> None:
        super().__init__(config, *args, **kwargs)
        self.dms = DMSBlock.from_config(config)
        if self.dms is None:
            return
        layer_types = getattr(config, "layer_types", None) or []
        if any(t != "full_attention" for t in layer_types):
            raise ValueError(f"DMS supports full-attention layers only, config has layer_types {layer_types}")
        for i, layer in enumerate(self.model.layers):
            layer.self_attn = DMSAttention(layer.self_attn, config, i, self.dms, type(layer.input_layernorm))
            if self.dms.variant == "adapter":
                layer.register_forward_pre_hook(_hand_residual_to_attention, with_kwargs=True)

    def _dms_cache(self, given) -> DMSCache:
        if isinstance(given, DMSCache):
            if len(given.layers) != self.config.num_hidden_layers:
                raise ValueError(
                    f"the DMSCache has {len(given.layers)} layers, the model {self.config.num_hidden_layers}"
                )
            return given
        default = type(given) is DynamicCache and not getattr(given, "offloading", False)
        if given is None or (default and given.get_seq_length() == 0):
            return DMSCache(self.config)  # no cache, or the empty default one generate made: start ours
        state = "holding tokens" if isinstance(given, Cache) and given.get_seq_length() else "empty"
        raise ValueError(
            f"a DMS model needs a DMSCache (or none), got {type(given).__name__} ({state}); DMS models keep "
            "their own compressed cache: leave cache_implementation unset (or 'dynamic')"
        )

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ):
        cache = kwargs.pop("cache", None)
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        if self.dms is None:
            kwargs[CACHE_ARG] = cache
            return super().forward(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
                logits_to_keep=logits_to_keep, **kwargs,
            )  # fmt: skip
        if kwargs.get("output_attentions"):
            raise ValueError("output_attentions is not supported by DMS models")
        kwargs.pop("cache_position", None)  # positions come from the cache (real tokens of each row)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        b, n = (input_ids if inputs_embeds is None else inputs_embeds).shape[:2]
        device = (input_ids if inputs_embeds is None else inputs_embeds).device
        dms_cache = self._dms_cache(cache)
        rope_pos = dms_cache.begin_chunk(attention_mask, position_ids, b, n, device)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        return_dict = kwargs.pop("return_dict", None)
        kwargs[CACHE_ARG] = dms_cache
        try:  # the model's own mask is not used: visibility comes from the cache (see get_mask_sizes)
            out = super().forward(
                input_ids=input_ids, attention_mask=None, position_ids=rope_pos, inputs_embeds=inputs_embeds,
                labels=labels, use_cache=True, logits_to_keep=logits_to_keep, return_dict=True, **kwargs,
            )  # fmt: skip
        finally:
            dms_cache.chunk = None
        if not use_cache:  # generate without a cache feeds the whole sequence again: return none
            out = type(out)(**{key: value for key, value in out.items() if key != CACHE_ARG})
        return out.to_tuple() if return_dict is False else out


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
    "check_transformers_version",
]
