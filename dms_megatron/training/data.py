"""Training data: text / JSONL -> Megatron indexed datasets (``PREFIX.bin`` / ``PREFIX.idx``), tokenised
with the model's tokenizer, one document per file or JSONL record, end-of-document token appended.

A sidecar ``PREFIX.json`` records the tokenizer, its vocabulary size, EOS id and identity (sha256 of
its sorted token -> id vocabulary), and counts, so the trainer can refuse a dataset made for another
model before any GPU work (``check_dataset``, ``check_dataset_tokenizer``).

Inputs are refused with their file (and JSONL line) named: binary files (NUL bytes or mostly control
bytes), text that is not UTF-8 (unless an explicit ``encoding`` is given), JSONL lines that are not JSON
objects with a string text field.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py")
MAX_CONTROL_FRACTION = 0.1  # more control bytes than this (besides tab, newline, CR, FF): binary
_TEXT_CONTROLS = frozenset(b"\t\n\r\f")


@dataclass
class DatasetInfo:
    """Contents of ``PREFIX.json``."""

    tokenizer: str
    vocab_size: int
    eos_token_id: int
    num_documents: int
    num_tokens: int
    skipped_empty: int
    dtype: str
    sources: list[str]
    tokenizer_sha256: str | None = None  # absent in datasets written before it was recorded


def _decode(data: bytes, where: str, encoding: str | None) -> str:
    """Strict UTF-8 (or ``encoding`` when given); a ``ValueError`` naming ``where`` otherwise."""
    try:
        return data.decode(encoding or "utf-8")
    except UnicodeDecodeError as e:
        hint = "" if encoding else " (pass --encoding, e.g. latin-1, to decode it)"
        raise ValueError(f"{where}: not {encoding or 'UTF-8'} text (byte {e.start}){hint}") from None


def _refuse_binary(data: bytes, path: Path, encoding: str | None) -> None:
    """A ``ValueError`` for NUL bytes or mostly control bytes (UTF-16/32 text has NULs: not checked)."""
    if encoding and encoding.lower().replace("-", "").startswith(("utf16", "utf32")):
        return
    if b"\0" in data:
        raise ValueError(f"{path}: binary file (NUL bytes), not text")
    controls = sum(1 for b in data if (b < 0x20 and b not in _TEXT_CONTROLS) or b == 0x7F)
    if data and controls / len(data) > MAX_CONTROL_FRACTION:
        raise ValueError(f"{path}: binary file ({controls / len(data):.0%} control bytes), not text")


def iter_documents(
    inputs: Iterable[str | os.PathLike], json_key: str = "text", encoding: str | None = None
) -> Iterator[tuple[str, str]]:
    """Yield ``(source, text)``: whole text files, JSONL records (``json_key``), or files under folders.
    Text must be UTF-8 unless ``encoding`` is given; binary files and malformed JSONL lines are
    ``ValueError``s naming the file and line."""
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files = sorted(
                p for p in path.rglob("*") if p.is_file() and p.suffix in (*TEXT_SUFFIXES, ".jsonl")
            )
            yield from iter_documents(files, json_key, encoding)
        elif not path.is_file():
            raise ValueError(f"input {path} does not exist")
        elif path.suffix == ".jsonl":
            with open(path, "rb") as f:
                for line_no, raw in enumerate(f, 1):
                    line = _decode(raw, f"{path}:{line_no}", encoding)
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
                    if not isinstance(record, dict):
                        raise ValueError(
                            f"{path}:{line_no}: a JSON {type(record).__name__}, not an object with a "
                            f"{json_key!r} field"
                        )
                    if not isinstance(record.get(json_key), str):
                        raise ValueError(f"{path}:{line_no}: no string field {json_key!r} (use --json-key)")
                    yield f"{path}:{line_no}", record[json_key]
        else:
            data = path.read_bytes()
            _refuse_binary(data, path, encoding)
            yield str(path), _decode(data, str(path), encoding)


def config_eos_token_id(hf_config: dict) -> int | None:
    """The EOS id of an HF ``config.json`` (the first one when it lists several), or None."""
    eos = hf_config.get("eos_token_id")
    return int(eos[0]) if isinstance(eos, list) else (None if eos is None else int(eos))


def vocabulary_sha256(tokenizer: Any) -> str:
    """The tokenizer's identity: sha256 of its vocabulary (token -> id, sorted by token, as JSON)."""
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()


@functools.lru_cache(maxsize=4)
def tokenizer_sha256(tokenizer_dir: str | os.PathLike) -> str:
    """``vocabulary_sha256`` of the tokenizer in an HF folder (cached per folder)."""
    from transformers import AutoTokenizer

    return vocabulary_sha256(AutoTokenizer.from_pretrained(Path(tokenizer_dir)))


def load_tokenizer(
    tokenizer_dir: str | os.PathLike,
) -> tuple[Callable[[str], list[int]], int, int, str, str]:
    """(encode, vocab_size, eos_token_id, name, vocabulary_sha256). EOS comes from ``config.json`` when
    present: some converted tokenizers name another token as ``eos_token`` (SmolLM2: config says 2,
    tokenizer 1)."""
    from transformers import AutoTokenizer

    path = Path(tokenizer_dir)
    tok = AutoTokenizer.from_pretrained(path)
    eos = tok.eos_token_id
    cfg_path = path / "config.json"
    if cfg_path.is_file():
        cfg_eos = config_eos_token_id(json.loads(cfg_path.read_text()))
        eos = cfg_eos if cfg_eos is not None else eos
    if eos is None:
        raise ValueError(f"{path}: no eos_token_id in config.json or the tokenizer")
    vocab = len(tok)

    def encode(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    return encode, vocab, int(eos), str(path.resolve()), vocabulary_sha256(tok)


def preprocess(
    inputs: Iterable[str | os.PathLike],
    tokenizer_dir: str | os.PathLike,
    output_prefix: str | os.PathLike,
    json_key: str = "text",
    progress: Callable[[int], None] | None = None,
    encoding: str | None = None,
) -> DatasetInfo:
    """Tokenise every document and write ``PREFIX.{bin,idx,json}`` (atomically: temp names, then rename).
    ``encoding``: decode inputs with it instead of strict UTF-8."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    encode, vocab, eos, name, vocab_sha256 = load_tokenizer(tokenizer_dir)
    prefix = Path(output_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    dtype = DType.optimal_dtype(vocab)
    tmp = prefix.with_name(f".{prefix.name}.partial")
    builder = IndexedDatasetBuilder(str(tmp) + ".bin", dtype=dtype)
    n_docs = n_tokens = skipped = 0
    sources: set[str] = set()
    try:
        for source, text in iter_documents(inputs, json_key, encoding):
            ids = encode(text)
            if not ids:
                skipped += 1
                continue
            ids.append(eos)
            builder.add_document(torch.tensor(ids, dtype=torch.int64), [len(ids)])
            n_docs, n_tokens = n_docs + 1, n_tokens + len(ids)
            sources.add(source.split(":")[0])
            if progress is not None:
                progress(len(ids))
    except ValueError:  # a refused input: no partial files left behind
        builder.finalize(str(tmp) + ".idx")
        for suffix in (".bin", ".idx"):
            Path(str(tmp) + suffix).unlink(missing_ok=True)
        raise
    if n_docs == 0:
        builder.finalize(str(tmp) + ".idx")
        for suffix in (".bin", ".idx"):
            Path(str(tmp) + suffix).unlink(missing_ok=True)
        raise ValueError(f"no non-empty documents in {list(map(str, inputs))}: nothing to train on")
    builder.finalize(str(tmp) + ".idx")
    info = DatasetInfo(
        name, vocab, eos, n_docs, n_tokens, skipped, np.dtype(dtype).name, sorted(sources), vocab_sha256
    )
    Path(str(tmp) + ".json").write_text(json.dumps(asdict(info), indent=2) + "\n")
    for suffix in (".bin", ".idx", ".json"):
        os.replace(str(tmp) + suffix, str(prefix) + suffix)
    return info


def check_dataset(prefix: str | os.PathLike, vocab_size: int, eos_token_id: int | None = None) -> DatasetInfo:
    """Refuse a dataset that does not fit the model: missing files, empty, tokenizer vocabulary larger
    than the model's, token ids out of range, or another EOS id. Cheap: one memory-mapped max."""
    prefix = Path(prefix)
    for suffix in (".bin", ".idx", ".json"):
        if not Path(str(prefix) + suffix).is_file():
            raise ValueError(f"dataset {prefix}: {prefix.name}{suffix} is missing (run launch/preprocess.py)")
    info = DatasetInfo(**json.loads(Path(str(prefix) + ".json").read_text()))
    if info.num_tokens == 0:
        raise ValueError(f"dataset {prefix} is empty")
    if info.vocab_size > vocab_size:
        raise ValueError(
            f"dataset {prefix} was tokenised with a {info.vocab_size}-token vocabulary ({info.tokenizer}) "
            f"but the model has {vocab_size}: tokenizer/model mismatch"
        )
    if eos_token_id is not None and info.eos_token_id != eos_token_id:
        raise ValueError(
            f"dataset {prefix} ends documents with id {info.eos_token_id}, the model's EOS is {eos_token_id}"
        )
    data = np.memmap(str(prefix) + ".bin", dtype=np.dtype(info.dtype), mode="r")
    top = int(data.max()) if data.size else -1
    if top >= vocab_size:
        raise ValueError(
            f"dataset {prefix} holds token id {top}, out of range for a {vocab_size}-token model"
        )
    return info


def check_dataset_tokenizer(prefix: str | os.PathLike, tokenizer_path: str | os.PathLike) -> bool:
    """Refuse a dataset tokenised with another tokenizer than the one in ``tokenizer_path`` (an HF
    folder): compares the ``tokenizer_sha256`` recorded in ``PREFIX.json``. False when the dataset
    predates the record (nothing to compare), True when it matches. The trainer's preflight calls it
    with ``model.hf_path``, next to ``check_dataset``."""
    meta = Path(str(prefix) + ".json")
    if not meta.is_file():
        raise ValueError(f"dataset {prefix}: {meta.name} is missing (run launch/preprocess.py)")
    recorded = json.loads(meta.read_text()).get("tokenizer_sha256")
    if recorded is None:
        return False
    actual = tokenizer_sha256(tokenizer_path)
    if actual != recorded:
        raise ValueError(
            f"dataset {prefix} was tokenised with another tokenizer ({meta} records vocabulary sha256 "
            f"{recorded[:12]}, {tokenizer_path} has {actual[:12]}): re-run launch/preprocess.py"
        )
    return True


def write_token_documents(
    prefix: str | os.PathLike, documents: Iterable[list[int]], vocab_size: int, eos_token_id: int, name: str
) -> DatasetInfo:
    """Write already-tokenised documents (EOS appended to each) as an indexed dataset with its sidecar;
    for synthetic data and tests."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    dtype = DType.optimal_dtype(vocab_size)
    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=dtype)
    n_docs = n_tokens = 0
    for doc in documents:
        ids = [*doc, eos_token_id]
        builder.add_document(torch.tensor(ids, dtype=torch.int64), [len(ids)])
        n_docs, n_tokens = n_docs + 1, n_tokens + len(ids)
    builder.finalize(str(prefix) + ".idx")
    info = DatasetInfo(name, vocab_size, eos_token_id, n_docs, n_tokens, 0, np.dtype(dtype).name, [name])
    Path(str(prefix) + ".json").write_text(json.dumps(asdict(info), indent=2) + "\n")
    return info
