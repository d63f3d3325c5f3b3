"""Teacher and student in one pipeline schedule: ``DistillationStage`` wraps one pipeline stage.

Each stage holds the student's stage and the teacher's stage of the same layer range (same TP/PP
groups). Per micro-batch the teacher runs first under ``no_grad``, then the student; on non-last stages
the stage output is ``[student hidden (h), decision channels (2), teacher hidden (h)]`` concatenated on
the last dimension, which is what the next stage receives (``adjust_distill_p2p_shapes`` widens the
1F1B schedule's P2P shapes to match). On the last stage the student's logits are returned and the
teacher's are kept in ``teacher_logits`` for the loss function of the same micro-batch: teacher logits
are never stored across micro-batches and the data is read once.

Teachers:
* a separate frozen model (full-model retrofit, the paper's recipe): any ``GPTModel`` stage with the
  student's layout, e.g. built from the original (pre-``apply_dms``) spec;
* ``teacher=None``: the student itself with eviction off (``DMSRunState.teacher_pass``), no second
  copy — exact for the adapter variant with a frozen base (NVIDIA's adapter recipe); with the neuron
  variant the repurposed channel stays zeroed in the teacher pass.
"""

from __future__ import annotations

import torch

from dms_megatron.megatron.pipeline import DECISION_CHANNELS, dms_run_state
from dms_megatron.megatron.teacher_graph import Capture, TeacherGraph


class DistillationStage(torch.nn.Module):
    """One pipeline stage of student + frozen teacher (see the module docstring)."""

    def __init__(
        self,
        student: torch.nn.Module,
        teacher: torch.nn.Module | None = None,
        teacher_graph: bool = False,
        graph_capture: Capture | None = None,
    ) -> None:
        """``student``: the DMS stage, bare or wrapped (megatron DDP / ``Float16Module``: ``.module``);
        ``teacher_graph``: replay the separate teacher's forward as CUDA graphs (``teacher_graph.py``)
        where it runs on CUDA; ``graph_capture``: a stand-in for the CUDA capture (tests; then on any
        device)."""
        super().__init__()
        self.student = student
        inner = student
        while not hasattr(inner, "pre_process") and hasattr(inner, "module"):
            inner = inner.module
        self._inner = [inner]  # the bare GPTModel stage (a list: not registered twice)
        self.state = dms_run_state(student)
        self.config = inner.config  # megatron's schedules read config and model_type from the model
        self.model_type = inner.model_type
        student = inner
        if teacher is not None:
            if teacher.config.hidden_size != student.config.hidden_size:
                raise ValueError("teacher and student must have the same hidden size to share a pipeline")
            if (teacher.pre_process, teacher.post_process) != (student.pre_process, student.post_process):
                raise ValueError(
                    "teacher and student stages must cover the same layers (same pre/post_process)"
                )
            teacher.requires_grad_(False)
            teacher.eval()
        # kept out of the module tree: the teacher is not trained, checkpointed or wrapped by DDP
        self._teacher = [teacher] if teacher is not None else []
        if teacher_graph and teacher is None:
            raise ValueError("teacher_graph needs a separate teacher (the adapter recipe's is the student)")
        self._teacher_graph, self._graph_capture = teacher_graph, graph_capture
        self._graph: TeacherGraph | None = None
        self._teacher_input: torch.Tensor | None = None
        self._student_input: torch.Tensor | None = None
        self.teacher_logits: torch.Tensor | None = None

    @property
    def teacher(self) -> torch.nn.Module | None:
        return self._teacher[0] if self._teacher else None

    @property
    def pre_process(self) -> bool:
        return self._inner[0].pre_process

    @property
    def post_process(self) -> bool:
        return self._inner[0].post_process

    def set_input_tensor(self, input_tensor) -> None:
        if isinstance(input_tensor, list | tuple):
            input_tensor = input_tensor[0]
        if input_tensor is None:
            self._student_input = self._teacher_input = None
            return
        split = self.config.hidden_size + DECISION_CHANNELS
        self._student_input, self._teacher_input = input_tensor[..., :split], input_tensor[..., split:]

    def _graph_can_serve(self) -> bool:
        """A CUDA teacher, or a stand-in capture (tests): the graph is made on the first such forward."""
        return self._graph_capture is not None or next(self.teacher.parameters()).is_cuda  # type: ignore[union-attr]

    def _teacher_forward(self, *args, **kwargs) -> torch.Tensor:
        if self._graph is None and self._teacher_graph and self._graph_can_serve():
            self._graph = TeacherGraph(self.teacher, capture=self._graph_capture)  # type: ignore[arg-type]
        if self._graph is not None:
            return self._graph(None if self.pre_process else self._teacher_input, *args, **kwargs)
        model = self.teacher if self.teacher is not None else self._inner[0]
        with torch.no_grad():
            if not self.pre_process:
                model.set_input_tensor(self._teacher_input)
            self.state.teacher_pass = self.teacher is None
            try:
                out = model(*args, **kwargs)
            finally:
                self.state.teacher_pass = False
        if self.teacher is None and not self.post_process:
            out = out[..., : self.config.hidden_size]  # the self-teacher also emitted decision channels
        return out

    def forward(self, *args, **kwargs) -> torch.Tensor:
        # profiler regions (torch.profiler; near-free when no profiler runs): training/step_profile.py
        with torch.profiler.record_function("dms.teacher_forward"):
            teacher_out = self._teacher_forward(*args, **kwargs)
        if not self.pre_process:
            self._inner[0].set_input_tensor(self._student_input)
        with torch.profiler.record_function("dms.student_forward"):
            student_out = self.student(*args, **kwargs)
        if self.post_process:
            self.teacher_logits = teacher_out
            return student_out
        return torch.cat([student_out, teacher_out.to(student_out.dtype)], dim=-1)


def adjust_distill_p2p_shapes(recv_shapes: list, send_shapes: list) -> tuple[list, list]:
    """``adjust_tensor_shapes_fn`` for the 1F1B schedule: student hidden + decision channels + teacher
    hidden on every activation."""

    def widen(shapes):
        return [(*s[:-1], 2 * s[-1] + DECISION_CHANNELS) if len(s) else s for s in shapes]

    return widen(recv_shapes), widen(send_shapes)
