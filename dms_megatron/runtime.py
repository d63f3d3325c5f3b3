"""Small process-level helpers shared by the launchers, the trainer and conversion (torch only)."""

from __future__ import annotations

import platform
import socket
import warnings

import torch

TORCH_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def quiet_missing_accelerators() -> None:
    """Ignore megatron's import-time warnings about optional accelerators (Apex, Transformer Engine,
    absl) that are absent by design here. Call before megatron is imported."""
    warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine|absl).*(not installed|installed)")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (single-node rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def package_versions(packages: tuple[str, ...]) -> dict[str, str]:
    """Python, torch and the given distributions' versions ("not installed" when absent)."""
    from importlib import metadata

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in packages:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out
