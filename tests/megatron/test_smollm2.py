"""The real teacher, SmolLM2-135M-Instruct (Llama, 9 q / 3 KV heads, tied embeddings): bit-exact
round trip and logits parity with transformers at TP=1, PP=2 and TP=3. The asset comes from
``make assets`` (scripts/fetch_smollm2.py); ``make test`` fetches it first."""

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
SMOL = ROOT / "assets" / "smollm2-135m-instruct"

pytestmark = pytest.mark.skipif(
    not (SMOL / "model.safetensors").is_file(), reason="SmolLM2 asset missing: run `make assets`"
)


def _tokens() -> torch.Tensor:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(SMOL)
    text = "The capital of France is Paris. It is known for the Eiffel Tower and its museums."
    return torch.tensor([tok(text)["input_ids"]])


def test_roundtrip_bit_exact_at_tp3(tmp_path):
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "launch" / "convert.py"),
            "roundtrip",
            "--hf",
            str(SMOL),
            "--work",
            str(tmp_path),
            "--tp",
            "3",
            "--dtype",
            "bf16",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "round trip bit-exact for every tensor" in res.stdout
    exported = tmp_path / "hf_export"
    assert (exported / "tokenizer.json").is_file() and (exported / "chat_template.jinja").is_file()
    assert json.loads((exported / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def test_logits_match_transformers(tmp_path):
    tokens = _tokens()
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(SMOL, dtype=torch.float32).eval()
    with torch.no_grad():
        want = hf(tokens).logits
    for tp, pp in ((1, 1), (1, 2), (3, 1)):
        got = run_distributed(
            convert_jobs.import_and_logits_job,
            tp * pp,
            str(SMOL),
            str(tmp_path / f"c{tp}{pp}"),
            tp,
            pp,
            tokens,
            None,
            timeout=600,
        )[0]
        err = (got - want).abs().max().item()
        print(
            f"SmolLM2 tp={tp} pp={pp}: max |logit diff| vs transformers = {err:.3e} "
            f"over {tokens.shape[1]} tokens"
        )
        assert err < 5e-4, f"tp={tp} pp={pp}: max |logit diff| {err:.2e}"
        assert torch.equal(got.argmax(-1), want.argmax(-1)), f"tp={tp} pp={pp}: greedy tokens differ"
