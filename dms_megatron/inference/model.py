"""A plain-torch DMS causal LM for exported checkpoints (Llama, Qwen2, Qwen3): the CPU reference of
the inference engines.

``forward_dense(ids)`` runs a whole sequence with the *hard* delayed-eviction mask (key k visible to
query i iff k <= i and (i - k <= window or the decision of token k + 1 is "keep")): the oracle.
``DecodeSession.step(token)`` runs one token against a ``paged_cache`` stream per (layer, KV head) that
physically drops evicted tokens; the two must agree (tests/unit/test_inference_model.py).

Weights use HF names (``launch/convert.py export`` output, DMS adapter as ``self_attn.dms_proj_alpha*``);
the ``dms`` block of ``config.json`` gives variant, window, logit scale/offset and decisions per head or
layer. Without a ``dms`` block the model is the original one (no eviction).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dms_megatron.core.attention import dms_attention_reference
from dms_megatron.core.dms_rules import DMSBlock, eviction_logits, evicts, visible
from dms_megatron.core.gating import neuron_mask
from dms_megatron.families import ModelArch, arch_from_hf_config
from dms_megatron.inference.paged_cache import BlockPool, HeadStream


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def _norm(x: torch.Tensor, w: torch.Tensor, eps: float, fused: bool) -> torch.Tensor:
    if fused:
        from dms_megatron.kernels.fused_elementwise import rms_norm

        return rms_norm(x, w, eps)
    return _rms(x, w, eps)


def _rope_table(theta: float, d: int, n: int, device: torch.device, dtype: torch.dtype):
    """HF-style rotate-half RoPE ``cos, sin [n, d]`` (angles in float64, then cast like HF)."""
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=device) / d))
    ang = torch.arange(n, dtype=torch.float64, device=device)[:, None] * inv[None]
    return torch.cat([ang.cos(), ang.cos()], -1).to(dtype), torch.cat([ang.sin(), ang.sin()], -1).to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x [T, H, D]`` with ``cos, sin [T, D]`` of the tokens' positions."""
    d = x.shape[-1]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos[:, None] + torch.cat([-x2, x1], -1) * sin[:, None]


# linears of one layer that read the same input (q/k/v; gate/up): one GEMM each on the fused decode path
MERGED = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"))


class DMSCausalLM:
    """Weights + the per-layer math shared by the dense oracle and the cached decoder."""

    def __init__(
        self, arch: ModelArch, weights: dict[str, torch.Tensor], dms: DMSBlock | Mapping[str, Any] | None
    ) -> None:
        self.arch = arch
        self.w = weights
        self.dms = dms
        self.hq, self.hkv, self.d = arch.num_attention_heads, arch.num_query_groups, arch.head_dim
        self._rope: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def w(self) -> dict[str, torch.Tensor]:
        """The weights by HF name. Assigning a new dict (another device or dtype) merges its projections
        again (``_merge_projections``)."""
        return self._w

    @w.setter
    def w(self, weights: dict[str, torch.Tensor]) -> None:
        self._w = weights
        self._merged: dict[tuple, tuple[torch.Tensor, torch.Tensor | None, list[int]]] = {}
        self._merge_projections()

    @property
    def dms(self) -> DMSBlock | None:
        """The ``dms`` block (None: the original model, no eviction); a dict is parsed on assignment."""
        return self._dms

    @dms.setter
    def dms(self, block: DMSBlock | Mapping[str, Any] | None) -> None:
        self._dms = block if block is None or isinstance(block, DMSBlock) else DMSBlock.from_dict(block)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        verify: bool = True,
    ) -> DMSCausalLM:
        """Load an exported folder. ``verify``: check the shards against the export's sha256 manifest
        (when the folder has one). Unreadable shards and NaN/Inf weights are ``ValueError``s naming
        the file or tensor."""
        from dms_megatron.convert.hf_io import HFReader, check_finite, verify_manifest

        if verify:
            verify_manifest(path)
        reader = HFReader(path)
        config = json.loads((Path(path) / "config.json").read_text())
        weights = {}
        for n in reader.names():
            tensor = reader.get(n)
            check_finite(n, tensor)
            weights[n] = tensor.to(device=device, dtype=dtype)
        reader.close()
        return cls(arch_from_hf_config(config), weights, DMSBlock.from_config(config))

    @property
    def device(self) -> torch.device:
        return self.w["model.embed_tokens.weight"].device

    @property
    def dtype(self) -> torch.dtype:
        return self.w["model.embed_tokens.weight"].dtype

    @property
    def window(self) -> int:
        return self.dms.window if self.dms else 0

    def extend_context(self, positions: int) -> None:
        """Take ``positions`` positions (the engines check prompts against ``arch``): the context raised
        and the RoPE table rebuilt on next use. Positions past the trained context are extrapolated:
        for throughput and memory probes, not for text (``benchmarks/serve_bench.py --past-context``)."""
        self.arch = dataclasses.replace(self.arch, max_position_embeddings=positions)
        self._rope.clear()

    def _p(self, layer: int, name: str) -> torch.Tensor:
        return self.w[f"model.layers.{layer}.{name}"]

    def _linear(self, x: torch.Tensor, layer: int, name: str) -> torch.Tensor:
        bias = self.w.get(f"model.layers.{layer}.{name}.bias")
        return F.linear(x, self._p(layer, name + ".weight"), bias)

    def _merge_projections(self) -> None:
        """Per layer, the q/k/v and gate/up weights (and biases) in one tensor each, the separate names
        kept as views of it (no second copy): the fused decode path runs one GEMM per group. Done when
        the weights are set, before anything (a CUDA graph) can hold the separate tensors."""
        for layer in range(self.arch.num_layers):
            for names in MERGED:
                keys = [f"model.layers.{layer}.{n}" for n in names]
                if not all(k + ".weight" in self.w for k in keys):
                    continue
                parts = [self.w[k + ".weight"] for k in keys]
                sizes = [t.shape[0] for t in parts]
                weight = torch.cat(parts)
                biases = [self.w.get(k + ".bias") for k in keys]
                bias = None
                if any(b is not None for b in biases):
                    zero = [weight.new_zeros(n) for n in sizes]
                    bias = torch.cat([b if b is not None else z for b, z in zip(biases, zero, strict=True)])
                    for k, b, view in zip(keys, biases, bias.split(sizes), strict=True):
                        if b is not None:
                            self.w[k + ".bias"] = view
                for k, view in zip(keys, weight.split(sizes), strict=True):
                    self.w[k + ".weight"] = view
                self._merged[(layer, names)] = (weight, bias, sizes)

    def _project(
        self, x: torch.Tensor, layer: int, names: tuple[str, ...], fused: bool
    ) -> list[torch.Tensor]:
        """``x`` through the linears ``names`` of one layer; ``fused``: one GEMM over their merged
        weights, its output split per name (strided views)."""
        if not fused or (layer, names) not in self._merged:
            return [self._linear(x, layer, n) for n in names]
        weight, bias, sizes = self._merged[(layer, names)]
        return list(F.linear(x, weight, bias).split(sizes, -1))

    def attention_inputs(
        self, layer: int, h: torch.Tensor, pos: torch.Tensor, fused: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``h [T, d]`` (pre-norm residual) -> q ``[T, Hq, D]``, k, v ``[T, Hkv, D]`` (RoPE applied),
        eviction logits ``[T, Hkv]`` (None without DMS). ``fused`` (here, in ``finish_layer`` and
        ``head``): norms, RoPE and the MLP's gate as one Triton kernel each
        (``kernels.fused_elementwise``; CUDA, the same rounding)."""
        a, eps = self.arch, self.arch.norm_eps
        x = _norm(h, self._p(layer, "input_layernorm.weight"), eps, fused)
        q, k, v = self._project(x, layer, MERGED[0], fused)
        q, k, v = q.view(-1, self.hq, self.d), k.view(-1, self.hkv, self.d), v.view(-1, self.hkv, self.d)
        if a.qk_norm:
            q = _norm(q, self._p(layer, "self_attn.q_norm.weight"), eps, fused)
            k = _norm(k, self._p(layer, "self_attn.k_norm.weight"), eps, fused)
        logits = None
        if self.dms is not None:
            raw = None
            if self.dms.variant == "adapter":
                w_alpha = self._p(layer, "self_attn.dms_proj_alpha_norm.weight")
                z = _norm(h, w_alpha, self.dms.adapter_eps, fused)
                raw = F.linear(z, self._p(layer, "self_attn.dms_proj_alpha.weight"))
            logits = eviction_logits(self.dms, q, self.hkv, raw)
        neuron = self.dms is not None and self.dms.variant == "neuron"
        if neuron:  # zero_neuron(q), its mask built once
            q = q * neuron_mask(q, self.hkv)
        key = (q.device, q.dtype)
        if key not in self._rope:
            self._rope[key] = _rope_table(a.rope_theta, self.d, a.max_position_embeddings, q.device, q.dtype)
        cos, sin = (t[pos] for t in self._rope[key])
        if fused:
            from dms_megatron.kernels.fused_elementwise import rotary

            q, k = rotary(q, k, cos, sin)
        else:
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        if neuron:
            q = q * neuron_mask(q, self.hkv)  # RoPE rotated channel D/2-1 into D-1
        return q, k, v, logits

    def finish_layer(
        self, layer: int, h: torch.Tensor, attn: torch.Tensor, fused: bool = False
    ) -> torch.Tensor:
        """Residual + o_proj, then the gated MLP block. ``attn [T, Hq * D]``."""
        h = h + self._linear(attn, layer, "self_attn.o_proj")
        x = _norm(h, self._p(layer, "post_attention_layernorm.weight"), self.arch.norm_eps, fused)
        gate, up = self._project(x, layer, MERGED[1], fused)
        if fused:
            from dms_megatron.kernels.fused_elementwise import silu_mul

            return h + self._linear(silu_mul(gate, up), layer, "mlp.down_proj")
        return h + self._linear(F.silu(gate) * up, layer, "mlp.down_proj")

    def head(self, h: torch.Tensor, fused: bool = False) -> torch.Tensor:
        x = _norm(h, self.w["model.norm.weight"], self.arch.norm_eps, fused)
        out = self.w.get("lm_head.weight", self.w["model.embed_tokens.weight"])
        return F.linear(x, out).float()

    @torch.no_grad()
    def forward_dense(self, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Hard-eviction oracle: logits ``[T, V]`` and per-layer decisions ``[Hkv, T]`` (1 = evict the
        previous token)."""
        pos = torch.arange(ids.shape[0], device=ids.device)
        h = self.w["model.embed_tokens.weight"][ids]
        decisions = []
        for layer in range(self.arch.num_layers):
            q, k, v, logits = self.attention_inputs(layer, h, pos)
            relaxed = None
            if logits is not None:
                hard = evicts(logits).t()  # [Hkv, T]
                decisions.append(hard.int())
                relaxed = torch.where(hard, math.inf, -math.inf)[None]
            out = dms_attention_reference(
                q.transpose(0, 1)[None],
                k.transpose(0, 1)[None],
                v.transpose(0, 1)[None],
                relaxed,
                self.window,
            )
            h = self.finish_layer(layer, h, out[0].transpose(0, 1).reshape(ids.shape[0], -1).to(h.dtype))
        return self.head(h), decisions


def kv_crs(seen: float, held: torch.Tensor) -> dict[str, float]:
    """``memory_cr`` (all tokens seen / all held over the streams of ``held``: the factor the KV memory
    shrank) and ``stream_cr_mean`` (seen / held averaged over streams: a diagnostic, inflated by per-head
    spread) of one sequence; 1.0 before any token."""
    held = held.float()
    if not seen:
        return {"memory_cr": 1.0, "stream_cr_mean": 1.0}
    return {
        "memory_cr": seen * held.numel() / max(float(held.sum()), 1.0),
        "stream_cr_mean": float((seen / held.clamp(min=1)).mean()),
    }


@torch.no_grad()
def dense_last_logits(model: DMSCausalLM, ids: torch.Tensor) -> torch.Tensor:
    """Next-token logits ``[B, V]`` after each row of ``ids [B, T]`` on the model **without eviction**
    (``model.dms`` must be None: the teacher): a batched causal pass through torch's fused attention
    (``scaled_dot_product_attention``), the fast path for the teacher's greedy pass-key answers."""
    if model.dms is not None:
        raise ValueError("dense_last_logits runs the original model: set model.dms = None")
    B, T = ids.shape
    pos = torch.arange(T, device=ids.device).repeat(B)
    h = model.w["model.embed_tokens.weight"][ids.reshape(-1)]
    for layer in range(model.arch.num_layers):
        q, k, v, _ = model.attention_inputs(layer, h, pos)
        q, k, v = (x.view(B, T, -1, model.d).transpose(1, 2) for x in (q, k, v))
        # KV heads repeated for their query groups: with ``enable_gqa`` an fp32 pass falls back to the
        # math kernel, which materialises [B, Hq, T, T] scores (34 GiB for 20 prompts of 7K tokens)
        g = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = model.finish_layer(layer, h, out.transpose(1, 2).reshape(B * T, -1).to(h.dtype))
    return model.head(h.view(B, T, -1)[:, -1])


class DecodeSession:
    """One sequence against per-(layer, KV head) compressed streams: chunked prefill, decode, and more
    prefill after decoding (multi-turn), all continuing from the compressed cache."""

    def __init__(self, model: DMSCausalLM, pool: BlockPool, policy: Any = None) -> None:
        """``policy``: a training-free baseline (``inference.baselines``) instead of DMS; it needs the
        model without a ``dms`` block and runs token by token."""
        if policy is not None and model.dms is not None:
            raise ValueError("a baseline eviction policy runs on the original model: set model.dms = None")
        self.model, self.pool, self.policy = model, pool, policy
        self.streams = [
            [HeadStream(pool, model.window) for _ in range(model.hkv)] for _ in range(model.arch.num_layers)
        ]
        self.position = 0
        self.reads = 0  # KV-cache tokens read by attention (all layers and heads), for metrics

    def step(self, token: int) -> torch.Tensor:
        """Logits ``[V]`` after appending one token."""
        return self.prefill([token], chunk_size=1)[-1]

    @torch.no_grad()
    def prefill(self, tokens: list[int], chunk_size: int = 256) -> torch.Tensor:
        """Append ``tokens`` in chunks; logits ``[len(tokens), V]``. Exact for any chunk size: inside a
        chunk the hard delayed-eviction mask decides visibility, then the chunk is committed."""
        if not tokens:
            raise ValueError("no tokens to prefill")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if self.policy is not None:
            chunk_size = 1  # baselines decide after every token's attention
        out = [self._chunk(tokens[i : i + chunk_size]) for i in range(0, len(tokens), chunk_size)]
        return torch.cat(out)

    def _chunk(self, tokens: list[int]) -> torch.Tensor:
        m, t0, n = self.model, self.position, len(tokens)
        pos = torch.arange(t0, t0 + n)
        h = m.w["model.embed_tokens.weight"][torch.tensor(tokens)]
        g, w = m.hq // m.hkv, m.window
        for layer, streams in enumerate(self.streams):
            q, k, v, logits = m.attention_inputs(layer, h, pos)
            heads = []
            for j, stream in enumerate(streams):
                dec = torch.zeros(n, dtype=torch.bool) if logits is None else evicts(logits[:, j])
                held_pos, held_k, held_v = stream.gather()
                keys_pos = torch.cat([held_pos, pos])
                # evicted[k]: the decision of token k + 1 says evict (pending in the cache, or in the chunk)
                pending = set(stream.pending)
                evicted = torch.tensor([p in pending for p in held_pos.tolist()] + [False] * n)
                if n and t0 > 0 and len(held_pos) and int(held_pos[-1]) == t0 - 1:
                    evicted[len(held_pos) - 1] |= bool(dec[0])
                evicted[len(held_pos) : len(held_pos) + n - 1] |= dec[1:]
                age = pos[:, None] - keys_pos[None, :]  # [n, keys]
                seen_by = visible(age, evicted[None, :], w)
                keys = torch.cat([held_k, k[:, j]]).float()
                values = torch.cat([held_v, v[:, j]]).float()
                self.reads += int(seen_by.sum()) * g
                scores = torch.einsum("ngd,kd->ngk", q[:, j * g : (j + 1) * g].float(), keys) / math.sqrt(m.d)
                scores = scores.masked_fill(~seen_by[:, None, :], float("-inf"))
                probs = torch.softmax(scores, -1)
                heads.append(probs @ values)  # [n, g, D]
                for i in range(n):  # commit: the token's decision flags its predecessor, then it is stored
                    if dec[i] and t0 + i > 0:
                        stream.flag(t0 + i - 1)
                    stream.append(t0 + i, k[i, j], v[i, j])
                if self.policy is not None:
                    self._apply_policy((layer, j), stream, keys_pos.tolist(), probs[-1].mean(0))
            attn = torch.stack(heads, 1).reshape(n, -1).to(h.dtype)
            h = m.finish_layer(layer, h, attn)
        self.position += n
        return m.head(h)

    def _apply_policy(self, key: tuple[int, int], stream: HeadStream, positions: list[int], weights) -> None:
        if hasattr(self.policy, "observe"):
            self.policy.observe(key, positions, weights)
        excess = stream.held - self.policy.budget(stream.seen)
        if excess > 0:
            for p in self.policy.choose(key, positions, weights, excess):
                stream.drop(p)

    def held(self) -> torch.Tensor:
        """Tokens held per ``[layer, KV head]``."""
        return torch.tensor([[s.held for s in row] for row in self.streams])

    def stream_cr_mean(self) -> float:
        """Tokens seen / tokens held averaged over layers and KV heads (a diagnostic; ``kv_crs``)."""
        return kv_crs(self.position, self.held())["stream_cr_mean"]

    def memory_cr(self) -> float:
        """All tokens seen / all tokens held over layers and KV heads (``kv_crs``)."""
        return kv_crs(self.position, self.held())["memory_cr"]

    def release(self) -> None:
        for row in self.streams:
            for s in row:
                s.release()
