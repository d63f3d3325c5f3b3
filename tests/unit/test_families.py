"""Model presets and the HF-config -> architecture mapping, with parallel-layout errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dms_megatron.families import arch_from_hf_config, load_model_preset, preset_names

FULL = ["llama3_8b", "qwen3_8b", "r1_distill_qwen_32b", "r1_distill_qwen_7b", "smollm2_135m"]


def test_every_family_has_full_and_debug_presets():
    names = preset_names()
    assert set(FULL) <= set(names)
    assert {"debug_llama", "debug_qwen2", "debug_qwen3"} <= set(names)
    families = {load_model_preset(n)[0].family for n in names}
    assert families == {"llama", "qwen2", "qwen3"}


@pytest.mark.parametrize(
    ("name", "tp", "pp", "ok"),
    [
        ("r1_distill_qwen_32b", 8, 2, True),
        ("r1_distill_qwen_7b", 8, 1, False),  # 28 heads
        ("r1_distill_qwen_7b", 4, 2, True),
        ("qwen3_8b", 8, 2, True),
        ("llama3_8b", 8, 2, True),
        ("smollm2_135m", 3, 2, True),
        ("smollm2_135m", 2, 1, False),  # 9 heads, 3 KV heads
        ("smollm2_135m", 9, 1, False),  # heads divide, KV heads and FFN do not
        ("smollm2_135m", 1, 4, False),  # 30 layers
    ],
)
def test_parallel_layout_checks(name, tp, pp, ok):
    arch, _ = load_model_preset(name)
    if ok:
        arch.check_parallel(tp, pp)
    else:
        with pytest.raises(ValueError, match="Valid tp values"):
            arch.check_parallel(tp, pp)


def test_error_lists_valid_tp():
    arch, _ = load_model_preset("r1_distill_qwen_7b")
    with pytest.raises(ValueError, match=r"num_attention_heads=28 is not divisible by tp=8.*\[1, 2, 4\]"):
        arch.check_parallel(8, 1)


def test_family_flags():
    assert load_model_preset("r1_distill_qwen_32b")[0].qkv_bias
    assert load_model_preset("qwen3_8b")[0].qk_norm and load_model_preset("qwen3_8b")[0].head_dim == 128
    smol = load_model_preset("smollm2_135m")[0]
    assert smol.tie_word_embeddings and smol.group_size == 3 and smol.rope_theta == 100000.0


def test_smollm2_preset_matches_the_real_config():
    asset = Path(__file__).resolve().parents[2] / "assets" / "smollm2-135m-instruct" / "config.json"
    if not asset.is_file():
        pytest.skip("SmolLM2 asset missing: run `make assets`")
    real = arch_from_hf_config(json.loads(asset.read_text()))
    preset = load_model_preset("smollm2_135m")[0]
    assert real.to_dict() | {"norm_eps": 0} == preset.to_dict() | {"norm_eps": 0}
    assert real.norm_eps == pytest.approx(preset.norm_eps)


@pytest.mark.parametrize(
    ("patch", "match"),
    [
        ({"architectures": ["GPT2LMHeadModel"]}, "unsupported architecture"),
        ({"architectures": []}, "no 'architectures'"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling"),
        ({"num_hidden_layers": None}, "num_hidden_layers"),
    ],
)
def test_bad_hf_configs(patch, match):
    _, preset = load_model_preset("debug_llama")
    with pytest.raises(ValueError, match=match):
        arch_from_hf_config({**preset["hf_config"], **patch})


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown model preset"):
        load_model_preset("gpt5")
