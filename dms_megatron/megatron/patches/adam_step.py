"""Resuming the distributed optimizer with torch's Adam: keep the per-parameter ``step``."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from dms_megatron.megatron.patches import Patch, apply_patch, is_applied

log = logging.getLogger(__name__)


def _keeping_step(original: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap ``DistributedOptimizer._set_main_param_and_optimizer_states`` (see
    ``keep_torch_adam_step_on_load``)."""

    def set_states(self: Any, model_param: Any, tensors: dict) -> Any:
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        state = getattr(self.optimizer, "state", {}).get(main_param, {})
        if "step" in state and "step" not in tensors:
            # upstream restored one step tensor shared by every parameter, which torch Adam increments in
            # place once per parameter: give each parameter its own copy
            state["step"] = state["step"].detach().clone()
            tensors = {**tensors, "step": state["step"]}
        return original(self, model_param, tensors)

    return set_states


KEEP_STEP = Patch(
    "megatron.core.optimizer.distrib_optimizer",
    "DistributedOptimizer._set_main_param_and_optimizer_states",
    _keeping_step,
    expected_params=("self", "model_param", "tensors"),
    remove_when="upstream skips optimizer-state keys the checkpoint does not carry",
    wraps_original=True,
)
PATCHES: tuple[Patch, ...] = (KEEP_STEP,)


def keep_torch_adam_step_on_load() -> None:
    """megatron-core 0.19.2, without Apex/TE (torch Adam keeps a tensor ``step`` per parameter): loading
    a ``fully_reshardable`` / ``fully_sharded_model_space`` optimizer checkpoint copies every tensor of the
    parameter's Adam state from the checkpoint, but the checkpoint carries ``step`` separately (restored
    from the param groups just before), so ``_set_main_param_and_optimizer_states`` raises
    ``KeyError: 'step'``. The wrapper hands it the parameter's current ``step`` (a self-copy, no-op), first
    made a per-parameter copy: upstream restores one tensor shared by all parameters, which torch Adam would
    increment once per parameter per step (wrong bias correction after a resume). Idempotent."""
    if is_applied(KEEP_STEP):
        return
    apply_patch(KEEP_STEP)
    log.info("dms_megatron: DistributedOptimizer reshardable loads keep torch Adam's per-parameter step")
