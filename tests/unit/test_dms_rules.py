"""The shared DMS rules (core/dms_rules.py): the schema of the exported ``dms`` block (writer and readers
held together) and the eviction / visibility rules against their definitions."""

from __future__ import annotations

import ast
import json
import sys
from dataclasses import MISSING, fields
from pathlib import Path

import pytest
import torch

from dms_megatron.config import DMSConfig
from dms_megatron.core import dms_rules
from dms_megatron.core.dms_rules import (
    DMSBlock,
    eviction_logits,
    evicts,
    held,
    neuron_evict_logits,
    outside_window,
    per_layer_logits,
    scaled_logits,
    visible,
    zero_neuron,
)
from dms_megatron.hf import REMOTE_FILES, RULES_FILE

REQUIRED = ("variant", "decisions_per", "window", "logit_scale", "logit_offset")


# ---- the block: one schema for the writer (export) and every reader ---------------------------------
def test_block_keys_and_defaults_match_the_training_config() -> None:
    """Every block key but trained_cr is a DMSConfig field; the defaults a loader fills in for an older
    block are the training defaults (the dataclass is the single source)."""
    config_fields = {f.name: f for f in fields(DMSConfig)}
    assert DMSBlock.required_keys() == REQUIRED
    for f in fields(DMSBlock):
        if f.name == "trained_cr":
            continue
        assert f.name in config_fields, f.name
        if f.default is not MISSING and f.default is not None:
            assert f.default == config_fields[f.name].default, f.name
    assert [f.name for f in fields(DMSBlock)] == [
        *REQUIRED,
        "adapter_eps",
        "tau",
        "target_cr",
        "trained_cr",
        "cr_context",
    ]


def test_the_exported_block_round_trips_through_json() -> None:
    cfg = DMSConfig(variant="adapter", decisions_per="layer", window=17, adapter_eps=1e-5, target_cr=6.0)
    block = cfg.exported_block(trained_cr=5.5)
    written = json.loads(json.dumps({"dms": block.to_dict()}))
    assert set(written["dms"]) == {f.name for f in fields(DMSBlock)}
    assert DMSBlock.from_config(written) == block
    assert (block.variant, block.decisions_per, block.window, block.adapter_eps) == (
        "adapter",
        "layer",
        17,
        1e-5,
    )
    assert (block.tau, block.target_cr, block.trained_cr) == (cfg.tau, 6.0, 5.5)
    assert block.per_layer and not DMSConfig().exported_block().per_layer


def test_both_loaders_read_the_block_the_same(tmp_path) -> None:
    """The engine (``DMSCausalLM.from_pretrained``) and the remote code read config.json with
    ``DMSBlock.from_config``; a transformers config object carries the block as an attribute."""
    from types import SimpleNamespace

    block = DMSConfig(variant="neuron", window=3).exported_block(2.0)
    as_json = {"model_type": "llama", "dms": block.to_dict()}
    assert (
        DMSBlock.from_config(as_json) == DMSBlock.from_config(SimpleNamespace(dms=block.to_dict())) == block
    )
    assert DMSBlock.from_config({"model_type": "llama"}) is None
    assert DMSBlock.from_config(SimpleNamespace()) is None


def test_an_older_block_without_adapter_eps_gets_the_training_default() -> None:
    block = DMSBlock.from_dict(
        {"variant": "adapter", "decisions_per": "head", "window": 4, "logit_scale": 1, "logit_offset": 0}
    )
    assert block.adapter_eps == DMSConfig().adapter_eps and block.trained_cr is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"window": None}, r"lacks \['window'\]"),
        ({"colour": "red"}, r"unknown keys \['colour'\]"),
        ({"variant": "x"}, r"dms.variant='x' is invalid: choose one of neuron, adapter"),
        ({"decisions_per": "token"}, r"dms.decisions_per='token' is invalid"),
        ({"window": -1}, r"dms.window=-1 is invalid"),
        ({"window": True}, r"dms.window=True is invalid"),
        ({"logit_scale": 0}, r"dms.logit_scale=0 is invalid: must be > 0"),
        ({"logit_offset": "5"}, r"dms.logit_offset='5' is invalid: expected a number"),
        ({"adapter_eps": 0.0}, r"dms.adapter_eps=0.0 is invalid"),
    ],
)
def test_a_bad_block_is_a_clear_error(change, message) -> None:
    block = {
        "variant": "neuron",
        "decisions_per": "head",
        "window": 4,
        "logit_scale": 100.0,
        "logit_offset": 5.0,
    }
    block.update(change)
    block = {k: v for k, v in block.items() if v is not None}
    with pytest.raises(ValueError, match=message):
        DMSBlock.from_dict(block)


def test_an_adapter_bias_cannot_be_exported() -> None:
    with pytest.raises(ValueError, match="adapter_bias=true cannot be exported"):
        DMSConfig(variant="adapter", adapter_bias=True).exported_block()


def test_the_rules_file_is_self_contained() -> None:
    """Export copies it next to modeling_dms.py: torch and the standard library only, no package import."""
    assert REMOTE_FILES["dms_rules.py"] == RULES_FILE == Path(dms_rules.__file__)
    tree = ast.parse(RULES_FILE.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, "no relative imports"
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            assert top == "torch" or top in sys.stdlib_module_names, name


# ---- eviction logits --------------------------------------------------------------------------------
def test_eviction_logits_per_variant() -> None:
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 5, 8, 16, generator=gen)  # [B, T, Hq, D]
    raw = torch.randn(2, 5, 2, generator=gen)  # the adapter projection's output [B, T, Hkv]
    neuron = DMSBlock("neuron", "head", 4, 10.0, 1.0)
    expect = q[..., [0, 4], -1] * 10.0 - 1.0  # channel D-1 of each group's first head
    torch.testing.assert_close(eviction_logits(neuron, q, 2), expect)
    torch.testing.assert_close(neuron_evict_logits(q, 2, 10.0, 1.0), expect)
    adapter = DMSBlock("adapter", "layer", 4, 2.0, -0.5)
    got = eviction_logits(adapter, q, 2, raw)
    torch.testing.assert_close(got, (raw[..., :1] * 2.0 + 0.5).expand(2, 5, 2))
    torch.testing.assert_close(per_layer_logits(scaled_logits(raw, 2.0, -0.5)), got)
    with pytest.raises(ValueError, match="adapter projection"):
        eviction_logits(adapter, q, 2)
    assert scaled_logits(raw.bfloat16(), 100.0, 5.0).dtype == torch.float32  # scaled in at least fp32
    zeroed = zero_neuron(q, 2)
    assert (zeroed[..., [0, 4], -1] == 0).all() and torch.equal(
        zeroed[..., [1, 2, 3, 5, 6, 7], :], q[..., [1, 2, 3, 5, 6, 7], :]
    )
    assert evicts(torch.tensor([-1.0, 0.0, 0.5])).tolist() == [False, False, True]


# ---- visibility -------------------------------------------------------------------------------------
def test_visibility_and_holding_follow_their_definitions() -> None:
    """Key k is visible to query i iff k <= i and (i - k <= window or k is not evicted); once token t is
    in, a cache holds exactly the keys t sees."""
    gen = torch.Generator().manual_seed(1)
    for window in (0, 1, 3, 8):
        T = 24
        evicted = torch.rand(T, generator=gen) < 0.5
        pos = torch.arange(T)
        age = pos[:, None] - pos[None, :]
        got = visible(age, evicted[None, :], window)
        for i in range(T):
            for k in range(T):
                want = k <= i and (i - k <= window or not bool(evicted[k]))
                assert bool(got[i, k]) == want, (window, i, k)
        assert torch.equal(outside_window(age, window), age > window)
        for last in range(T):
            keep = held(pos[: last + 1], evicted[: last + 1], last, window)
            assert keep.tolist() == [last - p <= window or not bool(evicted[p]) for p in range(last + 1)]
