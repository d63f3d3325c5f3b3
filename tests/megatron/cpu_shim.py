"""The CPU mode the megatron tests run in: ``dms_megatron.megatron.patches.enable_cpu_training`` (the
package's opt-in CPU training mode, also used by the README demo), under the names the tests use."""

from __future__ import annotations

from dms_megatron.megatron.patches import CPUPatchTargetError as ShimTargetError
from dms_megatron.megatron.patches import CudaToCpuMode
from dms_megatron.megatron.patches import check_cpu_patch_targets as check_shim_targets
from dms_megatron.megatron.patches import cpu_training_enabled as is_installed
from dms_megatron.megatron.patches import enable_cpu_training as install_cpu_shim

__all__ = ["CudaToCpuMode", "ShimTargetError", "check_shim_targets", "install_cpu_shim", "is_installed"]
