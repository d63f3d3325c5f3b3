"""The only package that imports megatron.core: layer specs, DMS attention, TP/PP glue.

Importing it first checks that the installed megatron-core is a supported version.
"""

from dms_megatron.megatron.compat import SUPPORTED_MEGATRON_CORE, MegatronVersionError, check_megatron_version

MEGATRON_CORE_VERSION = check_megatron_version()

from dms_megatron.megatron.attention import (  # noqa: E402  (after the version gate)
    DMSCoreAttention,
    DMSSelfAttention,
    DMSTransformerLayer,
    zero_repurposed_q_rows,
)
from dms_megatron.megatron.distill import DistillationStage, adjust_distill_p2p_shapes  # noqa: E402
from dms_megatron.megatron.kd import vocab_parallel_kd_loss, vocab_parallel_token_kl  # noqa: E402
from dms_megatron.megatron.pipeline import (  # noqa: E402
    DECISION_CHANNELS,
    adjust_p2p_shapes,
    attach_dms_pipeline,
    dms_compression_loss,
    dms_run_state,
    reduce_decision_stats,
)
from dms_megatron.megatron.spec import apply_dms  # noqa: E402
from dms_megatron.megatron.state import DMSRunState  # noqa: E402

__all__ = [
    "DECISION_CHANNELS",
    "MEGATRON_CORE_VERSION",
    "SUPPORTED_MEGATRON_CORE",
    "DMSCoreAttention",
    "DMSRunState",
    "DMSSelfAttention",
    "DMSTransformerLayer",
    "DistillationStage",
    "MegatronVersionError",
    "adjust_distill_p2p_shapes",
    "adjust_p2p_shapes",
    "apply_dms",
    "attach_dms_pipeline",
    "check_megatron_version",
    "dms_compression_loss",
    "dms_run_state",
    "reduce_decision_stats",
    "vocab_parallel_kd_loss",
    "vocab_parallel_token_kl",
    "zero_repurposed_q_rows",
]
