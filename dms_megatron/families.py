"""Model families (Llama, Qwen2, Qwen3): one architecture record read from a Hugging Face config.

``ModelArch`` is framework-free: ``dms_megatron.megatron.families`` turns it into a megatron
``TransformerConfig`` + layer spec, and ``dms_megatron.convert`` maps weights by its fields.

Family differences that matter for Megatron and for weight mapping:
    llama  (LlamaForCausalLM; SmolLM2, Llama-3)          no biases, optional tied embeddings
    qwen2  (Qwen2ForCausalLM; Qwen2.5, R1-Distill-Qwen)  q/k/v biases
    qwen3  (Qwen3ForCausalLM)                            per-head RMSNorm on q and k (qk-norm)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

PRESET_DIR = Path(__file__).resolve().parents[1] / "configs" / "model"

FAMILIES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}


@dataclass(frozen=True)
class ModelArch:
    """What a GPT-style decoder of one of our families needs (HF config field names in comments)."""

    family: str  # llama | qwen2 | qwen3
    architecture: str  # architectures[0]
    num_layers: int  # num_hidden_layers
    hidden_size: int  # hidden_size
    ffn_hidden_size: int  # intermediate_size
    num_attention_heads: int  # num_attention_heads
    num_query_groups: int  # num_key_value_heads
    head_dim: int  # head_dim (or hidden_size // num_attention_heads)
    vocab_size: int  # vocab_size
    max_position_embeddings: int
    norm_eps: float  # rms_norm_eps
    rope_theta: float
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool

    @property
    def group_size(self) -> int:
        return self.num_attention_heads // self.num_query_groups

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def check_parallel(self, tp: int, pp: int) -> None:
        """Clear ValueErrors for layouts megatron (or DMS) cannot shard this model into."""
        problems = []
        if tp < 1 or pp < 1:
            problems.append(f"tp and pp must be >= 1 (got tp={tp}, pp={pp})")
        else:
            if self.num_attention_heads % tp:
                problems.append(f"num_attention_heads={self.num_attention_heads} is not divisible by tp={tp}")
            if self.num_query_groups % tp:
                problems.append(
                    f"num_key_value_heads={self.num_query_groups} is not divisible by tp={tp} "
                    "(DMS needs whole KV heads per rank)"
                )
            if self.ffn_hidden_size % tp:
                problems.append(f"intermediate_size={self.ffn_hidden_size} is not divisible by tp={tp}")
            if self.num_layers % pp:
                problems.append(f"num_hidden_layers={self.num_layers} is not divisible by pp={pp}")
        if problems:
            valid_tp = [t for t in range(1, self.num_attention_heads + 1) if self._tp_ok(t)]
            raise ValueError(
                f"{self.architecture} cannot use tp={tp}, pp={pp}: "
                + "; ".join(problems)
                + f". Valid tp values for this model: {valid_tp}"
            )

    def _tp_ok(self, tp: int) -> bool:
        return not (self.num_attention_heads % tp or self.num_query_groups % tp or self.ffn_hidden_size % tp)


def _get(cfg: dict[str, Any], key: str, default: Any = None) -> Any:
    if key in cfg and cfg[key] is not None:
        return cfg[key]
    if default is None:
        raise ValueError(f"HF config is missing '{key}'")
    return default


def arch_from_hf_config(cfg: dict[str, Any]) -> ModelArch:
    """Read a ``config.json`` dict; raises ValueError naming an unsupported architecture or field."""
    archs = cfg.get("architectures") or []
    if not archs:
        raise ValueError("HF config has no 'architectures' entry; cannot tell the model family")
    arch = archs[0]
    if arch not in FAMILIES:
        raise ValueError(f"unsupported architecture {arch!r}; supported: {', '.join(sorted(FAMILIES))}")
    family = FAMILIES[arch]
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"unsupported hidden_act {cfg['hidden_act']!r} (SwiGLU / silu only)")
    rope_scaling = cfg.get("rope_scaling")
    if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) not in (None, "default"):
        raise ValueError(f"rope_scaling {rope_scaling} is not supported yet (default RoPE only)")
    heads = int(_get(cfg, "num_attention_heads"))
    hidden = int(_get(cfg, "hidden_size"))
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    rope_theta = cfg.get("rope_theta")
    if rope_theta is None:
        rope_theta = (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    return ModelArch(
        family=family,
        architecture=arch,
        num_layers=int(_get(cfg, "num_hidden_layers")),
        hidden_size=hidden,
        ffn_hidden_size=int(_get(cfg, "intermediate_size")),
        num_attention_heads=heads,
        num_query_groups=int(cfg.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        vocab_size=int(_get(cfg, "vocab_size")),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope_theta),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=family == "qwen2" or bool(cfg.get("attention_bias", False)),
        qk_norm=family == "qwen3",
    )


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_model_preset(name: str) -> tuple[ModelArch, dict[str, Any]]:
    """``configs/model/<name>.yaml`` -> (ModelArch, the preset dict)."""
    import yaml

    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown model preset {name!r}; available: {', '.join(preset_names())}")
    preset = yaml.safe_load(path.read_text())
    return arch_from_hf_config(preset["hf_config"]), preset
