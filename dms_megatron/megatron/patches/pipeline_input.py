"""Pipeline P2P carries the DMS decision counts as extra channels: a ``TransformerBlock`` instance's
``set_input_tensor`` splits them off (see the package docstring)."""

from __future__ import annotations

import logging
from typing import Any

from dms_megatron.megatron.patches import Patch, apply_patch

log = logging.getLogger(__name__)


def _set_input_tensor_splitting_decisions(self: Any, input_tensor: Any) -> None:
    """``TransformerBlock.set_input_tensor`` after moving the trailing decision channels of a received
    activation into the block's accumulator (``self._dms_decision_input``: accumulator, channels)."""
    from megatron.core.transformer.transformer_block import TransformerBlock

    acc, channels = self._dms_decision_input
    if isinstance(input_tensor, list | tuple):
        input_tensor = input_tensor[0]
    if input_tensor is not None and input_tensor.shape[-1] == self.config.hidden_size + channels:
        acc.acc_in = input_tensor[..., self.config.hidden_size :].float().sum(-1)
        input_tensor = input_tensor[..., : self.config.hidden_size]
    TransformerBlock.set_input_tensor(self, input_tensor)


SPLIT_INPUT = Patch(
    "megatron.core.transformer.transformer_block",
    "TransformerBlock.set_input_tensor",
    _set_input_tensor_splitting_decisions,
    expected_params=("self", "input_tensor"),
    remove_when="megatron's P2P gains a side channel for per-stage tensors",
)
PATCHES: tuple[Patch, ...] = (SPLIT_INPUT,)


def split_decision_channels_on_input(block: Any, acc: Any, channels: int) -> None:
    """Replace ``block.set_input_tensor`` (this instance only); see the module docstring."""
    block._dms_decision_input = (acc, channels)
    apply_patch(SPLIT_INPUT, on=block)
    log.info(
        "dms_megatron: %s.set_input_tensor splits %d decision channels off its input",
        type(block).__name__,
        channels,
    )
