"""Loading refuses weights that are not what the export wrote: a shard whose sha256 differs from the
manifest (unless ``verify=False``), NaN/Inf tensors, truncated or garbage safetensors files; each error
names the file or tensor. And the package never unpickles with ``torch.load`` / ``pickle.load``."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from dms_megatron.convert.hf_io import SINGLE
from dms_megatron.inference.model import DMSCausalLM
from tests.unit.test_cli_inputs import write_tiny_model

PACKAGE = Path(__file__).resolve().parents[2] / "dms_megatron"


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("weights") / "hf")


@pytest.fixture
def copy(exported, tmp_path) -> Path:
    return Path(shutil.copytree(exported, tmp_path / "copy"))


def test_intact_folder_loads(exported) -> None:
    assert DMSCausalLM.from_pretrained(exported).arch.num_layers == 2


def test_a_modified_shard_fails_the_manifest_unless_verify_is_off(copy) -> None:
    shard = copy / SINGLE
    data = bytearray(shard.read_bytes())
    data[-1] = 0x3F if data[-1] != 0x3F else 0x3E  # the last float's high byte: still a finite number
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=re.escape(str(shard)) + ".*sha256"):
        DMSCausalLM.from_pretrained(copy)
    DMSCausalLM.from_pretrained(copy, verify=False)


def test_a_shard_missing_from_the_folder_is_named(copy) -> None:
    (copy / SINGLE).unlink()
    with pytest.raises(ValueError, match=re.escape(str(copy / SINGLE)) + ".*missing"):
        DMSCausalLM.from_pretrained(copy)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_with_the_tensor_name(copy, bad) -> None:
    tensors = load_file(copy / SINGLE)
    name = "model.layers.1.mlp.up_proj.weight"
    tensors[name][3, 5] = bad
    save_file(tensors, copy / SINGLE, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=re.escape(repr(name)) + " holds 1 NaN/Inf"):
        DMSCausalLM.from_pretrained(copy, verify=False)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_unreadable_safetensors_name_the_file(copy, damage) -> None:
    shard = copy / SINGLE
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2] if damage == "truncated" else os.urandom(len(data)))
    with pytest.raises(ValueError, match=re.escape(str(shard))):
        DMSCausalLM.from_pretrained(copy, verify=False)


def test_the_package_never_unpickles() -> None:
    """``torch.load`` only with ``weights_only=True``; no ``pickle.load(s)``: untrusted files run no code."""
    hits = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        for m in re.finditer(r"torch\.load\(", text):
            call = text[m.start() : text.find(")", m.end()) + 1]  # the call up to its first ")"
            if "weights_only=True" not in call:
                hits.append(f"{path}:{text.count(chr(10), 0, m.start()) + 1}: {call.splitlines()[0]}")
        for m in re.finditer(r"\b(c?pickle|dill)\.loads?\(", text):
            hits.append(f"{path}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)}")
    assert not hits, "unpickling calls in the package:\n" + "\n".join(hits)


def test_remote_code_checks_the_manifest_of_a_local_folder(copy) -> None:
    import json

    import transformers as tf

    from dms_megatron.convert.hf_io import MANIFEST
    from dms_megatron.hf import install_remote_code

    config = json.loads((copy / "config.json").read_text())
    config["dms"] = {"variant": "neuron", "decisions_per": "head", "window": 4}
    config["dms"] |= {"logit_scale": 100.0, "logit_offset": 5.0}
    (copy / "config.json").write_text(json.dumps(config))
    install_remote_code(copy)
    assert tf.AutoModelForCausalLM.from_pretrained(copy, trust_remote_code=True).dms.window == 4
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["shards"][SINGLE] = "0" * 64
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=re.escape(str(copy / SINGLE)) + ".*sha256"):
        tf.AutoModelForCausalLM.from_pretrained(copy, trust_remote_code=True)
    tf.AutoModelForCausalLM.from_pretrained(copy, trust_remote_code=True, verify=False)


def _remote_code_folder(copy: Path) -> Path:
    import json

    from dms_megatron.hf import install_remote_code

    config = json.loads((copy / "config.json").read_text())
    config["dms"] = {"variant": "neuron", "decisions_per": "head", "window": 4}
    config["dms"] |= {"logit_scale": 100.0, "logit_offset": 5.0}
    (copy / "config.json").write_text(json.dumps(config))
    install_remote_code(copy)
    return copy


def test_remote_code_refuses_non_finite_weights_unless_verify_is_off(copy) -> None:
    import transformers as tf

    folder = _remote_code_folder(copy)
    tensors = load_file(folder / SINGLE)
    name = "model.layers.0.self_attn.o_proj.weight"
    tensors[name][0, 1] = float("nan")
    save_file(tensors, folder / SINGLE, metadata={"format": "pt"})
    from dms_megatron.convert.hf_io import MANIFEST

    (folder / MANIFEST).unlink()  # the hash check would fail first; this is the NaN scan alone
    with pytest.raises(ValueError, match=re.escape(repr(name)) + " holds 1 NaN/Inf"):
        tf.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    tf.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, verify=False)


def test_remote_code_checks_a_hub_download_in_the_cache(copy, tmp_path, monkeypatch) -> None:
    """A repository id resolved from the hub cache (offline): its shard is checked against the manifest."""
    import transformers as tf

    folder = _remote_code_folder(copy)
    cache = tmp_path / "hub"
    repo = cache / "models--acme--tiny-dms"
    snapshot = repo / "snapshots" / ("a" * 40)
    shutil.copytree(folder, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = tf.AutoModelForCausalLM.from_pretrained("acme/tiny-dms", trust_remote_code=True, cache_dir=cache)
    assert model.dms.window == 4
    shard = snapshot / SINGLE
    data = bytearray(shard.read_bytes())
    data[-1] = 0x3F if data[-1] != 0x3F else 0x3E  # still finite: only the hash can tell
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=re.escape(str(shard)) + ".*sha256"):
        tf.AutoModelForCausalLM.from_pretrained("acme/tiny-dms", trust_remote_code=True, cache_dir=cache)
