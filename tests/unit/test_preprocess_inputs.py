"""dms-preprocess refuses inputs that are not text with the file (and JSONL line) named, decodes other
encodings only when asked, and records the tokenizer's vocabulary sha256 that
``check_dataset_tokenizer`` compares with the model's tokenizer (in-process ``main(argv)`` calls)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from dms_megatron.cli.preprocess import main
from dms_megatron.training.data import check_dataset_tokenizer, tokenizer_sha256
from tests.unit.test_cli_inputs import write_tiny_model


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tok") / "hf")


def _run(tokenizer: Path, tmp_path: Path, *inputs: Path, extra: tuple[str, ...] = ()) -> Path:
    prefix = tmp_path / "out" / "ds"
    main(
        [
            "--input",
            *map(str, inputs),
            "--tokenizer",
            str(tokenizer),
            "--output-prefix",
            str(prefix),
            "--quiet",
            *extra,
        ]
    )
    return prefix


def _error(tokenizer: Path, tmp_path: Path, *inputs: Path, extra: tuple[str, ...] = ()) -> str:
    with pytest.raises(SystemExit) as exc:
        _run(tokenizer, tmp_path, *inputs, extra=extra)
    assert str(exc.value.code).startswith("error: ")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())  # no partial files
    return str(exc.value.code)


def test_random_bytes_are_refused(tokenizer, tmp_path) -> None:
    blob = tmp_path / "blob.txt"
    blob.write_bytes(os.urandom(4096))
    assert f"{blob}: binary file" in _error(tokenizer, tmp_path, blob)


def test_mostly_control_bytes_without_nul_are_refused(tokenizer, tmp_path) -> None:
    blob = tmp_path / "ctrl.md"
    blob.write_bytes(bytes([1, 2, 3, 4, 5, 6, 7, 8]) * 20 + b"w3 w4")
    assert f"{blob}: binary file" in _error(tokenizer, tmp_path, blob)


def test_latin1_text_needs_an_explicit_encoding(tokenizer, tmp_path) -> None:
    latin = tmp_path / "latin.txt"
    latin.write_bytes("w3 caf\u00e9 w4".encode("latin-1"))
    line = _error(tokenizer, tmp_path, latin)
    assert f"{latin}: not UTF-8 text" in line and "--encoding" in line
    assert "unknown codec" in _error(tokenizer, tmp_path, latin, extra=("--encoding", "no-such-codec"))
    prefix = _run(tokenizer, tmp_path, latin, extra=("--encoding", "latin-1"))
    assert json.loads(Path(f"{prefix}.json").read_text())["num_documents"] == 1


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ("42", "a JSON int, not an object"),
        ('"just a string"', "a JSON str, not an object"),
        ('{"content": "w3"}', "no string field 'text'"),
        ('{"text": 7}', "no string field 'text'"),
        ("{not json", "not valid JSON"),
    ],
)
def test_bad_jsonl_lines_name_file_and_line(tokenizer, tmp_path, line, says) -> None:
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(json.dumps({"text": "w3 w4"}) + "\n\n" + line + "\n")
    assert f"{jsonl}:3: {says}" in _error(tokenizer, tmp_path, jsonl)


def test_non_utf8_jsonl_names_file_and_line(tokenizer, tmp_path) -> None:
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_bytes(
        json.dumps({"text": "w3"}).encode() + b"\n" + '{"text": "caf\u00e9"}'.encode("latin-1") + b"\n"
    )
    assert f"{jsonl}:2: not UTF-8 text" in _error(tokenizer, tmp_path, jsonl)


def test_the_tokenizer_identity_is_recorded_and_checked(tokenizer, tmp_path) -> None:
    text = tmp_path / "a.txt"
    text.write_text("w3 w4 w5")
    prefix = _run(tokenizer, tmp_path, text)
    meta = json.loads(Path(f"{prefix}.json").read_text())
    assert meta["tokenizer_sha256"] == tokenizer_sha256(tokenizer)
    assert check_dataset_tokenizer(prefix, tokenizer) is True
    other = tmp_path / "other_tok"
    shutil.copytree(tokenizer, other)
    vocab = json.loads((other / "tokenizer.json").read_text())
    vocab["model"]["vocab"]["w95"], vocab["model"]["vocab"]["w94"] = 94, 95  # two ids swapped
    (other / "tokenizer.json").write_text(json.dumps(vocab))
    with pytest.raises(ValueError, match="tokenised with another tokenizer"):
        check_dataset_tokenizer(prefix, other)
    del meta["tokenizer_sha256"]  # a dataset written before the record: nothing to compare
    Path(f"{prefix}.json").write_text(json.dumps(meta))
    assert check_dataset_tokenizer(prefix, other) is False
