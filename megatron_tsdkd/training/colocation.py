"""Teacher and student co-located on the same ranks, one pipeline stage each, travelling together.

megatron-core's pipeline schedules move ONE activation tensor of shape [seq, micro_batch, hidden] between stages
(seq may change from one micro-batch to the next: variable sequence lengths).
``CoLocatedStage`` runs the frozen teacher's stage (no grad) and then the student's stage on the same input, and
concatenates their hidden states along the hidden dimension, so the unmodified 1F1B schedule carries both:
[seq, b, h_teacher + h_student]. On the last stage it returns both models' vocab-sharded logits instead. The
teacher's half receives no gradient (it is detached on arrival), so backward traffic for it is zeros.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch

from megatron.core.enums import ModelType
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
        # Each micro-batch is padded to its own longest row (data/collate.py micro_batches): megatron-core's p2p
        # then sends every activation's shape ahead of it (p2p_communication.py _communicate_shapes; a 3-integer
        # exchange per transfer, the one host sync the schedule needs for it). Inert without pipeline parallelism.
        self.config.variable_seq_lengths = True
        if teacher is not None:
            teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)

    @property
    def post_process(self) -> bool:
        return unwrap(self.student).post_process

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
