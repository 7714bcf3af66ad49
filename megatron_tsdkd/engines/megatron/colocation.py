"""Teacher and student co-located on the same ranks, one pipeline stage each, travelling together.

megatron-core's pipeline schedules move ONE activation tensor of shape [seq, micro_batch, hidden] between stages
(seq may change from one micro-batch to the next: each micro-batch is padded to its own longest row).
``CoLocatedStage`` runs the frozen teacher's stage (no grad) and then the student's stage on the same input, and
concatenates their hidden states along the hidden dimension, so the unmodified 1F1B schedule carries both:
[seq, b, h_teacher + h_student]. On the last stage it returns both models' vocab-sharded logits instead. The
teacher's half receives no gradient (it is detached on arrival), so backward traffic for it is zeros.

Shapes: megatron-core's answer to varying seq (``variable_seq_lengths``) sends every activation's shape ahead of
it, a 3-integer p2p exchange read back to the host before each transfer (p2p_communication.py
``_communicate_shapes``): twice per micro-batch per stage. The trainer needs none of them: every rank of the
model-parallel group builds the same micro-batches (the rollout is identical on all of them, off-policy data is
read identically), so each stage knows every shape before the schedule starts and ``KnownShapes`` receives into
buffers of those shapes.
"""
from __future__ import annotations

import copy
from collections import deque
from typing import Optional, Sequence

import torch

from megatron.core import parallel_state as ps
from megatron.core.enums import ModelType
from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator
from megatron.core.pipeline_parallel.schedules import get_tensor_shapes
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.utils import unwrap_model as unwrap

from megatron_tsdkd.runtime.timing import PhaseClock


class CoLocatedStage(torch.nn.Module):
    """This rank's pipeline stage of the student (trainable, possibly DDP-wrapped) and the teacher (frozen, or None)."""

    def __init__(self, student: torch.nn.Module, teacher: Optional[torch.nn.Module], clock: Optional[PhaseClock] = None):
        super().__init__()
        self.student = student
        self.teacher = teacher
        self.clock = clock or PhaseClock()
        self.model_type = ModelType.encoder_or_decoder
        s_cfg = unwrap(student).config
        self.student_hidden = s_cfg.hidden_size
        self.teacher_hidden = unwrap(teacher).config.hidden_size if teacher is not None else 0
        # The schedule sizes its p2p buffers from config.hidden_size: give it the combined width.
        self.config = copy.copy(s_cfg)
        self.config.hidden_size = self.student_hidden + self.teacher_hidden
        # Each micro-batch is padded to its own longest row (data/collate.py micro_batches). A schedule run
        # without ``schedule_arguments`` falls back on megatron-core exchanging each shape (module docstring).
        self.config.variable_seq_lengths = True
        self._p2p: Optional[KnownShapes] = None   # and the process groups megatron wants with it: PP > 1 only
        self._groups: Optional[ProcessGroupCollection] = None
        if teacher is not None:
            teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)

    @property
    def post_process(self) -> bool:
        return unwrap(self.student).post_process

    def schedule_arguments(self, batches: Sequence) -> dict:
        """The extra arguments of megatron-core's schedule for one step over ``batches`` (its micro-batches, in
        order): at PP > 1 a p2p communicator told their activation shapes, and the process groups megatron wants
        with it; none at PP = 1 (no p2p)."""
        if ps.get_pipeline_model_parallel_world_size() == 1:
            return {}
        if self._p2p is None:
            self._p2p = KnownShapes(ps.get_pipeline_model_parallel_group(), self.config)
            self._groups = ProcessGroupCollection.use_mpu_process_groups(["tp", "cp", "pp", "embd", "pos_embd",
                                                                          "dp_cp"])
        tp, cp = ps.get_tensor_model_parallel_group(), ps.get_context_parallel_group()
        shapes = [get_tensor_shapes(seq_length=seq, micro_batch_size=rows, decoder_seq_length=None,
                                    config=self.config, tp_group=tp, cp_group=cp)[0]   # megatron's rule (SP, CP)
                  for rows, seq in (b.input_ids.shape for b in batches)]
        self._p2p.expect(shapes)
        return {"p2p_communicator": self._p2p, "pg_collection": self._groups}

    def set_input_tensor(self, input_tensor) -> None:
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        if input_tensor is None:
            unwrap(self.student).set_input_tensor(None)
            if self.teacher is not None:
                unwrap(self.teacher).set_input_tensor(None)
            return
        teacher_part, student_part = torch.split(input_tensor, [self.teacher_hidden, self.student_hidden], dim=-1)
        unwrap(self.student).set_input_tensor(student_part)
        if self.teacher is not None:
            unwrap(self.teacher).set_input_tensor(teacher_part.detach())

    def forward(self, input_ids, position_ids, attention_mask=None):
        teacher_out = None
        if self.teacher is not None:
            with self.clock.phase("teacher_forward"), torch.no_grad():
                teacher_out = self.teacher(input_ids, position_ids, attention_mask)
        with self.clock.phase("student_forward"):
            student_out = self.student(input_ids, position_ids, attention_mask)
        if self.post_process:
            return student_out, teacher_out  # vocab-sharded logits [b, s, V/TP] of both models
        if teacher_out is None:
            return student_out
        return torch.cat([teacher_out.to(student_out.dtype), student_out], dim=-1)


class KnownShapes(P2PCommunicator):
    """megatron-core's p2p communicator for the non-interleaved 1F1B schedule, receiving into buffers of shapes it
    was told (``expect``) instead of exchanging each shape first. 1F1B receives the micro-batches' activations
    (from the previous stage) and their gradients (from the next) each in micro-batch order, so two queues of the
    step's shapes say what every receive holds."""

    def __init__(self, pp_group, config):
        if config.virtual_pipeline_model_parallel_size is not None:
            raise ValueError("KnownShapes follows the non-interleaved 1F1B order; virtual pipeline stages differ")
        config = copy.copy(config)
        config.variable_seq_lengths = False   # megatron then receives the shape it is handed
        super().__init__(pp_group, config)
        self._forward: deque = deque()
        self._backward: deque = deque()

    def expect(self, shapes: Sequence[tuple[int, int, int]], backward: bool = True) -> None:
        """The step's activation shapes [seq, micro_batch, hidden], one per micro-batch in schedule order:
        activations come in unless this is the first stage, gradients (``backward``: a training step, not a
        forward-only one) unless it is the last."""
        if self._forward or self._backward:
            raise RuntimeError(f"the last step left {len(self._forward)} activation and {len(self._backward)} "
                               "gradient receives unused: it did not run the micro-batches it was told of")
        rank, size = self.pp_group.rank(), self.pp_group.size()
        self._forward = deque(shapes if rank > 0 else ())
        self._backward = deque(shapes if backward and rank < size - 1 else ())

    def _communicate(self, *, tensor_send_next, tensor_send_prev, recv_prev, recv_next, tensor_shape, **kwargs):
        if recv_prev and recv_next:
            raise RuntimeError("1F1B never receives an activation and a gradient in one call")
        if recv_prev or recv_next:
            queue = self._forward if recv_prev else self._backward
            if not queue:
                raise RuntimeError("the schedule received more micro-batches than the step was told of")
            tensor_shape = queue.popleft()
        return super()._communicate(tensor_send_next=tensor_send_next, tensor_send_prev=tensor_send_prev,
                                    recv_prev=recv_prev, recv_next=recv_next, tensor_shape=tensor_shape, **kwargs)
