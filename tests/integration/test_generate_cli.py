"""``launch/generate.py`` on SmolLM2-135M with DMS settings (neuron variant: no extra weights), prompt,
batch and teacher modes; and the engine's memory CR on real text."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SMOL = ROOT / "assets" / "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def dms_folder(tmp_path_factory) -> Path:
    assert (SMOL / "config.json").is_file(), "run `make assets` (the test suite needs the real SmolLM2 model)"
    out = tmp_path_factory.mktemp("smol_dms")
    for f in SMOL.iterdir():
        if f.name != "config.json":
            (out / f.name).symlink_to(f)
    config = json.loads((SMOL / "config.json").read_text())
    config["dms"] = {
        "variant": "neuron",
        "decisions_per": "head",
        "window": 4,
        "logit_scale": 100.0,
        "logit_offset": 5.0,
    }
    (out / "config.json").write_text(json.dumps(config))
    return out


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "launch/generate.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


def test_prompt_streams_text_and_cr_teacher_mode(dms_folder) -> None:
    prompt = "The capital of France is Paris. It is"
    res = _cli("--model", str(dms_folder), "--prompt", prompt, "--max-new-tokens", "6", "--no-dms")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "memory CR 1.00" in res.stdout and "tokens seen" in res.stdout  # eviction off


def test_batch_mode_writes_metrics(dms_folder, tmp_path) -> None:
    prompts = tmp_path / "p.jsonl"
    long = "In 1492, Columbus sailed across the Atlantic Ocean. " * 6
    prompts.write_text(json.dumps({"prompt": "Water boils at"}) + "\n" + json.dumps({"prompt": long}) + "\n")
    out = tmp_path / "r.jsonl"
    res = _cli(
        "--model", str(dms_folder), "--prompts-file", str(prompts), "--out", str(out), "--max-new-tokens", "4"
    )
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["error"] for r in rows] == [None, None]
    assert rows[1]["metrics"]["memory_cr"] > 1.2  # a long prompt really got compressed
    assert rows[1]["metrics"]["peak_kv_tokens"] < rows[1]["metrics"]["tokens_seen"] * 30 * 3


def test_evaluate_cli_policies_at_equal_cr(dms_folder, tmp_path) -> None:
    text = tmp_path / "held_out.txt"
    text.write_text(
        " ".join(
            f"Sentence {i}: the river flows past the mill and the miller counts {i * 7} sacks."
            for i in range(40)
        )
    )
    args = ["--model", str(dms_folder), "--text", str(text), "--out", str(tmp_path / "ev"), "--chunk", "32"]
    # H2O runs the same path as TOVA (tests/unit/test_baselines.py); two baselines keep this test short:
    # StreamingLLM at the DMS model's KV memory, TOVA at CR 2
    args += ["--policies", "teacher", "dms", "streaming_llm", "tova@2", "--ppl-lengths", "48"]
    args += ["--passkey-lengths", "40", "--depths", "0.5", "--passkey-trials", "2", "--filler", "both"]
    args += ["--vt-trials", "0", "--stride", "16"]  # variable tracking: tests/unit/test_evaluate.py
    res = subprocess.run(
        [sys.executable, "launch/evaluate.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads((tmp_path / "ev" / "results.json").read_text())
    ppl = results["tasks"]["perplexity_48"]
    assert ppl["teacher"]["kl_to_teacher"] == 0 and ppl["teacher"]["memory_cr"] == 1.0
    assert abs(ppl["tova@2"]["memory_cr"] - 2.0) < 0.3 and ppl["tova@2"]["kl_to_teacher"] > 0
    assert ppl["dms"]["memory_cr"] > 1.0
    assert abs(ppl["streaming_llm@=dms"]["memory_cr"] / ppl["dms"]["memory_cr"] - 1) < 0.03  # equal memory
    for task in ("passkey_classic_40", "passkey_text_40"):
        assert set(results["tasks"][task]) == set(ppl)
        assert results["tasks"][task]["dms"]["trials"] == 2
    assert results["timing"]["perplexity/baselines"] > 0 and "variable_tracking" not in results["tasks"]
    assert (tmp_path / "ev" / "results.png").stat().st_size > 0
    assert "| policy | memory CR @48 |" in (tmp_path / "ev" / "results.md").read_text()
