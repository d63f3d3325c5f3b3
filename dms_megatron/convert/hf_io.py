"""Reading and writing Hugging Face safetensors folders, tensor by tensor (torch + safetensors only)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
MANIFEST = "dms_megatron_manifest.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "generation_config.json",
)
IGNORED_HF_TENSORS = ("rotary_emb.inv_freq",)


class HFReader:
    """Lazy access to the tensors of an HF folder (single file or sharded with an index)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise ValueError(f"{self.path} is not a Hugging Face model folder (no config.json)")
        self.config: dict[str, Any] = json.loads((self.path / "config.json").read_text())
        self._handles: dict[str, Any] = {}
        if (self.path / INDEX).is_file():
            weight_map = json.loads((self.path / INDEX).read_text())["weight_map"]
        elif (self.path / SINGLE).is_file():
            weight_map = dict.fromkeys(self._handle(SINGLE).keys(), SINGLE)
        else:
            raise ValueError(f"{self.path} has neither {SINGLE} nor {INDEX}")
        self.weight_map: dict[str, str] = weight_map

    def names(self) -> list[str]:
        return sorted(n for n in self.weight_map if not n.endswith(IGNORED_HF_TENSORS))

    def _handle(self, file: str) -> Any:
        if file not in self._handles:
            fp = self.path / file
            if not fp.is_file():
                raise ValueError(f"shard {fp} listed in the index is missing")
            try:
                self._handles[file] = safe_open(fp, "pt")
            except SafetensorError as exc:
                raise ValueError(f"{fp}: not a readable safetensors file ({exc})") from None
        return self._handles[file]

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape from the safetensors header (no data read)."""
        if name not in self.weight_map:
            raise KeyError(f"tensor {name!r} not found in {self.path}")
        return tuple(self._handle(self.weight_map[name]).get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise KeyError(f"tensor {name!r} not found in {self.path}")
        file = self.weight_map[name]
        try:
            return self._handle(file).get_tensor(name)
        except SafetensorError as exc:
            raise ValueError(f"{self.path / file}: tensor {name!r} is unreadable ({exc})") from None

    def close(self) -> None:
        self._handles.clear()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_manifest(folder: str | os.PathLike) -> bool:
    """Check every shard against the sha256 the export recorded in ``MANIFEST``; a mismatch or a
    missing shard is a ``ValueError`` naming the file. False when the folder has no manifest."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        return False
    try:
        shards = json.loads(path.read_text())["shards"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a readable manifest ({exc})") from None
    for name, want in shards.items():
        shard = folder / name
        if not shard.is_file():
            raise ValueError(f"{shard}: listed in {MANIFEST} but missing")
        if sha256_file(shard) != want:
            raise ValueError(
                f"{shard}: sha256 differs from {MANIFEST} (corrupted or modified; verify=False / "
                "--no-verify skips the check)"
            )
    return True


def check_finite(name: str, tensor: torch.Tensor) -> None:
    """Refuse a floating-point weight holding NaN or Inf (``ValueError`` naming the tensor)."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(f"weight {name!r} holds {bad} NaN/Inf values")


def write_shard(path: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def write_index(folder: Path, weight_map: dict[str, str], total_size: int) -> None:
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def prepare_output(path: str | os.PathLike, force: bool) -> tuple[Path, Path]:
    """Return (final, staging) folders. Refuses a non-empty final folder unless ``force``."""
    final = Path(path)
    if final.exists() and (not final.is_dir() or any(final.iterdir())) and not force:
        raise FileExistsError(f"output {final} exists and is not empty; pass --force to overwrite it")
    staging = final.parent / f".{final.name}.partial"
    return final, staging


def publish(staging: Path, final: Path) -> None:
    """Atomically move a complete staging folder into place (replacing ``final`` if forced)."""
    if final.exists():
        old = final.parent / f".{final.name}.old"
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
        staging.rename(final)
        shutil.rmtree(old)
    else:
        staging.rename(final)


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)
