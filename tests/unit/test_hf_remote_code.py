"""Exported DMS folders load with ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)``
(dms_megatron/hf/modeling_dms.py + core/dms_rules.py) and equal the reference (``DMSCausalLM``,
``DecodeSession``, the engine): full-sequence logits, greedy and sampled ``generate``, chunked prefill,
multi-turn, left padding, and the tokens the ``DMSCache`` physically holds per (layer, KV head).

Runs under whatever transformers is installed; CI runs it under the oldest and the newest release we
support (``make test-transformers-oldest``; docs/inference.md).
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import sys
from dataclasses import asdict

import pytest
import torch

from dms_megatron.config import DMSConfig
from dms_megatron.hf import REMOTE_FILES, install_remote_code
from dms_megatron.inference.engine import Engine, Request
from dms_megatron.inference.model import DecodeSession, DMSCausalLM
from dms_megatron.inference.paged_cache import BlockPool

tf = pytest.importorskip("transformers")
TF_RELEASE = tuple(int(x) for x in re.match(r"(\d+)\.(\d+)", tf.__version__).groups())
CACHE = "cache" if TF_RELEASE >= (5, 24) else "past_key_values"  # renamed in transformers 5.24
# before 5.2 generate makes no cache by default, and chunked prefill needs one (for every model)
CHUNKED = {} if TF_RELEASE >= (5, 2) else {"cache_implementation": "dynamic"}
# transformers 5.2.0's chunked prefill gives every chunk the positions of the prompt's last chunk (fixed
# in 5.3.0); the DMS model refuses those positions instead of computing with them
CHUNKED_PREFILL_BROKEN = TF_RELEASE == (5, 2)

V, HIDDEN, LAYERS, KV = 96, 64, 3, 2
FAMILIES = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3"}
CASES = [("adapter", "head", 4), ("adapter", "layer", 0), ("neuron", "head", 3)]


def _family_model(family: str):
    torch.manual_seed(0)
    common = dict(
        vocab_size=V,
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=KV,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        initializer_range=0.2,  # varied greedy tokens (0.1 repeats one token)
        bos_token_id=None,
        eos_token_id=None,  # generate runs the full length, like the engine without stop ids
        pad_token_id=None,
    )
    if family == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(rope_theta=10000.0, **common))
    elif family == "qwen2":  # q/k/v biases
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(rope_theta=1e6, **common))
    else:  # q_norm / k_norm, head_dim given explicitly
        model = tf.Qwen3ForCausalLM(tf.Qwen3Config(head_dim=16, rope_theta=1e6, **common))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # non-trivial biases and norm weights, so they are really exercised
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_families")
    out = {}
    for family in FAMILIES:
        model = _family_model(family)
        model.save_pretrained(root / family)
        out[family] = (model, root / family)
    return out


def _dms_config(variant: str, per: str, window: int) -> DMSConfig:
    scale, offset = (1.0, -0.5) if variant == "adapter" else (20.0, 0.0)
    return DMSConfig(
        variant=variant, decisions_per=per, window=window, logit_scale=scale, logit_offset=offset
    )


def _add_dms(folder, variant: str, per: str, window: int) -> None:
    """Write the dms block into config.json (and the adapter weights into the safetensors), like export."""
    from safetensors.torch import load_file, save_file

    if variant == "adapter":
        weights = load_file(folder / "model.safetensors")
        gen = torch.Generator().manual_seed(7)
        for i in range(LAYERS):
            prefix = f"model.layers.{i}.self_attn.dms_proj_alpha"
            weights[f"{prefix}_norm.weight"] = 1 + 0.1 * torch.randn(HIDDEN, generator=gen)
            weights[f"{prefix}.weight"] = torch.randn(KV, HIDDEN, generator=gen) * 0.3
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["dms"] = _dms_config(variant, per, window).exported_block().to_dict()
    (folder / "config.json").write_text(json.dumps(config, indent=2))


@pytest.fixture(scope="module")
def folders(bases, tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_dms")
    out = {}
    for family, (_, base) in bases.items():
        for variant, per, window in CASES:
            folder = root / f"{family}-{variant}-{per}-{window}"
            shutil.copytree(base, folder)
            _add_dms(folder, variant, per, window)
            install_remote_code(folder)
            out[(family, variant, per, window)] = folder
    return out


def _load(folder):
    return tf.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()


def _ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(seed))


def _expected_held(decisions: list[torch.Tensor], seen: int, window: int) -> list[list[int]]:
    """The last window + 1 tokens plus every older token whose successor's decision was keep."""
    return [
        [sum(1 for p in range(seen) if p >= seen - 1 - window or not dec[h, p + 1]) for h in range(KV)]
        for dec in decisions
    ]


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize(("variant", "per", "window"), CASES)
def test_logits_generate_and_held_tokens_equal_the_reference(folders, family, variant, per, window) -> None:
    folder = folders[(family, variant, per, window)]
    model = _load(folder)
    assert type(model).__name__ == f"DMS{FAMILIES[family]}ForCausalLM"
    assert type(model.config).__name__ == f"{FAMILIES[family]}Config"  # AutoConfig still gives the family
    ref = DMSCausalLM.from_pretrained(folder)
    prompt = _ids(24, seed=2)
    dense, _ = ref.forward_dense(prompt)
    with torch.no_grad():
        no_cache = model(prompt[None], use_cache=False)
        cached = model(prompt[None], output_hidden_states=True)
    assert getattr(no_cache, CACHE) is None
    assert type(getattr(cached, CACHE)).__name__ == "DMSCache"
    assert len(cached.hidden_states) == LAYERS + 1  # transformers' own model loop runs
    torch.testing.assert_close(no_cache.logits[0], dense, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cached.logits[0], dense, atol=1e-4, rtol=1e-4)

    out = model.generate(prompt[None], max_new_tokens=20, do_sample=False, return_dict_in_generate=True)
    engine = Engine(ref, num_blocks=LAYERS * KV * 16, block_size=4)
    result = engine.generate([Request(prompt.tolist(), max_new_tokens=20)])[0]
    assert result.error is None
    assert out.sequences[0, 24:].tolist() == result.tokens

    seen = out.sequences.shape[1] - 1  # the last generated token is never fed back
    _, decisions = ref.forward_dense(out.sequences[0, :seen])
    rate = torch.stack(decisions).float()[:, :, 1:].mean().item()
    assert 0.2 < rate < 0.9, rate  # mixed decisions: eviction really happens
    cache = getattr(out, CACHE)
    assert type(cache).__name__ == "DMSCache"
    assert cache.get_seq_length() == seen
    assert (cache.tokens_seen() == seen).all()
    held = cache.tokens_held()[:, 0]  # [layer, KV head] of the one batch row
    assert held.tolist() == _expected_held(decisions, seen, window)
    assert held.tolist() == result.metrics["tokens_held"]
    assert (held < seen).all() and held.sum() < 0.8 * seen * LAYERS * KV
    assert sum(cache.storage_tokens()) < seen * LAYERS  # the padded storage shrank too
    assert cache.stream_cr_mean() >= cache.memory_cr() > 1.2
    assert cache.memory_cr() == pytest.approx(seen * LAYERS * KV / held.sum().item())


@pytest.mark.parametrize(("variant", "per", "window"), [CASES[0], CASES[2]])
def test_chunked_prefill_and_multi_turn_equal_the_reference(folders, variant, per, window) -> None:
    folder = folders[("qwen3", variant, per, window)]
    model = _load(folder)
    ref = DMSCausalLM.from_pretrained(folder)
    ids = _ids(50, seed=3)
    dense, _ = ref.forward_dense(ids)
    cache = None
    parts = []
    with torch.no_grad():
        for a, b in [(0, 7), (7, 8), (8, 9), (9, 30), (30, 31), (31, 50)]:  # prefill, decode, a new turn
            out = model(ids[None, a:b], **{CACHE: cache})
            cache = getattr(out, CACHE)
            parts.append(out.logits[0])
    torch.testing.assert_close(torch.cat(parts), dense, atol=1e-4, rtol=1e-4)

    # two generate turns on one cache (chunked prefill in the first) vs DecodeSession
    first, second = ids[:20], ids[20:31]
    kwargs = dict(max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    if CHUNKED_PREFILL_BROKEN:
        with pytest.raises(ValueError, match=r"transformers 5\.2\.0"):
            model.generate(first[None], prefill_chunk_size=6, **CHUNKED, **kwargs)
        return
    turn1 = model.generate(first[None], prefill_chunk_size=6, **CHUNKED, **kwargs)
    full = torch.cat([turn1.sequences[0], second])
    cache = getattr(turn1, CACHE)  # turn 2 continues it (the same object)
    turn2 = model.generate(full[None], **{CACHE: cache}, **kwargs)
    assert getattr(turn2, CACHE) is cache
    session = DecodeSession(ref, BlockPool(LAYERS * KV * 20, 4, ref.d))
    expect, pending = [], first.tolist()
    for _ in range(2):
        logits = session.prefill(pending, chunk_size=5)[-1]
        for i in range(6):
            expect.append(int(logits.argmax()))
            if i < 5:
                logits = session.step(expect[-1])
        pending = [expect[-1], *second.tolist()]
    assert turn1.sequences[0, 20:].tolist() == expect[:6]
    assert turn2.sequences[0, len(full) :].tolist() == expect[6:]
    assert cache.tokens_held()[:, 0].tolist() == session.held().tolist()  # both after the two turns


@pytest.mark.parametrize("chunk", [None, 5])
def test_left_padded_batch_equals_one_prompt_at_a_time(folders, chunk) -> None:
    window = 4
    folder = folders[("llama", "adapter", "head", window)]
    model = _load(folder)
    ref = DMSCausalLM.from_pretrained(folder)
    long, short = _ids(24, seed=4), _ids(13, seed=5)
    batch = torch.zeros(2, 24, dtype=torch.long)
    mask = torch.zeros(2, 24, dtype=torch.long)
    batch[0], mask[0] = long, 1
    batch[1, 11:], mask[1, 11:] = short, 1
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    if chunk is not None:
        kwargs.update(prefill_chunk_size=chunk, **CHUNKED)
        if CHUNKED_PREFILL_BROKEN:
            with pytest.raises(ValueError, match=r"transformers 5\.2\.0"):
                model.generate(batch, attention_mask=mask, **kwargs)
            return
    out = model.generate(batch, attention_mask=mask, **kwargs)
    engine = Engine(ref, num_blocks=2 * LAYERS * KV * 16, block_size=4)
    results = engine.generate([Request(p.tolist(), max_new_tokens=12) for p in (long, short)])
    assert out.sequences[:, 24:].tolist() == [r.tokens for r in results]
    cache = getattr(out, CACHE)
    assert cache.tokens_seen()[0, :, 0].tolist() == [24 + 11, 13 + 11]  # pad tokens are never stored
    for row, (prompt, result) in enumerate(zip((long, short), results, strict=True)):
        seq = torch.cat([prompt, torch.tensor(result.tokens[:-1])])
        _, decisions = ref.forward_dense(seq)
        assert cache.tokens_held()[:, row].tolist() == _expected_held(decisions, len(seq), window)
        assert cache.tokens_held()[:, row].tolist() == result.metrics["tokens_held"]


def test_sampling_follows_the_reference_logits(folders) -> None:
    """Sampled tokens differ from any other sampler's, so check what decides them: every step's logits
    equal the dense oracle's on the sampled sequence, and the cache holds what the decisions predict."""
    window = 3
    folder = folders[("qwen2", "neuron", "head", window)]
    model = _load(folder)
    ref = DMSCausalLM.from_pretrained(folder)
    prompt = _ids(17, seed=9)
    torch.manual_seed(0)
    out = model.generate(
        prompt[None], max_new_tokens=16, do_sample=True, top_k=30, temperature=1.3,
        output_logits=True, return_dict_in_generate=True,
    )  # fmt: skip
    seq = out.sequences[0]
    assert (
        seq[17:].tolist() != model.generate(prompt[None], max_new_tokens=16, do_sample=False)[0, 17:].tolist()
    )
    dense, decisions = ref.forward_dense(seq[:-1])
    torch.testing.assert_close(torch.stack(out.logits)[:, 0], dense[16:], atol=1e-4, rtol=1e-4)
    held = getattr(out, CACHE).tokens_held()[:, 0].tolist()
    assert held == _expected_held(decisions, len(seq) - 1, window)
    engine = Engine(ref, num_blocks=LAYERS * KV * 16, block_size=4)  # the engine on the sampled sequence
    (result,) = engine.generate([Request(seq[:-1].tolist(), max_new_tokens=1)])
    assert result.error is None and result.metrics["tokens_held"] == held


def test_without_dms_block_the_model_is_the_original(bases, tmp_path) -> None:
    plain, base = bases["llama"]
    folder = tmp_path / "plain"
    shutil.copytree(base, folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_dms.DMSLlamaForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    for name, source in REMOTE_FILES.items():
        shutil.copyfile(source, folder / name)
    model = _load(folder)
    assert type(model).__name__ == "DMSLlamaForCausalLM"
    ids = _ids(30, seed=6)[None]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, plain(ids).logits, atol=1e-5, rtol=1e-5)
    out = model.generate(ids, max_new_tokens=10, do_sample=False, return_dict_in_generate=True)
    assert out.sequences.tolist() == plain.generate(ids, max_new_tokens=10, do_sample=False).tolist()
    assert type(getattr(out, CACHE)).__name__ == "DynamicCache"


def test_clear_errors(folders, bases) -> None:
    model = _load(folders[("llama", "neuron", "head", 3)])
    ids = _ids(8, seed=7)[None]
    with torch.no_grad():
        foreign = getattr(bases["llama"][0](ids, use_cache=True), CACHE)  # a DynamicCache holding tokens
        with pytest.raises(ValueError, match=r"needs a DMSCache .* DynamicCache \(holding tokens\)"):
            model(ids, **{CACHE: foreign})
        with pytest.raises(ValueError, match=r"needs a DMSCache .* StaticCache"):
            model.generate(ids, max_new_tokens=2, cache_implementation="static")
        with pytest.raises(ValueError, match="2D attention_mask"):
            model(ids, attention_mask=torch.ones(1, 1, 8, 8))
        with pytest.raises(ValueError, match="position_ids disagree"):
            model(ids, position_ids=torch.arange(8)[None] + 3)
        with pytest.raises(ValueError, match="output_attentions"):
            model(ids, output_attentions=True)
        with pytest.raises(ValueError, match="call the causal LM"):
            model.model(ids)
        cache = getattr(model(ids), CACHE)
        with pytest.raises(ValueError, match="holds batch 1"):
            model(torch.cat([ids, ids]), **{CACHE: cache})
    with pytest.raises(NotImplementedError, match="rolled back"):
        cache.crop(-1)


def test_transformers_version_is_checked_at_load(folders, tmp_path) -> None:
    """An unsupported transformers fails when the checkpoint loads, naming both versions."""
    module = sys.modules[type(_load(folders[("llama", "neuron", "head", 3)])).__module__]
    with pytest.raises(ImportError, match=r"needs transformers >= .* transformers 4\.30\.2 is installed"):
        module.check_transformers_version("4.30.2")
    with pytest.warns(UserWarning, match=r"transformers 99\.1\.0 is newer than the newest release"):
        module.check_transformers_version("99.1.0")
    module.check_transformers_version(tf.__version__)  # the running one is in range: silent

    folder = tmp_path / "future"  # remote code that claims a minimum above the running transformers
    shutil.copytree(folders[("llama", "neuron", "head", 3)], folder)
    code = (folder / "modeling_dms.py").read_text()
    (folder / "modeling_dms.py").write_text(
        re.sub(r'OLDEST_TRANSFORMERS = "[^"]+"', 'OLDEST_TRANSFORMERS = "98.0.0"', code)
    )
    with pytest.raises(
        ImportError, match=rf"transformers >= 98\.0\.0 .* transformers {re.escape(tf.__version__)}"
    ):
        _load(folder)


def test_install_remote_code(bases, tmp_path) -> None:
    _, base = bases["qwen2"]
    folder = tmp_path / "f"
    shutil.copytree(base, folder)
    with pytest.raises(ValueError, match="no dms block"):
        install_remote_code(folder)
    _add_dms(folder, "neuron", "head", 2)
    install_remote_code(folder)
    install_remote_code(folder)  # idempotent
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "qwen2"
    assert config["auto_map"] == {"AutoModelForCausalLM": "modeling_dms.DMSQwen2ForCausalLM"}
    for name, source in REMOTE_FILES.items():
        assert (folder / name).read_text() == source.read_text()
    config["model_type"] = "mistral"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="mistral"):
        install_remote_code(folder)


def test_export_writes_the_remote_code_and_the_block(bases, tmp_path) -> None:
    """``_finish_export`` (the last step of ``launch/convert.py export``) writes the dms block from the
    training config and installs the remote code; both loaders read the folder and agree."""
    from safetensors.torch import load_file, save_file

    from dms_megatron.convert.checkpoint import _finish_export
    from dms_megatron.families import arch_from_hf_config

    _, base = bases["llama"]
    src = tmp_path / "src"
    shutil.copytree(base, src)
    _add_dms(src, "adapter", "head", 4)
    config = json.loads((src / "config.json").read_text())
    config.pop("dms")
    staging, shard = tmp_path / ".out.partial", "model-00001-of-00001.safetensors"
    staging.mkdir()
    weights = load_file(src / "model.safetensors")
    save_file(weights, staging / shard, metadata={"format": "pt"})
    (staging / f".{shard}.names.json").write_text(json.dumps(sorted(weights)))
    dms = _dms_config("adapter", "head", 4)
    meta = {"hf_config": config, "source": {"dtype": "torch.float32", "hf_dir": None}, "dms": asdict(dms)}
    meta["trained_cr"] = 3.5
    _finish_export(staging, tmp_path / "out", meta, arch_from_hf_config(config), 1, None, tmp_path)
    out = tmp_path / "out"
    exported = json.loads((out / "config.json").read_text())
    assert exported["auto_map"] == {"AutoModelForCausalLM": "modeling_dms.DMSLlamaForCausalLM"}
    assert exported["model_type"] == "llama"
    assert exported["dms"] == dms.exported_block(3.5).to_dict()
    assert exported["dms"]["adapter_eps"] == dms.adapter_eps and exported["dms"]["trained_cr"] == 3.5
    model = _load(out)
    ids = _ids(20, seed=8)
    dense, _ = DMSCausalLM.from_pretrained(out).forward_dense(ids)
    with torch.no_grad():
        torch.testing.assert_close(model(ids[None]).logits[0], dense, atol=1e-4, rtol=1e-4)


def test_remote_files_import_only_torch_transformers_and_each_other() -> None:
    """They are copied into checkpoint folders and must run where dms_megatron is not installed."""
    stdlib = set(sys.stdlib_module_names)
    # huggingface_hub: a hard dependency of every transformers release (reads the hub cache)
    allowed = {"modeling_dms.py": {"torch", "transformers", "huggingface_hub"}, "dms_rules.py": {"torch"}}
    for name, source in REMOTE_FILES.items():
        found, relative = set(), set()
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                found.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level:
                relative.add(node.module)
            elif isinstance(node, ast.ImportFrom):
                found.add(node.module.split(".")[0])
        assert found - stdlib <= allowed[name], (name, found - stdlib)
        assert {f"{m}.py" for m in relative} <= set(REMOTE_FILES) - {name}, (name, relative)
