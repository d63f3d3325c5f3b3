"""Small process-level helpers shared by the launchers, the trainer and conversion (torch only)."""

from __future__ import annotations

import logging
import os
import platform
import socket
import warnings

import torch

TORCH_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# Known, harmless messages of the libraries we build on, hidden once here (each with why it is harmless).
# Shown again with DMS_SHOW_UPSTREAM_WARNINGS=1 (``launch/retrofit.py -v`` sets it).
UPSTREAM_WARNINGS: tuple[tuple[str, str], ...] = (  # (message regex, why it is harmless)
    (r".*(Apex|Transformer Engine|absl).*(not installed|installed)", "optional accelerators, absent"),
    (r"MimoModelConfig is experimental", "megatron imports its multimodal configs; we do not use them"),
    (r"full scope is deprecated", "megatron's own CUDA-graph config default, which we leave off"),
    (r"The argument order of load has been changed", "torch's checkpoint API as megatron calls it"),
    (r"torch.distributed is disabled, unavailable or", "single-process checkpoint reads (export)"),
    (r"Please use DTensor instead and we are deprecating", "megatron's dist-checkpointing format"),
    (r"The .grad attribute of a Tensor that is not a leaf", "megatron's DDP reads .grad in its hooks"),
)
UPSTREAM_LOG_RECORDS: tuple[tuple[str, str, str], ...] = (  # (logger, message text, why it is harmless)
    ("torch.utils.cpp_extension", "No CUDA runtime is found", "a CPU machine: no CUDA toolkit"),
    ("megatron.core.models.gpt.gpt_model", "GPTModel IS DEPRECATED", "a notice; supported in 0.19"),
    ("megatron.core.distributed.distributed_data_parallel", "full_param_layout not provided", "DDP does it"),
    ("megatron.core.dist_checkpointing.strategies.torch", "async save is deprecated", "sync saves use it"),
)
SHOW_UPSTREAM_ENV = "DMS_SHOW_UPSTREAM_WARNINGS"


class _DropKnown(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def quiet_upstream_noise() -> None:
    """Hide the known, harmless warnings and log records of torch and megatron listed above (nothing else),
    unless ``DMS_SHOW_UPSTREAM_WARNINGS=1``. Call before megatron is imported."""
    if os.environ.get(SHOW_UPSTREAM_ENV, "") not in ("", "0"):
        return
    for pattern, _why in UPSTREAM_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for logger, text, _why in UPSTREAM_LOG_RECORDS:
        target = logging.getLogger(logger)
        if not any(isinstance(f, _DropKnown) and f.text == text for f in target.filters):
            target.addFilter(_DropKnown(text))


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
