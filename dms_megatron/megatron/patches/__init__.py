"""Explicit, logged, version-gated patches of upstream objects (house rule: all of them live in this
package, one module per patch).

``pipeline_input.split_decision_channels_on_input(block, acc, channels)``: per ``TransformerBlock``
*instance*, its ``set_input_tensor`` is replaced so that an activation received from the previous
pipeline stage, ``[s, b, h + channels]``, has its last channels (the DMS decision counts, see
``state.py``) split off into the stage's accumulator before megatron sees ``[s, b, h]``. Needed for
megatron-core 0.19.2, whose P2P carries one tensor of one shape; remove if megatron gains a side channel
for per-stage tensors.

``cpu_convert.cpu_megatron()``: megatron-core 0.19.2 calls ``torch.cuda.current_device()`` while
*building* models (e.g. ``GPTModel.__init__`` -> rotary embedding), ``Tensor.cuda()`` on the tied
embedding of a pipelined model (``LanguageModule.setup_embeddings_and_output_layer``) and
``torch.cuda.synchronize()`` while saving distributed checkpoints; all raise on a machine without a GPU
driver. Checkpoint conversion is CPU work that users run on login or CPU nodes, so for its duration, and
only when CUDA is unavailable, these three calls stay on the CPU. Remove when megatron-core builds and
saves models without touching CUDA.

``cpu_training.enable_cpu_training()``: opt-in, process-wide, for a CPU-only machine (the README demo on
a laptop or CI, and the CPU test suite). megatron-core 0.19.2's schedules, P2P, DDP grad buffers,
optimizer, gradient clipping and RNG tracker hard-code CUDA. It (a) makes device queries and syncs CPU
no-ops, (b) replaces streams/events with null objects (CPU work is synchronous), (c) routes the "CUDA"
RNG to the CPU generator, (d) builds the stock causal mask on the CPU, (e) enters one
``TorchFunctionMode`` that rewrites hard-coded CUDA placement to CPU and reports ``torch.cuda.*Tensor``
type names where megatron asserts them, and (f) gives the local spec a sequence-parallel norm (megatron
has none without TE/Apex). ``check_cpu_patch_targets()`` fails loudly if an upstream name it patches
disappears or changes shape. Remove when megatron-core runs on CPU.

``adam_step.keep_torch_adam_step_on_load()``: resuming the distributed optimizer from a reshardable
checkpoint with torch's Adam (no Apex/TE) fails upstream with ``KeyError: 'step'``; see its docstring.

Each patch checks the installed megatron-core against ``compat.SUPPORTED_MEGATRON_CORE`` through
``require_supported_megatron`` before it patches anything.
"""

from __future__ import annotations

from dms_megatron.megatron.compat import SUPPORTED_MEGATRON_CORE, installed_megatron_core_version


def require_supported_megatron(patch: str) -> str:
    """The installed megatron-core version; ``RuntimeError`` if ``patch`` was not written for it."""
    version = installed_megatron_core_version()
    if version not in SUPPORTED_MEGATRON_CORE:
        raise RuntimeError(f"{patch} is written for megatron-core {SUPPORTED_MEGATRON_CORE}, found {version}")
    return version
