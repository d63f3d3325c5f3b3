"""megatron-core version gate.

dms_megatron plugs into megatron-core internals (attention forward order, schedule hooks, the aux
loss scale function added in 0.19), so it supports exactly the versions it was tested with. The
check reads package metadata only; it never imports megatron.
"""

from __future__ import annotations

from importlib import metadata

SUPPORTED_MEGATRON_CORE: tuple[str, ...] = ("0.19.2",)


class MegatronVersionError(ImportError):
    """The installed megatron-core is missing or not a version dms_megatron supports."""


def installed_megatron_core_version() -> str | None:
    try:
        return metadata.version("megatron-core")
    except metadata.PackageNotFoundError:
        return None


def check_megatron_version(installed: str | None = None) -> str:
    """Return the installed megatron-core version, or raise MegatronVersionError naming both sides."""
    version = installed_megatron_core_version() if installed is None else installed
    supported = ", ".join(SUPPORTED_MEGATRON_CORE)
    if version is None:
        raise MegatronVersionError(
            f"megatron-core is not installed; dms_megatron supports megatron-core {supported}. "
            f"Install it with: pip install megatron-core=={SUPPORTED_MEGATRON_CORE[-1]}"
        )
    if version not in SUPPORTED_MEGATRON_CORE:
        raise MegatronVersionError(
            f"megatron-core {version} is installed, but dms_megatron supports megatron-core {supported} "
            f"only (it relies on attention/schedule internals that change between releases). Install the "
            f"supported version: pip install megatron-core=={SUPPORTED_MEGATRON_CORE[-1]}"
        )
    return version
