"""The teacher on a layout of its own (``parallel.teacher.tensor`` x ``parallel.teacher.pipeline``), beside a student
laid out by megatron's parallel_state.

Placement (planning/run_plan.py ``teacher_layout``): a teacher replica is TP_t x PP_t consecutive ranks (tensor
fastest, then pipeline), built from megatron-core's ``HyperCommGrid`` as a ``ProcessGroupCollection``
(runtime/distributed.py ``model_process_groups``) that the teacher's GPTModel and megatron's forward-only schedule
take (``pg_collection``); no second parallel_state. Each
teacher replica holds whole student replicas and serves exactly those. A mixture-of-experts teacher
(``parallel.teacher.expert`` = EP) splits its experts over EP neighbouring replicas: each still runs its own
micro-batches, and its MoE layers exchange tokens with the other EP - 1 (megatron-core's all-to-all), so those
replicas step through their micro-batches together, which they do: every replica runs the step's same count.

One step (``TeacherOnItsOwnLayout.run``), before the student's 1F1B schedule:
  1. the replica gathers the token ids of the student replicas it serves (their micro-batch shapes first: one small
     host read per step, which sizes every buffer and the pipeline's receives); its micro-batch m is micro-batch m
     of every served replica side by side;
  2. it runs them forward only (no grad) over its own pipeline; its last stage stops after the final norm and keeps
     the final hidden states [seq, rows, h_t];
  3. the handoff: each student replica's loss ranks (its last pipeline stage) get the hidden states of that replica's
     rows: a local slice where the rank is also a teacher last-stage rank (always at PP_t = 1), else one
     point-to-point transfer per receiving rank from one of the teacher's last-stage ranks.
The teacher's output layer is held re-sharded over the STUDENT's tensor-parallel group (V / TP_s rows on each loss
rank, moved there once at build time from the teacher's own shards), so ``logits`` gives teacher logits in the
student's vocab sharding and the loss library is unchanged: no rank gathers the vocabulary, and the handoff moves
h_t numbers per token instead of V.

megatron-core schedules one model per pipeline; two models with different stage boundaries cannot share one 1F1B,
which is why the teacher runs its own forward-only schedule first. Where the layouts are the same, the combined-width
co-located stage (colocation.py) is kept: it overlaps the teacher's stages with the student's in one schedule
(benchmarks/teacher_layout_step.py measures both).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.pipeline_parallel.schedules import (forward_backward_pipelining_without_interleaving,
                                                       get_tensor_shapes)
from megatron.core.tensor_parallel.utils import VocabUtility

from megatron_tsdkd.engines.megatron.colocation import KnownShapes
from megatron_tsdkd.models.source import ModelSource, load_model
from megatron_tsdkd.planning.placement import Layout, student_replicas
from megatron_tsdkd.runtime import device
from megatron_tsdkd.runtime.collectives import all_gather_objects
from megatron_tsdkd.runtime.distributed import model_process_groups


def _exchange(ops: list) -> None:
    """Point-to-point transfers as one batch (NCCL groups them, so a rank that both sends and receives cannot
    deadlock on the order of its peers' calls), waited for."""
    for request in dist.batch_isend_irecv(ops) if ops else ():
        request.wait()


def _rows(rank: int, shards: int, vocab: int) -> range:
    """The vocabulary rows of tensor-parallel rank ``rank`` of ``shards`` (megatron-core's own split)."""
    return range(*VocabUtility.vocab_range_from_global_vocab_size(vocab, rank, shards))


class TeacherOnItsOwnLayout:
    """The frozen teacher on its own process groups: its forward pass over the step's micro-batches of the student
    replicas it serves (``run``) and its logits in the student's vocab sharding (``logits``)."""

    def __init__(self, source: ModelSource, layout: Layout, student: Layout, *, dtype: torch.dtype,
                 padded_vocab: int, attention: str):
        self.layout, self.student_layout = layout, student
        # a MoE teacher's experts over layout.expert of its replicas (whose tokens they then serve too)
        self.groups = model_process_groups(layout.tensor, layout.pipeline,
                                           layout.expert if source.arch.is_moe else None)
        self.model = load_model(source, dtype=dtype, padded_vocab_size=padded_vocab, attention_backend=attention,
                                groups=self.groups)
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.device, self.vocab, self.hidden = device(), padded_vocab, self.model.config.hidden_size
        rank, size = dist.get_rank(), layout.tensor * layout.pipeline
        self.first_rank = rank // size * size
        # the student replicas this teacher replica serves, by data-parallel rank; each one's loss ranks (its last
        # pipeline stage, by student tensor rank) and the teacher's last-stage ranks (by teacher tensor rank)
        self.served = [r for r in student_replicas(student) if r[0] // size == rank // size]
        self.loss_ranks = [r[-student.tensor:] for r in self.served]
        self.teacher_last = [self.first_rank + (layout.pipeline - 1) * layout.tensor + t for t in range(layout.tensor)]
        self.replica = next((j for j, r in enumerate(self.served) if rank in r), None)
        self.is_loss_rank = self.replica is not None and rank in self.loss_ranks[self.replica]
        self.head = self._reshard_head()
        if self.model.post_process:   # the last stage stops after the final norm (GPTModel returns hidden states)
            self.model.output_layer = None
            self.model.post_process = False
        self._p2p: Optional[KnownShapes] = None
        self.handoff_bytes = 0   # sent by this rank in the last step (hidden states; host arithmetic, no sync)

    # ---- build: the output layer, re-sharded over the student's tensor-parallel group ---------------------------

    def _reshard_head(self) -> Optional[torch.Tensor]:
        """V / TP_s rows of the teacher's output weight on each student loss rank (None elsewhere), moved from the
        teacher's last-stage shards (V / TP_t rows each) by point-to-point transfers of the overlapping rows."""
        rank, model = dist.get_rank(), self.model
        held = None
        if rank in self.teacher_last:
            held = model.output_layer.weight if model.output_layer.weight is not None \
                else model.shared_embedding_or_output_weight()
        head = None
        if self.is_loss_rank:
            head = torch.empty(self.vocab // self.student_layout.tensor, self.hidden,
                               dtype=self.model.config.params_dtype, device=self.device)
        ops = []
        for receivers in self.loss_ranks:
            for s, receiver in enumerate(receivers):
                want = _rows(s, self.student_layout.tensor, self.vocab)
                for t, sender in enumerate(self.teacher_last):
                    have = _rows(t, self.layout.tensor, self.vocab)
                    lo, hi = max(want.start, have.start), min(want.stop, have.stop)
                    if lo >= hi or rank not in (sender, receiver):
                        continue
                    mine = None if held is None else held[lo - have.start:hi - have.start]
                    theirs = None if head is None else head[lo - want.start:hi - want.start]
                    if sender == receiver:
                        theirs.copy_(mine)
                    elif rank == sender:
                        ops.append(dist.P2POp(dist.isend, mine.contiguous(), receiver))
                    else:
                        ops.append(dist.P2POp(dist.irecv, theirs, sender))
        _exchange(ops)
        return head

    # ---- the step ---------------------------------------------------------------------------------------------

    def run(self, batches: Sequence) -> Optional[list[torch.Tensor]]:
        """The teacher's final hidden states ([seq, rows, h_t] per micro-batch, in order) of this rank's student
        replica on its loss ranks; None on the other ranks. Collective over the teacher replica. Its batch m holds
        micro-batch m of every replica it serves, side by side (right-padded to the longest: causal attention keeps
        every real position's states as they are alone)."""
        shapes = self._served_shapes(batches)
        stacked = self._served_tokens(batches, shapes)
        with torch.no_grad():
            if self.layout.pipeline == 1:
                outputs = [self.model(ids, pos, None) for ids, pos in stacked]
            else:
                outputs = self._pipeline(stacked)
        return self._handoff(outputs, shapes)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Teacher logits [rows, seq, V / TP_s] of one micro-batch's hidden states [seq, rows, h_t], as the student's
        loss ranks hold its own (megatron's output layer, then GPTModel's transpose)."""
        return F.linear(hidden, self.head).transpose(0, 1).contiguous()

    def _served_shapes(self, batches) -> list[list[tuple[int, int]]]:
        """(rows, seq) of every micro-batch of every served student replica: the shapes are host facts on each rank,
        exchanged once per step (the one host synchronisation the teacher's pass needs: they size every buffer)."""
        table = all_gather_objects([tuple(b.input_ids.shape) for b in batches], group=self.groups.mp)
        return [table[r[0] - self.first_rank] for r in self.served]

    def _served_tokens(self, batches, shapes) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(input_ids, position_ids) [rows of every served replica, longest seq] per micro-batch index, gathered
        over the teacher replica."""
        longest = max(sum(2 * rows * seq for rows, seq in replica) for replica in shapes)
        mine = torch.zeros(longest, dtype=torch.long, device=self.device)
        if batches:
            packed = torch.cat([t.reshape(-1) for b in batches for t in (b.input_ids, b.position_ids)])
            mine[:packed.numel()] = packed
        every = [torch.empty_like(mine) for _ in range(self.groups.mp.size())]
        dist.all_gather(every, mine, group=self.groups.mp)
        stacked = []
        for m in range(len(shapes[0])):
            rows, seq = sum(replica[m][0] for replica in shapes), max(replica[m][1] for replica in shapes)
            ids = torch.zeros(rows, seq, dtype=torch.long, device=self.device)
            pos = torch.arange(seq, device=self.device).expand(rows, seq).clone()
            top = 0
            for r, replica in zip(self.served, shapes):
                at = sum(2 * n * s for n, s in replica[:m])
                n, s = replica[m]
                flat = every[r[0] - self.first_rank]
                ids[top:top + n, :s] = flat[at:at + n * s].view(n, s)
                pos[top:top + n, :s] = flat[at + n * s:at + 2 * n * s].view(n, s)
                top += n
            stacked.append((ids, pos))
        return stacked

    def _pipeline(self, stacked) -> list[torch.Tensor]:
        """megatron-core's forward-only 1F1B over the teacher's pipeline (its own groups, shapes told in advance);
        the last stage returns every micro-batch's hidden states, the others an empty list."""
        if self._p2p is None:
            self._p2p = KnownShapes(self.groups.pp, self.model.config)
        shapes = [tuple(ids.shape) for ids, _ in stacked]
        self._p2p.expect([get_tensor_shapes(seq_length=seq, micro_batch_size=rows, decoder_seq_length=None,
                                            config=self.model.config, tp_group=self.groups.tp,
                                            cp_group=self.groups.cp)[0] for rows, seq in shapes], backward=False)

        def forward_step(data_iterator, model):
            ids, pos = next(data_iterator)
            return model(ids, pos, None), None   # no loss function: the last stage collects the outputs

        return forward_backward_pipelining_without_interleaving(
            forward_step_func=forward_step, data_iterator=iter(stacked), model=[self.model],
            num_microbatches=len(stacked), seq_length=max(s for _, s in shapes),
            micro_batch_size=max(r for r, _ in shapes), forward_only=True, p2p_communicator=self._p2p,
            pg_collection=self.groups)

    def _handoff(self, outputs: list, shapes) -> Optional[list[torch.Tensor]]:
        """Each served replica's hidden states to its loss ranks: a local slice, or one transfer per receiving
        rank, the teacher's last-stage ranks taking the receivers in turn."""
        rank, ops, received = dist.get_rank(), [], None
        self.handoff_bytes = 0
        remote = [x for receivers in self.loss_ranks for x in receivers if x not in self.teacher_last]
        for j, receivers in enumerate(self.loss_ranks):
            tops = [sum(replica[m][0] for replica in shapes[:j]) for m in range(len(shapes[j]))]

            def mine(m):   # replica j's rows of teacher batch m: [seq, rows, h_t]
                rows, seq = shapes[j][m]
                return outputs[m][:seq, tops[m]:tops[m] + rows]

            for receiver in receivers:
                sender = (receiver if receiver in self.teacher_last
                          else self.teacher_last[remote.index(receiver) % self.layout.tensor])
                if rank not in (sender, receiver):
                    continue
                if sender == receiver:
                    received = [mine(m) for m in range(len(shapes[j]))]
                elif rank == sender:
                    payload = torch.cat([mine(m).reshape(-1) for m in range(len(shapes[j]))])
                    self.handoff_bytes += payload.numel() * payload.element_size()
                    ops.append(dist.P2POp(dist.isend, payload, receiver))
                else:
                    buffer = torch.empty(sum(rows * seq for rows, seq in shapes[j]) * self.hidden,
                                         dtype=self.model.config.params_dtype, device=self.device)
                    ops.append(dist.P2POp(dist.irecv, buffer, sender))
                    received, at = [], 0
                    for rows, seq in shapes[j]:
                        received.append(buffer[at:at + rows * seq * self.hidden].view(seq, rows, self.hidden))
                        at += rows * seq * self.hidden
        _exchange(ops)
        return received
