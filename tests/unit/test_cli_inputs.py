"""Invalid inputs to dms-generate and dms-evaluate end in one clear ``error:`` line and a non-zero exit,
before any weights load where the input alone shows the problem (in-process ``main(argv)`` calls on a
tiny Llama with a word-level tokenizer)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dms_megatron.cli import evaluate as evaluate_cli
from dms_megatron.cli import generate as generate_cli
from dms_megatron.convert.hf_io import MANIFEST, SINGLE, sha256_file

CONTEXT = 64


def write_tiny_model(path: Path) -> Path:
    """A 2-layer Llama (context ``CONTEXT``) with a word-level tokenizer (w3 .. w95) and a manifest."""
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=CONTEXT,
        tie_word_embeddings=True,
        eos_token_id=2,
    )
    tf.LlamaForCausalLM(cfg).eval().save_pretrained(path)
    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 96)}}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = tf.PreTrainedTokenizerFast(
        tokenizer_object=word_level, unk_token="[UNK]", bos_token="<s>", eos_token="</s>"
    )
    tok.save_pretrained(path)
    (path / MANIFEST).write_text(json.dumps({"shards": {SINGLE: sha256_file(path / SINGLE)}}))
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny_cli") / "hf")


def _error(main, argv: list[str]) -> str:
    """The ``error:`` line a CLI exits with (fails the test if it exits cleanly)."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert isinstance(exc.value.code, str) and exc.value.code.startswith("error: "), exc.value.code
    return exc.value.code


def _no_input(prompt: str = "") -> str:
    raise AssertionError("the CLI fell into interactive mode")


MODES = [["--prompt", "w3 w4"], ["--prompts-file", "p.jsonl"], ["--interactive"]]


@pytest.mark.parametrize("mode", MODES, ids=["prompt", "batch", "interactive"])
@pytest.mark.parametrize(
    ("flag", "value", "says"),
    [
        ("--temperature", "-1", "--temperature"),
        ("--top-p", "2", "--top-p"),
        ("--top-p", "0", "--top-p"),
        ("--kv-budget-gib", "0", "--kv-budget-gib"),
        ("--max-new-tokens", "-1", "--max-new-tokens"),
        ("--num-blocks", "0", "--num-blocks"),
    ],
)
def test_generate_refuses_invalid_sampling_flags_in_every_mode(mode, flag, value, says, monkeypatch) -> None:
    monkeypatch.setattr("builtins.input", _no_input)
    # no model folder needed: the flags are checked before anything is read
    line = _error(generate_cli.main, ["--model", "/nonexistent", *mode, flag, value])
    assert says in line and value in line


def test_generate_empty_prompt_is_an_error_not_interactive(monkeypatch) -> None:
    monkeypatch.setattr("builtins.input", _no_input)
    assert "--prompt is empty" in _error(generate_cli.main, ["--model", "/nonexistent", "--prompt", ""])
    assert "--prompt is empty" in _error(generate_cli.main, ["--model", "/nonexistent", "--prompt", "  "])


def test_generate_prompt_beyond_the_context_is_refused_before_loading(model_dir, monkeypatch) -> None:
    def no_load(*args, **kwargs):
        raise AssertionError("weights loaded before the length check")

    monkeypatch.setattr("dms_megatron.inference.model.DMSCausalLM.from_pretrained", no_load)
    prompt = " ".join(f"w{3 + i % 90}" for i in range(CONTEXT))
    line = _error(generate_cli.main, ["--model", str(model_dir), "--prompt", prompt, "--max-new-tokens", "4"])
    assert f"model context of {CONTEXT}" in line and "config.json" in line


def test_generate_prompts_file_errors_name_file_and_line(tmp_path) -> None:
    bad = tmp_path / "p.jsonl"
    bad.write_text(json.dumps({"prompt": "w3"}) + "\n\n42\n")
    assert f"{bad}:3" in _error(generate_cli.main, ["--model", "/nonexistent", "--prompts-file", str(bad)])
    assert "no such file" in _error(
        generate_cli.main, ["--model", "/nonexistent", "--prompts-file", str(tmp_path / "missing.jsonl")]
    )


def test_generate_batch_where_every_request_failed_exits_non_zero(model_dir, tmp_path) -> None:
    long = " ".join(f"w{3 + i % 90}" for i in range(CONTEXT))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": long}) + "\n" + json.dumps({"prompt": long + " w5"}) + "\n")
    out = tmp_path / "r.jsonl"
    argv = ["--model", str(model_dir), "--prompts-file", str(prompts), "--out", str(out)]
    line = _error(generate_cli.main, [*argv, "--max-new-tokens", "4", "--device", "cpu"])
    assert "all 2 requests failed" in line
    assert [json.loads(r)["finish_reason"] for r in out.read_text().splitlines()] == ["error", "error"]


def test_generate_one_prompt_runs(model_dir, capsys) -> None:
    generate_cli.main(
        ["--model", str(model_dir), "--prompt", "w3 w4 w5", "--max-new-tokens", "3", "--device", "cpu"]
    )
    assert "tokens seen" in capsys.readouterr().out


def test_generate_checks_the_manifest_unless_no_verify(model_dir, tmp_path, capsys) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(model_dir, copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["shards"][SINGLE] = "0" * 64
    (copy / MANIFEST).write_text(json.dumps(manifest))
    argv = ["--model", str(copy), "--prompt", "w3 w4", "--max-new-tokens", "2", "--device", "cpu"]
    line = _error(generate_cli.main, argv)
    assert str(copy / SINGLE) in line and "sha256" in line
    generate_cli.main([*argv, "--no-verify"])
    assert "tokens seen" in capsys.readouterr().out


def _evaluate_argv(model: Path, tmp_path: Path, *extra: str) -> list[str]:
    text = tmp_path / "held_out.txt"
    text.write_text("w3 w4 w5 " * 100)
    return ["--model", str(model), "--text", str(text), "--out", str(tmp_path / "ev"), *extra]


@pytest.fixture
def config_only_8k(tmp_path) -> Path:
    """A folder with only a config.json of an 8K-context model: any weight loading would fail."""
    folder = tmp_path / "cfg8k"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 8192}))
    return folder


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--ppl-lengths", "9000"], "--ppl-lengths 9000 exceeds the model context of 8192"),
        (["--passkey-lengths", "8190"], "--passkey-lengths 8190 + 6 answer tokens exceeds"),
        (["--vt-length", "8192"], "--vt-length 8192 + 16 answer tokens exceeds"),
        (["--depths", "2"], "--depths must be in [0, 1], got [2.0]"),
        (["--depths", "0.5", "-0.1"], "--depths must be in [0, 1], got [-0.1]"),
        (["--passkey-trials", "0"], "--passkey-trials must be >= 1"),
        (["--vt-trials", "-1"], "--vt-trials must be >= 0"),
        (["--ppl-lengths", "0"], "--ppl-lengths must be >= 1"),
        (["--passkey-lengths", "-5"], "--passkey-lengths must be >= 1"),
        (["--vt-length", "0"], "--vt-length must be >= 1"),
        (["--chunk", "0"], "--chunk must be >= 1"),
        (["--stride", "0"], "--stride must be >= 1"),
        (["--sweep-crs", "0.5"], "--sweep-crs must be >= 1"),
    ],
)
def test_evaluate_refuses_invalid_flags_before_loading(config_only_8k, tmp_path, extra, says) -> None:
    line = _error(evaluate_cli.main, _evaluate_argv(config_only_8k, tmp_path, *extra))
    assert says in line
    assert not (tmp_path / "ev").exists()


def test_evaluate_checks_the_teacher_context_and_the_text(config_only_8k, tmp_path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    (small / "config.json").write_text(json.dumps({"max_position_embeddings": 1024}))
    line = _error(
        evaluate_cli.main,
        _evaluate_argv(config_only_8k, tmp_path, "--teacher", str(small), "--ppl-lengths", "2048"),
    )
    assert str(small / "config.json") in line
    argv = _evaluate_argv(config_only_8k, tmp_path)
    argv[argv.index("--text") + 1] = str(tmp_path / "missing.txt")
    assert "--text" in _error(evaluate_cli.main, argv)
