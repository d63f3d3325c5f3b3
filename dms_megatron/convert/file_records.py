"""A record of a checkpoint folder's files (size of each, sha256 of the small ones), written when the
folder is complete and checked before the folder is used.

Megatron's distributed checkpoints hold one large ``*.distcp`` file per writer plus small pickled files
(``.metadata``, ``common.pt``). Sizes catch a truncated or missing file at no cost; the sha256 of every
file up to ``HASH_LIMIT`` also catches a modified pickled file before torch unpickles it. Hashing the large
files would cost minutes per save at 32B scale, so they are checked by size only.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from dms_megatron.convert.hf_io import sha256_file

log = logging.getLogger(__name__)
FILE_RECORD = "checkpoint_files.json"
HASH_LIMIT = 64 << 20
FORMAT = 1


class CorruptCheckpointError(ValueError):
    """A checkpoint folder's files differ from the record written when it was saved."""


def _files(folder: Path, skip: set[str]) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() not in skip
    )


def record_files(folder: str | os.PathLike, skip: tuple[str, ...] = (), hash_limit: int = HASH_LIMIT) -> Path:
    """Write ``FILE_RECORD`` in ``folder`` listing every file (but ``skip``): its size, and its sha256 when
    it is at most ``hash_limit`` bytes. Call it once the folder's files are all written."""
    folder = Path(folder)
    entries: dict[str, dict[str, int | str]] = {}
    for path in _files(folder, {FILE_RECORD, *skip}):
        size = path.stat().st_size
        entry: dict[str, int | str] = {"size": size}
        if size <= hash_limit:
            entry["sha256"] = sha256_file(path)
        entries[path.relative_to(folder).as_posix()] = entry
    out = folder / FILE_RECORD
    tmp = folder / f".{FILE_RECORD}.tmp"
    tmp.write_text(json.dumps({"format": FORMAT, "files": entries}, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, out)
    return out


def file_problems(folder: str | os.PathLike) -> list[str] | None:
    """What differs between ``folder`` and its ``FILE_RECORD`` (empty: nothing); None without a record."""
    folder = Path(folder)
    path = folder / FILE_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        entries = record["files"]
        if record.get("format") != FORMAT or not isinstance(entries, dict):
            raise ValueError(f"format {record.get('format')!r}")
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        return [f"{path}: not a readable file record ({exc})"]
    problems = []
    for rel, entry in entries.items():
        file = folder / rel
        if not file.is_file():
            problems.append(f"{file}: missing")
            continue
        size = file.stat().st_size
        if size != entry.get("size"):
            problems.append(f"{file}: {size} bytes, {entry.get('size')} when saved (truncated or replaced)")
        elif "sha256" in entry and sha256_file(file) != entry["sha256"]:
            problems.append(f"{file}: sha256 differs from the one recorded at save (modified or corrupted)")
    return problems


def check_files(folder: str | os.PathLike) -> bool:
    """Raise ``CorruptCheckpointError`` listing every file of ``folder`` that differs from its record.
    True when checked, False when the folder has no record (saved by an older version: not checked)."""
    problems = file_problems(folder)
    if problems is None:
        log.info("%s has no %s (an older save): its files are not checked", folder, FILE_RECORD)
        return False
    if problems:
        listed = "\n  ".join(problems)
        raise CorruptCheckpointError(f"checkpoint {folder} is damaged:\n  {listed}")
    return True
