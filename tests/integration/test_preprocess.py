"""Text/JSONL -> Megatron indexed dataset with the SmolLM2 tokenizer, and the dataset-vs-model checks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
SMOL = ROOT / "assets" / "smollm2-135m-instruct"
pytestmark = pytest.mark.skipif(not (SMOL / "tokenizer.json").is_file(), reason="run `make assets`")


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("The capital of France is Paris.")
    (root / "sub" / "b.py").write_text("def f(x):\n    return x + 1\n")
    (root / "empty.md").write_text("")
    (root / "c.jsonl").write_text(
        json.dumps({"text": "Water boils at 100 degrees."}) + "\n\n" + json.dumps({"text": "Hello"}) + "\n"
    )
    return root


def test_preprocess_round_trips_through_megatrons_reader(corpus, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from transformers import AutoTokenizer

    from dms_megatron.training.data import check_dataset, preprocess

    prefix = tmp_path / "out" / "corpus"
    info = preprocess([corpus], SMOL, prefix)
    assert (info.num_documents, info.skipped_empty, info.eos_token_id, info.vocab_size) == (4, 1, 2, 49152)
    assert info.dtype == "uint16"  # 49,152 ids fit
    ds = IndexedDataset(str(prefix))
    tok = AutoTokenizer.from_pretrained(SMOL)
    texts = [
        "The capital of France is Paris.",
        "Water boils at 100 degrees.",
        "Hello",
        "def f(x):\n    return x + 1\n",
    ]
    docs = [ds[i].tolist() for i in range(len(ds))]
    want = sorted(tok(t, add_special_tokens=False)["input_ids"] + [2] for t in texts)
    assert sorted(docs) == want  # every document, EOS (config's id 2) appended
    assert info.num_tokens == sum(map(len, want))
    assert check_dataset(prefix, vocab_size=49152, eos_token_id=2).num_documents == 4
    assert not list(prefix.parent.glob(".*partial*"))


def test_dataset_model_mismatches_are_refused(corpus, tmp_path):
    from dms_megatron.training.data import check_dataset, preprocess

    prefix = tmp_path / "corpus"
    preprocess([corpus], SMOL, prefix)
    with pytest.raises(ValueError, match="tokenizer/model mismatch"):
        check_dataset(prefix, vocab_size=32000)
    with pytest.raises(ValueError, match="EOS is 0"):
        check_dataset(prefix, vocab_size=49152, eos_token_id=0)
    data = np.memmap(str(prefix) + ".bin", dtype=np.uint16, mode="r+")
    data[3] = 60000  # corrupt one token id
    data.flush()
    del data
    with pytest.raises(ValueError, match="token id 60000, out of range"):
        check_dataset(prefix, vocab_size=49152)
    with pytest.raises(ValueError, match="missing"):
        check_dataset(tmp_path / "nope", vocab_size=49152)


def test_cli_errors_and_success(corpus, tmp_path):
    from dms_megatron.cli.preprocess import main

    common = ["--tokenizer", str(SMOL), "--quiet"]
    # the errors in this process (exit status and message as the tool gives them) ...
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "x.txt").write_text("")
    with pytest.raises(SystemExit, match="no non-empty documents"):
        main([*common, "--input", str(empty), "--output-prefix", str(tmp_path / "e")])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "x"}\n')
    with pytest.raises(SystemExit, match="no string field 'text'"):
        main([*common, "--input", str(bad), "--output-prefix", str(tmp_path / "b")])
    # ... the success through the command line
    cli = [sys.executable, str(ROOT / "launch" / "preprocess.py"), *common]

    def run(source, prefix: str) -> subprocess.CompletedProcess:
        args = [*cli, "--input", str(source), "--output-prefix", str(tmp_path / prefix)]
        return subprocess.run(args, capture_output=True, text=True, timeout=300)

    res = run(corpus, "ok")
    assert res.returncode == 0, res.stderr
    assert "4 documents" in res.stdout and "1 empty skipped" in res.stdout
