"""The only package that imports megatron.core: layer specs, DMS attention, TP/PP glue.

Importing it first checks that the installed megatron-core is a supported version.
"""

from dms_megatron.megatron.compat import SUPPORTED_MEGATRON_CORE, MegatronVersionError, check_megatron_version

MEGATRON_CORE_VERSION = check_megatron_version()

__all__ = [
    "MEGATRON_CORE_VERSION",
    "SUPPORTED_MEGATRON_CORE",
    "MegatronVersionError",
    "check_megatron_version",
]
