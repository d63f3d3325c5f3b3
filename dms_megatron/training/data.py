"""Training data: text / JSONL -> Megatron indexed datasets (``PREFIX.bin`` / ``PREFIX.idx``), tokenised
with the model's tokenizer, one document per file or JSONL record, end-of-document token appended.

A sidecar ``PREFIX.json`` records the tokenizer, its vocabulary size and EOS id, and counts, so the
trainer can refuse a dataset made for another model before any GPU work (``check_dataset``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py")


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


def iter_documents(inputs: Iterable[str | os.PathLike], json_key: str = "text") -> Iterator[tuple[str, str]]:
    """Yield ``(source, text)``: whole text files, JSONL records (``json_key``), or files under folders."""
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files = sorted(
                p for p in path.rglob("*") if p.is_file() and p.suffix in (*TEXT_SUFFIXES, ".jsonl")
            )
            yield from iter_documents(files, json_key)
        elif not path.is_file():
            raise ValueError(f"input {path} does not exist")
        elif path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as f:
                for line_no, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{line_no}: not valid JSON ({e.msg})") from e
                    if json_key not in record or not isinstance(record[json_key], str):
                        raise ValueError(f"{path}:{line_no}: no string field {json_key!r} (use --json-key)")
                    yield f"{path}:{line_no}", record[json_key]
        else:
            yield str(path), path.read_text(encoding="utf-8", errors="replace")


def config_eos_token_id(hf_config: dict) -> int | None:
    """The EOS id of an HF ``config.json`` (the first one when it lists several), or None."""
    eos = hf_config.get("eos_token_id")
    return int(eos[0]) if isinstance(eos, list) else (None if eos is None else int(eos))


def load_tokenizer(tokenizer_dir: str | os.PathLike) -> tuple[Callable[[str], list[int]], int, int, str]:
    """(encode, vocab_size, eos_token_id, name). EOS comes from ``config.json`` when present: some
    converted tokenizers name another token as ``eos_token`` (SmolLM2: config says 2, tokenizer 1)."""
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

    return encode, vocab, int(eos), str(path.resolve())


def preprocess(
    inputs: Iterable[str | os.PathLike],
    tokenizer_dir: str | os.PathLike,
    output_prefix: str | os.PathLike,
    json_key: str = "text",
    progress: Callable[[int], None] | None = None,
) -> DatasetInfo:
    """Tokenise every document and write ``PREFIX.{bin,idx,json}`` (atomically: temp names, then rename)."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    encode, vocab, eos, name = load_tokenizer(tokenizer_dir)
    prefix = Path(output_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    dtype = DType.optimal_dtype(vocab)
    tmp = prefix.with_name(f".{prefix.name}.partial")
    builder = IndexedDatasetBuilder(str(tmp) + ".bin", dtype=dtype)
    n_docs = n_tokens = skipped = 0
    sources: set[str] = set()
    for source, text in iter_documents(inputs, json_key):
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
    if n_docs == 0:
        builder.finalize(str(tmp) + ".idx")
        for suffix in (".bin", ".idx"):
            Path(str(tmp) + suffix).unlink(missing_ok=True)
        raise ValueError(f"no non-empty documents in {list(map(str, inputs))}: nothing to train on")
    builder.finalize(str(tmp) + ".idx")
    info = DatasetInfo(name, vocab, eos, n_docs, n_tokens, skipped, np.dtype(dtype).name, sorted(sources))
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
