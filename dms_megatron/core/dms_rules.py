"""The DMS rules every path shares, and the schema of the ``dms`` block of an exported ``config.json``.

One implementation each, used by Megatron training (``core.gating``, ``core.attention``, ``kernels``),
the inference engines (``inference.model``, ``inference.compressed_cache``) and the transformers
remote code (``hf/modeling_dms.py``):

* ``DMSBlock``: the ``dms`` block, written by export, read by every loader (keys, defaults, checks);
* eviction logits: ``neuron_evict_logits`` / ``zero_neuron`` (repurposed q channel), ``scaled_logits`` (the
  adapter's ``scale * raw - offset``), ``per_layer_logits``, ``eviction_logits`` (one layer, from the
  block), ``evicts`` (the inference decision: logit > 0);
* visibility under delayed eviction: ``outside_window``, ``visible`` (which keys a query sees),
  ``held`` (which tokens a cache must still hold).

**Self-contained on purpose** (torch and the standard library only, no package imports): export copies
this file next to ``modeling_dms.py`` as ``dms_rules.py``, so an exported checkpoint runs where
dms_megatron is not installed. ``tests/unit/test_dms_rules.py`` enforces it.

Shape legend (any leading dims ``...`` are carried through):
    q          [..., Hq, D]  query heads on ``head_axis`` (default -2), channels last
    logits     [..., Hkv]    one eviction logit per KV head (head axis of q reduced, channel dropped)
    age        any           query position - key position (negative: a future key)
    evicted    like age      the key's successor decided "evict" (the one-token shift)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any

import torch

DEFAULT_LOGIT_SCALE = 100.0
DEFAULT_LOGIT_OFFSET = 5.0
DEFAULT_ADAPTER_EPS = 1e-6  # the adapter's RMSNorm eps when a block does not carry it
VARIANTS = ("neuron", "adapter")
DECISIONS_PER = ("head", "layer")


# ---- the exported dms block ------------------------------------------------------------------------
@dataclass(frozen=True)
class DMSBlock:
    """The ``dms`` block of an exported ``config.json``: what a loader needs to run the model.

    variant: ``neuron`` (eviction logit read from q channel D-1 of each KV group's first head) or
        ``adapter`` (``self_attn.dms_proj_alpha(dms_proj_alpha_norm(h))`` on the pre-norm residual h).
    decisions_per: ``head`` (one decision per KV head) or ``layer`` (KV head 0's for all heads).
    window: an evicted token stays visible to the ``window`` queries after it, then leaves the cache.
    logit_scale, logit_offset: ``logit = scale * raw - offset``.
    adapter_eps: eps of the adapter's RMSNorm (older exports lack it: the training default applies).
    tau, target_cr, trained_cr, cr_context: training metadata (the temperature, the CR aimed at, the CR
        reached, and the context length at which they are memory CRs, tokens seen / tokens held; absent
        or None: decision-rate CRs); loaders ignore them.
    """

    variant: str
    decisions_per: str
    window: int
    logit_scale: float
    logit_offset: float
    adapter_eps: float = DEFAULT_ADAPTER_EPS
    tau: float | None = None
    target_cr: float | None = None
    trained_cr: float | None = None
    cr_context: int | None = None

    def __post_init__(self) -> None:
        def bad(key: str, want: str) -> ValueError:
            return ValueError(f"config.json dms.{key}={getattr(self, key)!r} is invalid: {want}")

        if self.variant not in VARIANTS:
            raise bad("variant", f"choose one of {', '.join(VARIANTS)}")
        if self.decisions_per not in DECISIONS_PER:
            raise bad("decisions_per", f"choose one of {', '.join(DECISIONS_PER)}")
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 0:
            raise bad("window", "expected an integer >= 0")
        for key in ("logit_scale", "logit_offset", "adapter_eps", "tau", "target_cr", "trained_cr"):
            value = getattr(self, key)
            optional = key in ("tau", "target_cr", "trained_cr")
            if (value is None and not optional) or isinstance(value, bool):
                raise bad(key, "expected a number")
            if value is not None and not isinstance(value, int | float):
                raise bad(key, "expected a number")
        if self.cr_context is not None and (
            isinstance(self.cr_context, bool) or not isinstance(self.cr_context, int) or self.cr_context < 0
        ):
            raise bad("cr_context", "expected an integer >= 0 or null")
        if self.logit_scale <= 0:
            raise bad("logit_scale", "must be > 0")
        if self.adapter_eps <= 0:
            raise bad("adapter_eps", "must be > 0")

    @classmethod
    def required_keys(cls) -> tuple[str, ...]:
        """Keys every block must carry (the others have defaults)."""
        return tuple(f.name for f in fields(cls) if f.default is MISSING)

    @classmethod
    def from_dict(cls, block: Mapping[str, Any]) -> DMSBlock:
        """Parse a ``dms`` block; a ValueError names missing or unknown keys."""
        if not isinstance(block, Mapping):
            raise ValueError(f"config.json dms must be a mapping, got {type(block).__name__}")
        known = {f.name for f in fields(cls)}
        missing = [k for k in cls.required_keys() if k not in block]
        if missing:
            raise ValueError(
                f"config.json dms block lacks {missing} (re-export it with launch/convert.py export)"
            )
        unknown = sorted(set(block) - known)
        if unknown:
            raise ValueError(
                f"config.json dms block has unknown keys {unknown} (written by a newer dms_megatron?); "
                f"known: {sorted(known)}"
            )
        return cls(**dict(block))

    @classmethod
    def from_config(cls, config: Any) -> DMSBlock | None:
        """The block of a ``config.json`` dict or a transformers config object; None without one."""
        block = config.get("dms") if isinstance(config, Mapping) else getattr(config, "dms", None)
        return cls.from_dict(block) if block else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def per_layer(self) -> bool:
        return self.decisions_per == "layer"


# ---- eviction logits -------------------------------------------------------------------------------
def _group_axis(q: torch.Tensor, num_kv_heads: int, head_axis: int) -> tuple[int, int]:
    if not isinstance(q, torch.Tensor):
        raise ValueError(f"q must be a torch.Tensor, got {type(q).__name__}")
    if not q.is_floating_point():
        raise ValueError(f"q must be a floating-point tensor, got dtype {q.dtype}")
    if q.dim() < 2:
        raise ValueError(f"q needs a head axis and a channel axis, got shape {tuple(q.shape)}")
    axis = head_axis % q.dim()
    if axis == q.dim() - 1:
        raise ValueError("head_axis must not be the channel (last) axis")
    heads = q.shape[axis]
    if num_kv_heads <= 0 or heads % num_kv_heads:
        raise ValueError(
            f"number of query heads ({heads}) must be a positive multiple of the number of KV heads "
            f"({num_kv_heads})"
        )
    return axis, heads // num_kv_heads


def scaled_logits(raw: torch.Tensor, scale: float, offset: float) -> torch.Tensor:
    """``scale * raw - offset`` in at least fp32 (bf16 times 100 would be too coarse)."""
    return raw.to(torch.promote_types(raw.dtype, torch.float32)) * scale - offset


def neuron_evict_logits(
    q: torch.Tensor,
    num_kv_heads: int,
    scale: float = DEFAULT_LOGIT_SCALE,
    offset: float = DEFAULT_LOGIT_OFFSET,
    head_axis: int = -2,
) -> torch.Tensor:
    """The repurposed neuron: ``scale * q[first head of each KV group, D-1] - offset``.

    Read q after its q-norm and before RoPE. The head axis shrinks to one entry per KV group and the
    channel axis is dropped (``[..., Hkv]`` for ``head_axis=-2``). Differentiable in q.
    """
    axis, g = _group_axis(q, num_kv_heads, head_axis)
    first_heads = torch.arange(0, q.shape[axis], g, device=q.device)
    return scaled_logits(q[..., -1].index_select(axis, first_heads), scale, offset)


def zero_neuron(q: torch.Tensor, num_kv_heads: int, head_axis: int = -2) -> torch.Tensor:
    """q with the repurposed channel (D-1 of each KV group's first head) set to 0, out of place.

    Apply before RoPE and again after it: rotate-half RoPE mixes channel D-1 with D/2-1.
    """
    axis, g = _group_axis(q, num_kv_heads, head_axis)
    first = torch.arange(q.shape[axis], device=q.device) % g == 0  # the first head of each KV group
    last = torch.arange(q.shape[-1], device=q.device) == q.shape[-1] - 1
    keep = (~(first[:, None] & last[None, :])).to(q.dtype)  # no host scalar written per call
    view = [1] * q.dim()
    view[axis], view[-1] = q.shape[axis], q.shape[-1]
    return q * keep.view(view)


def per_layer_logits(logits: torch.Tensor, head_axis: int = -1) -> torch.Tensor:
    """Decisions per layer: KV head 0's logit for every KV head (same shape out)."""
    axis = head_axis % logits.dim()
    return logits.narrow(axis, 0, 1).expand_as(logits)


def eviction_logits(
    block: DMSBlock, q: torch.Tensor, num_kv_heads: int, adapter_raw: torch.Tensor | None = None
) -> torch.Tensor:
    """One layer's eviction logits ``[..., Hkv]``: from q (``[..., Hq, D]``, after q-norm, before RoPE)
    for the neuron variant, from ``adapter_raw`` (the adapter projection's output ``[..., Hkv]``) for the
    adapter variant; then per layer if the block says so."""
    if block.variant == "neuron":
        logits = neuron_evict_logits(q, num_kv_heads, block.logit_scale, block.logit_offset)
    elif adapter_raw is None:
        raise ValueError("the adapter variant needs the adapter projection's output")
    else:
        logits = scaled_logits(adapter_raw, block.logit_scale, block.logit_offset)
    return per_layer_logits(logits) if block.per_layer else logits


def evicts(logits: torch.Tensor) -> torch.Tensor:
    """Inference decisions (no noise, no temperature): True where the token evicts its predecessor."""
    return logits > 0


# ---- visibility under delayed eviction -------------------------------------------------------------
def outside_window(age: torch.Tensor, window: int | torch.Tensor) -> torch.Tensor:
    """True where a key is older than the window for a query (``age = query pos - key pos``): only there
    does its eviction act (a soft bias in training, removal at inference)."""
    return age > window


def visible(age: torch.Tensor, evicted: torch.Tensor, window: int) -> torch.Tensor:
    """Hard delayed eviction: a key is visible to a query iff it is not in the future and it is either
    inside the window or not evicted."""
    return (age >= 0) & ~(outside_window(age, window) & evicted)


def held(
    key_pos: torch.Tensor, evicted: torch.Tensor, last_pos: torch.Tensor | int, window: int
) -> torch.Tensor:
    """The tokens a cache must still hold once the token at ``last_pos`` is in: those the last token sees
    (every later query is further away, so a token it cannot see is never seen again)."""
    return visible(last_pos - key_pos, evicted, window)


__all__ = [
    "DECISIONS_PER",
    "DEFAULT_ADAPTER_EPS",
    "DEFAULT_LOGIT_OFFSET",
    "DEFAULT_LOGIT_SCALE",
    "VARIANTS",
    "DMSBlock",
    "eviction_logits",
    "evicts",
    "held",
    "neuron_evict_logits",
    "outside_window",
    "per_layer_logits",
    "scaled_logits",
    "visible",
    "zero_neuron",
]
