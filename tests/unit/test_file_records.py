"""The file record of a checkpoint folder: written at save, checked before use."""

from __future__ import annotations

import json

import pytest

from dms_megatron.convert.file_records import (
    FILE_RECORD,
    CorruptCheckpointError,
    check_files,
    file_problems,
    record_files,
)


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "small.bin").write_bytes(b"abc" * 10)
    (tmp_path / "big.distcp").write_bytes(b"x" * 1000)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "part.json").write_text("{}")
    (tmp_path / "train_state.json").write_text("{}")
    record_files(tmp_path, skip=("train_state.json",), hash_limit=100)
    return tmp_path


def test_record_lists_sizes_and_hashes_of_the_small_files(folder):
    files = json.loads((folder / FILE_RECORD).read_text())["files"]
    assert set(files) == {"small.bin", "big.distcp", "sub/part.json"}
    assert files["big.distcp"] == {"size": 1000}  # over hash_limit: size only
    assert files["small.bin"]["size"] == 30 and len(files["small.bin"]["sha256"]) == 64
    assert check_files(folder) is True and file_problems(folder) == []


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda f: (f / "big.distcp").write_bytes(b"x" * 999), r"big.distcp: 999 bytes, 1000 when saved"),
        (lambda f: (f / "small.bin").write_bytes(b"abd" * 10), r"small.bin: sha256 differs"),
        (lambda f: (f / "sub" / "part.json").unlink(), r"part.json: missing"),
        (lambda f: (f / FILE_RECORD).write_text("{not json"), r"not a readable file record"),
        (lambda f: (f / FILE_RECORD).write_text('{"format": 9, "files": {}}'), r"format 9"),
    ],
    ids=["truncated", "modified", "missing", "unreadable_record", "unknown_format"],
)
def test_damage_is_named(folder, damage, expected):
    damage(folder)
    with pytest.raises(CorruptCheckpointError, match=expected):
        check_files(folder)


def test_folder_without_a_record_is_not_checked(tmp_path):
    (tmp_path / "a").write_text("x")
    assert file_problems(tmp_path) is None and check_files(tmp_path) is False


def test_changed_size_of_a_file_outside_the_record_is_ignored(folder):
    (folder / "train_state.json").write_text('{"step": 3}')  # skipped at record time
    assert file_problems(folder) == []
