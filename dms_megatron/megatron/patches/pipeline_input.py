"""Pipeline P2P carries the DMS decision counts as extra channels: a ``TransformerBlock`` instance's
``set_input_tensor`` splits them off (see the package docstring)."""

from __future__ import annotations

import logging
import types
from typing import Any

from dms_megatron.megatron.patches import require_supported_megatron

log = logging.getLogger(__name__)


def split_decision_channels_on_input(block: Any, acc: Any, channels: int) -> None:
    """Replace ``block.set_input_tensor`` (this instance only); see the module docstring."""
    from megatron.core.transformer.transformer_block import TransformerBlock

    require_supported_megatron("split_decision_channels_on_input")
    hidden = block.config.hidden_size

    def set_input_tensor(self, input_tensor):
        if isinstance(input_tensor, list | tuple):
            input_tensor = input_tensor[0]
        if input_tensor is not None and input_tensor.shape[-1] == hidden + channels:
            acc.acc_in = input_tensor[..., hidden:].float().sum(-1)
            input_tensor = input_tensor[..., :hidden]
        TransformerBlock.set_input_tensor(self, input_tensor)

    block.set_input_tensor = types.MethodType(set_input_tensor, block)
    log.info(
        "dms_megatron: %s.set_input_tensor splits %d decision channels off its input",
        type(block).__name__,
        channels,
    )
