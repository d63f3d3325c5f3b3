"""Vocab-parallel KL distillation: logits sharded over the vocabulary across TP ranks.

Shape legend: ``student``, ``teacher`` ``[..., V/tp]`` (this rank's vocabulary shard, same leading
shape on every rank); returns the per-token KL ``[...]`` in fp32, identical on every TP rank.

The math is ``core.losses.token_kl`` with the tensor-parallel group: it walks this rank's shard in
vocabulary chunks (no full ``[tokens, V/tp]`` fp32 copy is kept for the backward), all-reduces the two
softmax normalisers and the KL in the forward, and back-propagates into this rank's shard without
communication (every rank computes the same loss; a shard's gradient depends on the others only
through the normalisers and the KL, which every rank holds). The TP=2 == TP=1 gradient tests
(``tests/megatron/test_distill.py``) hold it to that.
"""

from __future__ import annotations

import torch

from dms_megatron.core.losses import KL_DIRECTIONS, masked_token_mean, token_kl


def _tp_group(group):
    if group is not None:
        return group
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_group(check_initialized=False)


def vocab_parallel_token_kl(
    student: torch.Tensor,
    teacher: torch.Tensor,
    direction: str = "student_teacher",
    temperature: float = 1.0,
    group=None,
    vocab_chunk: int = 16384,
    backend: str = "torch",
) -> torch.Tensor:
    """Per-token KL between sharded next-token distributions (teacher gets no gradient); ``backend``:
    ``torch`` (``core.losses.token_kl``), ``triton`` (``kernels.kd``, CUDA) or ``auto`` (triton where
    our Triton kernels run, i.e. CUDA logits, torch otherwise)."""
    group = _tp_group(group)
    if group is not None and torch.distributed.get_world_size(group) == 1:
        group = None
    if backend == "auto":
        from dms_megatron.kernels.triton_device import triton_runs_on

        backend = "triton" if triton_runs_on(student.device) and student.dtype != torch.float64 else "torch"
    if backend == "triton":
        from dms_megatron.kernels.kd import token_kl_triton

        if direction not in KL_DIRECTIONS:
            raise ValueError(f"direction must be one of {KL_DIRECTIONS}, got {direction!r}")

        return token_kl_triton(student, teacher, direction == "teacher_student", temperature, group)
    if backend != "torch":
        raise ValueError(f"KD backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    return token_kl(student, teacher, direction, temperature, vocab_chunk, group)  # type: ignore[arg-type]


def vocab_parallel_kd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    mask: torch.Tensor | None = None,
    direction: str = "student_teacher",
    temperature: float = 1.0,
    group=None,
    vocab_chunk: int = 16384,
    backend: str = "torch",
) -> torch.Tensor:
    """Masked mean of ``vocab_parallel_token_kl`` (0 when no token is counted)."""
    kl = vocab_parallel_token_kl(student, teacher, direction, temperature, group, vocab_chunk, backend)
    return masked_token_mean(kl, mask)
