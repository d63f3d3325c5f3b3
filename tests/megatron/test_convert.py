"""HF <-> Megatron conversion: bit-exact round trips, logits parity with transformers at several TP/PP
layouts, DMS export reloaded at another layout, and clear errors on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import convert_jobs
import pytest
import torch
from runner import run_distributed

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, str(ROOT / "launch" / "convert.py")]
TOKENS = torch.randint(
    0, convert_jobs.COMMON["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0)
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {f: convert_jobs.make_tiny_hf(f, root / f) for f in ("llama", "qwen2", "qwen3")}


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args, "--quiet"], capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize(("family", "tp", "pp"), [("llama", 2, 1), ("qwen2", 1, 2), ("qwen3", 2, 2)])
def test_cli_roundtrip_is_bit_exact(tiny, tmp_path, family, tp, pp):
    res = _cli(
        "roundtrip",
        "--hf",
        str(tiny[family]),
        "--work",
        str(tmp_path),
        "--tp",
        str(tp),
        "--pp",
        str(pp),
        "--dtype",
        "fp32",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "round trip bit-exact for every tensor" in res.stdout
    out = tmp_path / "hf_export"
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == json.loads((tiny[family] / "config.json").read_text())["architectures"]
    manifest = json.loads((out / "dms_megatron_manifest.json").read_text())
    assert len(manifest["shards"]) == pp and all(len(h) == 64 for h in manifest["shards"].values())


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_logits_match_transformers(tiny, tmp_path, family):
    want = convert_jobs.hf_logits(tiny[family], TOKENS)
    # TP=1 for every family; one cross-layout check (TP=2 x PP=2) on the family with the most mapping
    # rules (q/k norms). SmolLM2 adds PP=2 and TP=3 (test_smollm2.py), Qwen2 TP=2 (sharded test).
    layouts = ((1, 1), (2, 2)) if family == "qwen3" else ((1, 1),)
    for tp, pp in layouts:
        got = run_distributed(
            convert_jobs.import_and_logits_job,
            tp * pp,
            str(tiny[family]),
            str(tmp_path / f"c{tp}{pp}"),
            tp,
            pp,
            TOKENS,
            None,
            timeout=400,
        )[0]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=f"{family} tp={tp} pp={pp}")


def test_dms_adapter_export_reloads_at_another_layout(tiny, tmp_path):
    """Import with a DMS adapter at TP=2, give the adapter non-zero weights via export/edit/import,
    then check logits (eviction active, eval: no noise) at TP=1xPP=2 equal those at TP=2."""
    dms = {
        "variant": "adapter",
        "window": 2,
        "logit_scale": 1.0,
        "logit_offset": 0.0,
        "tau": 1.0,
        "attention_backend": "reference",
    }
    ckpt = tmp_path / "ckpt"
    run_distributed(convert_jobs.import_job, 2, str(tiny["llama"]), str(ckpt), 2, 1, dms, True, timeout=300)
    exported = tmp_path / "exported"
    run_distributed(convert_jobs.export_job, 2, str(ckpt), str(exported), 2, 1, timeout=300)
    # give the adapters random weights so eviction really happens, then re-import the edited export
    from safetensors.torch import load_file, save_file

    index = json.loads((exported / "model.safetensors.index.json").read_text())["weight_map"]
    adapter = [n for n in index if "dms_proj_alpha" in n]
    assert len(adapter) == 2 * convert_jobs.COMMON["num_hidden_layers"]
    for shard in sorted(set(index.values())):
        tensors = load_file(exported / shard)
        gen = torch.Generator().manual_seed(1)
        for n in tensors:
            if n.endswith("dms_proj_alpha.weight"):
                tensors[n] = torch.randn(tensors[n].shape, generator=gen) * 0.3
        save_file(tensors, exported / shard, metadata={"format": "pt"})
    # the edit is deliberate: record the new hashes, as an export would have
    from dms_megatron.convert.hf_io import MANIFEST, sha256_file

    manifest = json.loads((exported / MANIFEST).read_text())
    manifest["shards"] = {name: sha256_file(exported / name) for name in manifest["shards"]}
    (exported / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    config = json.loads((exported / "config.json").read_text())
    assert config["dms"]["variant"] == "adapter" and config["dms"]["window"] == 2
    ckpt2 = tmp_path / "ckpt2"
    a = run_distributed(
        convert_jobs.import_and_logits_job, 2, str(exported), str(ckpt2), 2, 1, TOKENS, dms, timeout=300
    )
    b = run_distributed(convert_jobs.load_and_logits_job, 2, str(ckpt2), 1, 2, TOKENS, timeout=300)
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-5)
    # Megatron == the inference engine's plain-torch model on the exported folder (hard eviction both)
    from dms_megatron.inference.model import DMSCausalLM

    engine_model = DMSCausalLM.from_pretrained(exported)
    for row in range(TOKENS.shape[0]):
        got, decisions = engine_model.forward_dense(TOKENS[row])
        assert 0 < torch.stack(decisions)[:, :, 1:].float().mean() < 1  # eviction really happens
        torch.testing.assert_close(got, a[0][row], rtol=1e-4, atol=1e-4)
    # transformers with the exported remote code: the same logits, and generate on a left-padded batch
    # (with and without chunked prefill) gives the engine's tokens
    _check_transformers_loads_the_export(exported, a[0], engine_model)
    # and the adapter matters: a zero adapter (the teacher-equivalent start) gives other logits
    c = run_distributed(convert_jobs.load_and_logits_job, 2, str(ckpt), 2, 1, TOKENS, timeout=300)
    assert (a[0] - c[0]).abs().max() > 1e-3


def _check_transformers_loads_the_export(exported: Path, megatron_logits, engine_model) -> None:
    import transformers

    from dms_megatron.inference.engine import Engine, Request

    model = transformers.AutoModelForCausalLM.from_pretrained(exported, trust_remote_code=True).eval()
    assert type(model).__name__ == "DMSLlamaForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS).logits, megatron_logits, rtol=1e-4, atol=1e-4)
    prompts = [TOKENS[0], TOKENS[1, 4:]]  # 12 and 8 tokens: the second row is left-padded
    batch, mask = torch.zeros(2, 12, dtype=torch.long), torch.zeros(2, 12, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        batch[row, 12 - len(prompt) :], mask[row, 12 - len(prompt) :] = prompt, 1
    layers, kv = engine_model.arch.num_layers, engine_model.hkv
    engine = Engine(engine_model, num_blocks=2 * layers * kv * 16, block_size=4)
    want = [r.tokens for r in engine.generate([Request(p.tolist(), max_new_tokens=8) for p in prompts])]
    for chunk in (None, 5):
        out = model.generate(
            batch,
            attention_mask=mask,
            max_new_tokens=8,
            do_sample=False,
            pad_token_id=0,
            prefill_chunk_size=chunk,
        )
        assert out[:, 12:].tolist() == want, chunk


def test_sharded_input_and_vocab_padding(tmp_path):
    """A sharded HF folder (index + several files) with a vocabulary (95) that TP=2 must pad."""
    hf = convert_jobs.make_tiny_hf("qwen2", tmp_path / "hf", max_shard_size="40KB", vocab_size=95)
    assert (hf / "model.safetensors.index.json").is_file() and len(list(hf.glob("model-*.safetensors"))) > 2
    res = _cli("roundtrip", "--hf", str(hf), "--work", str(tmp_path / "rt"), "--tp", "2", "--dtype", "fp32")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "round trip bit-exact for every tensor" in res.stdout
    tokens = TOKENS.clamp(max=94)
    want = convert_jobs.hf_logits(hf, tokens)
    got = run_distributed(
        convert_jobs.import_and_logits_job, 2, str(hf), str(tmp_path / "c"), 2, 1, tokens, None, timeout=300
    )[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_bad_inputs_fail_clearly(tiny, tmp_path):
    # unknown architecture
    bad = tmp_path / "bad_arch"
    bad.mkdir()
    cfg = json.loads((tiny["llama"] / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"]}))
    (bad / "model.safetensors").write_bytes((tiny["llama"] / "model.safetensors").read_bytes())
    res = _cli("import", "--hf", str(bad), "--out", str(tmp_path / "o1"))
    assert res.returncode != 0 and "unsupported architecture 'GPT2LMHeadModel'" in res.stderr
    # missing and unexpected tensors are listed by name
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((tiny["llama"] / "config.json").read_text())
    tensors = load_file(tiny["llama"] / "model.safetensors")
    tensors.pop("model.layers.1.mlp.up_proj.weight")
    tensors["model.layers.9.extra.weight"] = torch.zeros(2)
    save_file(tensors, broken / "model.safetensors")
    res = _cli("import", "--hf", str(broken), "--out", str(tmp_path / "o2"))
    assert res.returncode != 0
    assert "model.layers.1.mlp.up_proj.weight" in res.stderr and "model.layers.9.extra.weight" in res.stderr
    # a tensor of the wrong shape is named with both shapes
    wrong = tmp_path / "wrong_shape"
    wrong.mkdir()
    (wrong / "config.json").write_text((tiny["llama"] / "config.json").read_text())
    tensors = load_file(tiny["llama"] / "model.safetensors")
    tensors["model.layers.2.self_attn.k_proj.weight"] = torch.zeros(16, 64)
    save_file(tensors, wrong / "model.safetensors")
    res = _cli("import", "--hf", str(wrong), "--out", str(tmp_path / "o5"))
    assert res.returncode != 0
    assert "model.layers.2.self_attn.k_proj.weight: (16, 64) (expected (32, 64))" in res.stderr
    # vocabulary mismatch between config and weights
    vocab = tmp_path / "vocab"
    vocab.mkdir()
    (vocab / "config.json").write_text(json.dumps({**cfg, "vocab_size": 100}))
    (vocab / "model.safetensors").write_bytes((tiny["llama"] / "model.safetensors").read_bytes())
    res = _cli("import", "--hf", str(vocab), "--out", str(tmp_path / "o3"))
    assert res.returncode != 0 and "vocabulary mismatch" in res.stderr
    # invalid layout names the constraint
    res = _cli("import", "--hf", str(tiny["llama"]), "--out", str(tmp_path / "o4"), "--tp", "3")
    assert res.returncode != 0 and "not divisible by tp=3" in res.stderr
    # a non-empty output folder is refused without --force, and nothing is half-written
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = _cli("import", "--hf", str(tiny["llama"]), "--out", str(out))
    assert res.returncode != 0 and "--force" in res.stderr
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert not list(tmp_path.glob(".*.partial"))


def test_interrupted_import_leaves_no_complete_looking_output(tiny, tmp_path):
    """A crash while the checkpoint is being written leaves only the hidden staging folder."""
    out = tmp_path / "ckpt"
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_distributed(convert_jobs.interrupted_import_job, 2, str(tiny["llama"]), str(out), timeout=300)
    assert not out.exists()
    staging = tmp_path / ".ckpt.partial"
    assert staging.is_dir() and not (staging / "dms_megatron.json").exists()
    # a later run with the same output cleans the stale staging folder and succeeds
    run_distributed(convert_jobs.import_job, 2, str(tiny["llama"]), str(out), 2, 1, None, False, timeout=300)
    assert (out / "dms_megatron.json").is_file() and not staging.exists()


def test_interrupted_export_leaves_no_complete_looking_output(tiny, tmp_path):
    ckpt, out = tmp_path / "ckpt", tmp_path / "export"
    run_distributed(convert_jobs.import_job, 1, str(tiny["qwen3"]), str(ckpt), 1, 1, None, False, timeout=300)
    with pytest.raises(RuntimeError, match="simulated crash during export"):
        run_distributed(convert_jobs.interrupted_export_job, 2, str(ckpt), str(out), timeout=300)
    assert not out.exists()
    staging = tmp_path / ".export.partial"
    assert staging.is_dir() and not (staging / "model.safetensors.index.json").exists()
    assert not (staging / "config.json").exists()


def test_every_norm_is_a_local_norm_with_sp_tags() -> None:
    """families.layer_spec / build_gpt_stage put LocalNorm in every norm slot (final norm and Qwen3's
    q/k norms included): torch modules with fp32 weights, tagged for the TP all-reduce under SP."""
    results = run_distributed(convert_jobs.norm_layout_job, 2)
    for got in results:
        assert got["sp"] and got["plain"], got
        for sp, names in (True, got["sp"]), (False, got["plain"]):
            assert all(kind == "RMSNorm" and dtype == "torch.float32" for kind, dtype, _ in names.values())
            assert all(tagged == sp for _, _, tagged in names.values()), names
        assert any("final_layernorm" in n for n in got["sp"]) and any("q_layernorm" in n for n in got["sp"])


def test_layer_spec_slots_hold_local_norm() -> None:
    from dms_megatron.families import load_model_preset
    from dms_megatron.megatron.families import layer_spec
    from dms_megatron.megatron.norm import LocalNorm

    spec = layer_spec(load_model_preset("debug_qwen3")[0])
    attn = spec.submodules.self_attention.submodules
    slots = (spec.submodules.input_layernorm, spec.submodules.pre_mlp_layernorm)
    assert all(s is LocalNorm for s in (*slots, attn.q_layernorm, attn.k_layernorm))


def test_non_finite_or_damaged_inputs_are_refused_by_name(tiny, tmp_path):
    """Import refuses NaN weights; export refuses a checkpoint whose files changed since the save."""
    from safetensors.torch import load_file, save_file

    from dms_megatron.convert.file_records import CorruptCheckpointError

    nan = tmp_path / "nan"
    nan.mkdir()
    (nan / "config.json").write_text((tiny["llama"] / "config.json").read_text())
    tensors = load_file(tiny["llama"] / "model.safetensors")
    tensors["model.layers.1.mlp.down_proj.weight"][0, 0] = float("inf")
    save_file(tensors, nan / "model.safetensors")
    with pytest.raises(ValueError, match=r"decoder.layers.1.mlp.linear_fc2.weight.*holds 1 NaN/Inf"):
        run_distributed(convert_jobs.import_job, 1, str(nan), str(tmp_path / "o"), 1, 1, None, False)
    ckpt = tmp_path / "ckpt"
    run_distributed(convert_jobs.import_job, 1, str(tiny["llama"]), str(ckpt), 1, 1, None, False, timeout=300)
    shard = next(ckpt.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-8])
    with pytest.raises(CorruptCheckpointError, match=rf"{shard.name}: \d+ bytes"):
        run_distributed(convert_jobs.export_job, 1, str(ckpt), str(tmp_path / "export"), 1, 1, timeout=300)
    assert not (tmp_path / "export").exists()
