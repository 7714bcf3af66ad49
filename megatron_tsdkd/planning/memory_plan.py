"""Per-rank GPU memory plan of a teacher/student layout, before anything is allocated: the teacher co-located in the
student's pipeline stages (the same TP x PP), or on a layout of its own (``parallel.teacher.*``).

Parameter counts are exact per rank: they are read off the HF <-> megatron mapping (models/mapping.py), which lists
every parameter shard of every stage as megatron-core's GPTModel allocates it (embedding on the first pipeline
stage, final norm and output layer on the last, a tied output layer duplicated on the last stage when PP > 1,
column/row-parallel weights sliced over TP, norms replicated, the vocabulary padded as the trainer pads it; a
mixture-of-experts layer's router replicated and its experts split over EP x TP: experts / EP per rank, each sliced
over TP). Gradient and optimizer bytes follow the trainer's choices (fp32 gradient buffer, Adam moments and fp32
master weights, sharded with the distributed optimizer: over the data-parallel ranks, an expert's over the DP / EP
ranks that hold it, megatron-core's expert data-parallel group). Activations, KV cache, loss buffers and a MoE
layer's token-dispatcher buffers are estimates from tensor shapes (stated below), and a fixed reserve covers the
CUDA context, NCCL buffers and allocator slack.

A teacher on its own layout (engines/megatron/teacher_layout.py) runs forward only, before the student's 1F1B, over
the micro-batches of the g = (TP_t x PP_t) / (TP_s x PP_s) student replicas it serves. Per GPU: its weights at
TP_t x PP_t without the output layer; on the student's last stage a copy of that output layer re-sharded to V / TP_s
rows, and the teacher's final hidden states of the rank's rows for the whole step (rows x sequence x h_t); on the
teacher's last stage the hidden states of all g replicas before they are handed over; one forward-only micro-batch
of teacher activations (the layer working set). A GPU holds one student stage and one teacher stage, so the plan has
a column per pair that occurs (placement.py ``stage_pairs``); co-located, a column per stage, as before.

``tsdkd-plan --config configs/tsdkd_70b_to_7b.yaml --world-size 16 --gpu-memory-gib 80`` (commands/plan.py) prints
the table;
``check_memory_plan`` is what the trainer calls before it builds a model, and raises ``MemoryPlanError`` (table and
a suggested layout in the message) unless ``memory.enforce=false``.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import Optional

from megatron_tsdkd.config import teacher_layout_of
from megatron_tsdkd.methods import method_class
from megatron_tsdkd.models.dtypes import DTYPES
from megatron_tsdkd.models.hf_config import (ArchSpec, ParallelLayoutError, arch_spec, check_parallel_layout,
                                             read_hf_config)
from megatron_tsdkd.models.mapping import stage_layouts
from megatron_tsdkd.models.token_spec import shared_padded_vocab
from megatron_tsdkd.planning.host_memory_plan import HostPlan
from megatron_tsdkd.planning.placement import (Layout, placement_problem, replicas_served, rides_co_located,
                                               stage_pairs)

GIB = 1024**3
GRAD_BUFFER_BYTES = 4           # the trainer's DDP reduces gradients in fp32 (grad_reduce_in_fp32=True)
ADAM_MOMENT_BYTES = 8           # exp_avg + exp_avg_sq, fp32
MASTER_WEIGHT_BYTES = 4         # fp32 copy of bf16/fp16 weights (fp32 weights are their own master)
LOSS_CHUNK_COPIES = 6           # fp32 [chunk, V/TP] tensors alive in a chunk of the vocab-parallel losses
RUNTIME_RESERVE = 3 * GIB       # CUDA context, NCCL communicators and buffers, allocator fragmentation
VLLM_ASLEEP_BYTES = GIB // 2    # a sleeping vLLM replica's CUDA graph pool (estimate), kept through training
VLLM_MIN_SHARE_OVER_WEIGHTS = 1.25   # the replica's share must hold its weights and a KV cache of a quarter of them
SHIPPED_HF_CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "hf")


class MemoryPlanError(ValueError):
    """The layout cannot fit in GPU memory; the message holds the table and a suggestion."""


# ---------------------------------------------------------------------------------------------------------------
# Exact parameter counts


@lru_cache(maxsize=4096)
def _mapped_parameters(spec: ArchSpec, tp: int, layers: int, first: bool, last: bool, padded_vocab: int,
                       head: bool = True, ep: int = 1) -> tuple[int, int]:
    """(all, experts'): parameters of ``layers`` transformer layers plus the stage's ends, on one TP rank of one
    expert-parallel rank, counted from the mapping's shard shapes, and how many of them are experts' (each EP rank
    holds different ones). Every layer has the same shards, so one layer is counted and multiplied. ``head``:
    whether the last stage keeps its output layer (a teacher on its own layout does not)."""
    def count(layouts, experts_only: bool = False) -> int:
        return sum(math.prod(layout.shard_shape) for layout in layouts if layout.expert or not experts_only)

    layer = stage_layouts(spec, tp_rank=0, tp=tp, layer_numbers=[0], pre_process=False, post_process=False,
                          padded_vocab=padded_vocab, has_output_weight=False, ep_rank=0, ep=ep)
    ends = count(stage_layouts(spec, tp_rank=0, tp=tp, layer_numbers=[], pre_process=first, post_process=last,
                               padded_vocab=padded_vocab,
                               has_output_weight=head and last and not (spec.tie_embeddings and first)))
    return layers * count(layer) + ends, layers * count(layer, experts_only=True)


def layer_parameters(spec: ArchSpec, tp: int, padded_vocab: int, ep: int = 1) -> int:
    """One transformer layer's parameters on one TP rank (of one expert-parallel rank)."""
    return _mapped_parameters(spec, tp, 1, False, False, padded_vocab, ep=ep)[0]


def stage_parameters(spec: ArchSpec, tp: int, pp: int, stage: int, padded_vocab: int, head: bool = True,
                     ep: int = 1) -> int:
    """Parameters on one rank of pipeline stage ``stage`` (0-based): exact, as megatron-core allocates them. All
    are in the model's dtype (models/builder.py gives the norms that dtype too). ``head=False``: without the output
    layer (a teacher on its own layout hands its final hidden states over instead). ``ep``: a MoE model's expert
    parallelism (the rank holds experts / ep of each layer's experts)."""
    return _mapped_parameters(spec, tp, spec.num_layers // pp, stage == 0, stage == pp - 1, padded_vocab, head, ep)[0]


def stage_expert_parameters(spec: ArchSpec, tp: int, pp: int, stage: int, padded_vocab: int, ep: int = 1) -> int:
    """The experts' share of ``stage_parameters`` (0 for a dense model): their gradients are reduced, and their
    optimizer state sharded, over the DP / EP ranks that hold the same experts, not over all data-parallel ranks."""
    return _mapped_parameters(spec, tp, spec.num_layers // pp, stage == 0, stage == pp - 1, padded_vocab, ep=ep)[1]


def head_copy_parameters(teacher: ArchSpec, student_tp: int, padded_vocab: int) -> int:
    """The teacher's output layer re-sharded over the student's tensor-parallel group: V / TP_s rows of h_t on
    each of the student's last-stage ranks (engines/megatron/teacher_layout.py)."""
    return padded_vocab // student_tp * teacher.hidden_size


def total_parameters(spec: ArchSpec) -> int:
    """The unsharded model's parameters (HF count: vocabulary unpadded, tied embedding once)."""
    return stage_parameters(spec, 1, 1, 0, spec.vocab_size)


def active_parameters(spec: ArchSpec) -> int:
    """The parameters one token passes through (the count FLOPs per token follow): a MoE model's attention, router,
    norms, embeddings and its top-k experts of each layer, all of a dense model's (HF count, as total_parameters)."""
    if not spec.is_moe:
        return total_parameters(spec)
    experts = stage_expert_parameters(spec, 1, 1, 0, spec.vocab_size)
    return total_parameters(spec) - experts // spec.num_experts * (spec.num_experts - spec.moe_top_k)


# ---------------------------------------------------------------------------------------------------------------
# The plan


@dataclass(frozen=True)
class PlanInputs:
    tp: int
    pp: int
    world_size: int
    micro_batch: int
    global_batch: int
    seq_len: int                  # prompt + response tokens per training sequence
    dtype: str = "bf16"
    distributed_optimizer: bool = True
    recompute: str = "none"       # models.recompute: none | selective (core attention) | full (one layer at a time)
    attention_scores: bool = False  # the core attention materialises [b, heads, s, s] scores (models.attention=local)
    rollout: bool = False         # student samples responses (on-policy), so a KV cache is needed
    rollout_len: int = 0          # prompt + generated tokens per rollout sequence
    vllm_memory_fraction: float = 0.0   # > 0: a colocated vLLM replica samples (rollout.engine=vllm), this share
    weight_sync_bucket_bytes: int = 256 << 20   # the replica's weight sync buckets (rollout.weight_sync_bucket_mb)
    chunk_size: int = 1024        # tokens per chunk in the vocab-parallel losses
    gpu_memory_gib: float = 80.0
    teacher_tp: Optional[int] = None   # the teacher's own layout (parallel.teacher.*); None: the student's
    teacher_pp: Optional[int] = None
    teacher_colocated: bool = True     # in the student's layout: in its stages (true) or on groups of its own
    ep: int = 1                        # parallel.expert: a MoE student's experts over this many data-parallel ranks
    teacher_ep: int = 1                # parallel.teacher.expert: a MoE teacher's (co-located: equal to ``ep``)

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp)

    @property
    def student_layout(self) -> Layout:
        return Layout(self.tp, self.pp, self.world_size, expert=self.ep)

    @property
    def teacher_layout(self) -> Layout:
        return Layout(self.teacher_tp or self.tp, self.teacher_pp or self.pp, self.world_size, expert=self.teacher_ep)

    def teacher_on_own_groups(self, teacher: ArchSpec) -> bool:
        """A teacher runs on process groups of its own with its own forward pass (engines/megatron/teacher_layout.py):
        its TP x PP differs from the student's, parallel.teacher.colocated=false, or a MoE teacher's expert
        parallelism differs from the student's (co-located, it shares the student's expert groups; the run plan's
        rule, placement.py ``rides_co_located``)."""
        return not rides_co_located(self.student_layout, self.teacher_layout, self.teacher_colocated, teacher.is_moe)

    @property
    def micro_batches(self) -> int:
        return max(1, self.global_batch // (self.dp * self.micro_batch))


@dataclass
class Row:
    name: str
    bytes_per_stage: list[int]
    phase: str = "static"         # static | train | rollout
    note: str = ""


@dataclass
class MemoryPlan:
    inputs: PlanInputs
    student: ArchSpec
    teacher: Optional[ArchSpec]
    padded_vocab: int
    student_params: list[int]     # per rank, per stage
    teacher_params: list[int]
    rows: list[Row] = field(default_factory=list)
    host: Optional[HostPlan] = None   # the node's host memory (host_memory_plan.py), where the node is known

    @property
    def capacity(self) -> int:
        return int(self.inputs.gpu_memory_gib * GIB)

    @property
    def teacher_has_own_layout(self) -> bool:
        return self.teacher is not None and self.inputs.teacher_on_own_groups(self.teacher)

    @cached_property
    def columns(self) -> list[tuple[int, int]]:
        """(student stage, teacher stage) of each kind of GPU, the order of every ``bytes_per_stage``."""
        return plan_columns(self.inputs, self.teacher_has_own_layout)

    def column_name(self, index: int) -> str:
        s, t = self.columns[index]
        return f"S{s} / T{t}" if self.teacher_has_own_layout else f"stage {s}"

    def peak(self, stage: int) -> int:
        """Static memory plus the larger of the training and rollout phases (they never overlap)."""
        total = {"static": 0, "train": 0, "rollout": 0}
        for row in self.rows:
            total[row.phase] += row.bytes_per_stage[stage]
        return total["static"] + max(total["train"], total["rollout"])

    @property
    def peaks(self) -> list[int]:
        return [self.peak(c) for c in range(len(self.columns))]

    @property
    def worst_stage(self) -> int:
        peaks = self.peaks
        return peaks.index(max(peaks))

    @property
    def fits(self) -> bool:
        return max(self.peaks) <= self.capacity

    @property
    def teacher_bytes(self) -> int:
        """The teacher's weights and its re-sharded output layer (own layout only) on the fullest GPU."""
        return sum(r.bytes_per_stage[self.worst_stage] for r in self.rows
                   if r.name.startswith(("teacher weights", "teacher output layer")))

    @property
    def headroom(self) -> int:
        """Bytes left on the fullest GPU (negative: over)."""
        return self.capacity - max(self.peaks)

    def largest_item(self, stage: Optional[int] = None) -> Row:
        stage = self.worst_stage if stage is None else stage
        return max(self.rows, key=lambda r: r.bytes_per_stage[stage])

    def row(self, name_start: str) -> Row:
        return next(r for r in self.rows if r.name.startswith(name_start))

    # ---- text ----
    def layout_line(self) -> str:
        i = self.inputs
        where = f"TP={i.tp} PP={i.pp} DP={i.dp}{_experts(self.student, i.ep)}"
        if self.teacher_has_own_layout:
            t = i.teacher_layout
            where = (f"student {where}, teacher TP={t.tensor} PP={t.pipeline} DP={t.data_parallel}"
                     f"{_experts(self.teacher, t.expert)} on its own process groups (serving "
                     f"{_replicas(replicas_served(i.student_layout, t))})")
        elif self.teacher:
            where = (f"student and teacher (co-located) {where}"
                     f"{_experts(self.teacher, i.teacher_ep) if not self.student.is_moe else ''}")
        return (f"{where} (world {i.world_size}), micro-batch {i.micro_batch} x "
                f"{i.micro_batches} per step (global {i.global_batch}), sequence {i.seq_len}, {i.dtype}, "
                f"distributed optimizer {'on' if i.distributed_optimizer else 'off'}, "
                f"recompute {i.recompute}, attention {'local (scores kept)' if i.attention_scores else 'fused'}")

    def table(self) -> str:
        count = len(self.columns)
        shown = list(range(count)) if count <= 8 else [0, 1, count - 2, count - 1]
        names = [self.column_name(c) for c in shown]
        width = max(len(r.name) + (len(r.note) + 3 if r.note else 0) for r in self.rows) + 2
        width = max(width, 34)
        lines = [
            f"student: {_describe(self.student)}",
            f"teacher: {_describe(self.teacher) if self.teacher else 'none'}",
            f"layout:  {self.layout_line()}; padded vocabulary {self.padded_vocab}",
            *(["columns: the GPUs holding student pipeline stage S and teacher pipeline stage T"]
              if self.teacher_has_own_layout else []),
            "",
            f"{'per rank, GiB':<{width}}" + "".join(f"{n:>15}" for n in names),
            f"{'  student parameters (exact)':<{width}}" + "".join(f"{self.student_params[s]:>15,}" for s in shown),
        ]
        if self.teacher:
            lines.append(f"{'  teacher parameters (exact)':<{width}}"
                         + "".join(f"{self.teacher_params[s]:>15,}" for s in shown))
        for phase, title in (("static", "always resident"), ("train", "training step (transient)"),
                             ("rollout", "rollout (transient, not with training)")):
            rows = [r for r in self.rows if r.phase == phase]
            if not rows:
                continue
            lines.append(f"{title}:")
            for r in rows:
                label = f"  {r.name}" + (f" ({r.note})" if r.note else "")
                lines.append(f"{label:<{width}}" + "".join(f"{r.bytes_per_stage[s] / GIB:>15.2f}" for s in shown))
        lines.append(f"{'peak':<{width}}" + "".join(f"{self.peak(s) / GIB:>15.2f}" for s in shown))
        lines.append(f"{'GPU memory':<{width}}" + "".join(f"{self.capacity / GIB:>15.2f}" for _ in shown))
        lines.append(self.verdict())
        if self.host is not None:
            lines += ["", *self.host.lines()]
        return "\n".join(lines)

    def verdict(self) -> str:
        worst = self.worst_stage
        peak = self.peak(worst)
        where = self.column_name(worst)
        if self.fits:
            return (f"verdict: FITS, worst {where} at {peak / GIB:.1f} of {self.capacity / GIB:.0f} GiB "
                    f"({(self.capacity - peak) / GIB:.1f} GiB headroom)")
        item = self.largest_item(worst)
        return (f"verdict: DOES NOT FIT, {where} needs {peak / GIB:.1f} GiB of {self.capacity / GIB:.0f} GiB; "
                f"largest item: {item.name} ({item.bytes_per_stage[worst] / GIB:.1f} GiB)")


def plan_columns(i: PlanInputs, own_teacher: bool) -> list[tuple[int, int]]:
    """The kinds of GPU: (student stage, teacher stage) pairs with a teacher on its own groups
    (placement.py ``stage_pairs``), else the student's stages (a co-located teacher's are the same)."""
    return stage_pairs(i.student_layout, i.teacher_layout) if own_teacher else [(s, s) for s in range(i.pp)]


def _replicas(count: int) -> str:
    return f"{count} student replica{'s' if count != 1 else ''}"


def _experts(spec: ArchSpec, ep: int) -> str:
    """A MoE model's expert parallelism in the layout line ("" for a dense model)."""
    return f" EP={ep}" if spec.is_moe else ""


def _describe(spec: ArchSpec) -> str:
    moe = (f", {active_parameters(spec) / 1e9:.2f}B active ({spec.moe_top_k} of {spec.num_experts} experts of "
           f"width {spec.moe_ffn_hidden_size} per token)" if spec.is_moe else "")
    return (f"{spec.model_type}, {total_parameters(spec) / 1e9:.2f}B parameters{moe}, {spec.num_layers} layers, "
            f"hidden {spec.hidden_size}, {spec.num_heads} heads / {spec.num_query_groups} kv, vocab {spec.vocab_size}"
            f"{', tied embeddings' if spec.tie_embeddings else ''}")


# ---- activation estimates (bytes), per TP rank ----

def layer_saved_activations(spec: ArchSpec, tp: int, tokens: int, batch: int, seq: int, elem: int,
                             scores: bool) -> int:
    """What one layer keeps for backward (local spec, no sequence parallelism), as measured against the storages
    autograd saves (tests/test_plan.py): torch RMSNorm, computing in fp32, keeps an fp32 copy of its input, the fp32
    normalised value and rsqrt; the MLP what ``mlp_saved_activations`` says; rope its cos/sin.
    ``scores``: the local core attention, which keeps q/k/v repeated to every head, the fp32 softmax (plus its
    low-precision copy) and the mask; fused kernels (SDPA/TE, or core attention recomputed) keep the qkv output,
    the rotated q and k, the context and a logsumexp."""
    h, d, t, e = spec.hidden_size, spec.head_dim, tokens, elem
    nh, ng = spec.num_heads // tp, spec.num_query_groups // tp
    saved = 2 * t * (8 * h + 4) + 2 * t * h * e + mlp_saved_activations(spec, tp, t, e) + 4 * seq * d * e
    if spec.qk_norm:
        saved += t * (nh + ng) * (8 * d + 4)
    if scores:
        saved += t * e * 4 * nh * d + batch * nh * seq * seq * (4 + (e if e < 4 else 0)) + seq * seq
    else:
        saved += t * e * ((nh + 2 * ng) * d + (nh + ng) * d + nh * d) + 4 * t * nh
    return saved


def dispatcher_buffers(spec: ArchSpec, tokens: int, elem: int) -> int:
    """A MoE layer's token dispatcher (megatron-core's alltoall dispatcher): the tokens permuted to their top-k
    experts going out, and the experts' outputs coming back, tokens x top_k x h each in the activation dtype (a
    rank receives as many rows as it sends under balanced routing); 0 for a dense model."""
    return 2 * tokens * spec.moe_top_k * spec.hidden_size * elem if spec.is_moe else 0


def mlp_saved_activations(spec: ArchSpec, tp: int, tokens: int, elem: int) -> int:
    """What one layer's MLP keeps for backward: SwiGLU keeps fc1's output, silu(gate), up and their product (five
    times its width per row, measured for the dense MLP); a MoE layer's experts the same over the tokens x top_k
    rows they receive (an estimate, balanced routing), plus the router's fp32 logits and probabilities
    [tokens, experts] and the dispatcher's permuted tokens both ways (the experts' input, the outputs to combine)."""
    if not spec.is_moe:
        return 5 * tokens * (spec.ffn_hidden_size // tp) * elem
    routed = tokens * spec.moe_top_k
    return (5 * routed * (spec.moe_ffn_hidden_size // tp) * elem + 2 * tokens * spec.num_experts * 4
            + dispatcher_buffers(spec, tokens, elem))


def stage_end_activations(spec: ArchSpec, tp: int, tokens: int, elem: int, first: bool, last: bool) -> int:
    """The input ids (and TP's mask) on the first stage, the final norm's saved tensors on the last."""
    out = 8 * tokens + (tokens if tp > 1 else 0) if first else 0
    return out + (tokens * (8 * spec.hidden_size + 4) + tokens * spec.hidden_size * elem if last else 0)


def layer_working_set(spec: ArchSpec, tp: int, tokens: int, batch: int, seq: int, elem: int, scores: bool) -> int:
    """Transient peak inside one layer's forward: attention scores and probabilities (local core attention), or
    the SwiGLU activations (a MoE layer's: over the tokens x top_k rows its experts receive, with the token
    dispatcher's buffers, one layer in flight at a time)."""
    attention = 2 * batch * (spec.num_heads // tp) * seq * seq if scores else 0
    if spec.is_moe:
        mlp = (tokens * spec.moe_top_k * 3 * spec.moe_ffn_hidden_size // tp * elem
               + dispatcher_buffers(spec, tokens, elem))
    else:
        mlp = tokens * 3 * spec.ffn_hidden_size // tp * elem
    return max(attention * elem, mlp) + 2 * tokens * spec.hidden_size * elem


def plan_memory(student: ArchSpec, teacher: Optional[ArchSpec], inputs: PlanInputs) -> MemoryPlan:
    """The per-GPU memory plan, a column per kind of GPU (``MemoryPlan.columns``); raises ParallelLayoutError (a
    ValueError) if the layout cannot split the models, ValueError if a teacher's own layout breaks the placement
    rule (placement.py); both name the config key."""
    i = inputs
    if i.world_size % (i.tp * i.pp):
        raise ValueError(f"world size {i.world_size} is not divisible by TP {i.tp} x PP {i.pp}")
    if i.dp % i.ep:
        raise ValueError(f"parallel.expert: {i.ep} must divide the student's {i.dp} data-parallel replicas (its "
                         f"experts are split over that many of them)")
    models = [student] + ([teacher] if teacher else [])
    own = teacher is not None and i.teacher_on_own_groups(teacher)
    # co-located, a MoE teacher's experts are split over the student's expert groups (teacher_on_own_groups)
    t_lay = i.teacher_layout if own else Layout(i.tp, i.pp, i.world_size, expert=i.teacher_ep)
    if own:
        problem = placement_problem(i.student_layout, t_lay.tensor, t_lay.pipeline, expert=t_lay.expert)
        if problem:
            raise ValueError(problem)
    # both models' vocabulary shards equal at either tensor-parallel size (planning/inputs.py pads the same way)
    vocab = shared_padded_vocab(models, math.lcm(i.tp, t_lay.tensor))
    _check_split(student, Layout(i.tp, i.pp, i.world_size, expert=i.ep), vocab, "parallel", "parallel.expert",
                 trained=True)
    if teacher:
        _check_split(teacher, t_lay, vocab, "parallel.teacher" if own else "parallel", "parallel.teacher.expert")
    elem = DTYPES[i.dtype].itemsize
    columns = plan_columns(i, own)   # (student stage, teacher stage) of each kind of GPU
    s_last = i.pp - 1
    s_params = [stage_parameters(student, i.tp, i.pp, s, vocab, ep=i.ep) for s, _ in columns]
    s_experts = [stage_expert_parameters(student, i.tp, i.pp, s, vocab, ep=i.ep) for s, _ in columns]
    t_params = [stage_parameters(teacher, t_lay.tensor, t_lay.pipeline, t, vocab, head=not own, ep=t_lay.expert)
                if teacher else 0 for _, t in columns]
    plan = MemoryPlan(i, student, teacher, vocab, s_params, t_params)
    rows = plan.rows

    optimizer_bytes = ADAM_MOMENT_BYTES + (MASTER_WEIGHT_BYTES if i.dtype != "fp32" else 0)   # per parameter

    shards = i.dp if i.distributed_optimizer else 1
    expert_shards = i.dp // i.ep if i.distributed_optimizer else 1   # megatron-core's expert data-parallel group
    if teacher:
        rows.append(Row("teacher weights", [p * elem for p in t_params],
                        note=f"{i.dtype}, frozen" + (", no output layer" if own else "")))
    if own:
        head = head_copy_parameters(teacher, i.tp, vocab) * elem
        rows.append(Row("teacher output layer, re-sharded", [head if s == s_last else 0 for s, _ in columns],
                        note=f"V/{i.tp} rows on the student's last stage"))
    moe_note = f", experts /{i.ep} over EP" if student.is_moe and i.ep > 1 else ""
    rows.append(Row("student weights", [p * elem for p in s_params], note=i.dtype + moe_note))
    rows.append(Row("student gradients", [p * GRAD_BUFFER_BYTES for p in s_params], note="fp32 buffer" + moe_note))
    opt_note = ("Adam moments" + (" + fp32 master" if i.dtype != "fp32" else "")
                + (f", /{shards} over DP" if shards > 1 else "")
                + (f", experts' /{expert_shards} over DP/EP" if student.is_moe and i.ep > 1 and shards > 1 else ""))
    optimizer = [-(-(p - x) * optimizer_bytes // shards) + -(-x * optimizer_bytes // expert_shards)
                 for p, x in zip(s_params, s_experts)]   # x: the rank's expert parameters
    rows.append(Row("optimizer state", optimizer, note=opt_note))
    rows.append(Row("CUDA/NCCL runtime reserve", [RUNTIME_RESERVE] * len(columns)))

    b, seq = i.micro_batch, i.seq_len
    tokens = b * seq
    layers = student.num_layers // i.pp
    layouts = [(student, i.tp)] + ([(teacher, t_lay.tensor)] if teacher else [])
    activations, working, logits = [], [], []
    for s, _ in columns:
        in_flight = min(i.pp - s, i.micro_batches) if i.pp > 1 else 1      # 1F1B keeps PP - s micro-batches
        ends = stage_end_activations(student, i.tp, tokens, elem, s == 0, s == s_last)
        if i.recompute == "full":   # only each layer's input is kept; one layer is recomputed at a time
            kept = in_flight * (layers * tokens * student.hidden_size * elem + ends)
            kept += layer_saved_activations(student, i.tp, tokens, b, seq, elem, i.attention_scores)
        else:                       # selective recomputes the core attention: its probabilities are not kept
            scores = i.attention_scores and i.recompute == "none"
            kept = in_flight * (layers * layer_saved_activations(student, i.tp, tokens, b, seq, elem, scores) + ends)
        if teacher and not own and i.pp > 1:  # co-located, the teacher's hidden states travel with the student's
            kept += in_flight * tokens * teacher.hidden_size * elem
        activations.append(kept)
        # a teacher on its own layout runs one forward-only micro-batch at a time, before the student's pass
        working.append(max(layer_working_set(m, tp, tokens, b, seq, elem, i.attention_scores) for m, tp in layouts))
        chunk = min(i.chunk_size, tokens)
        logits.append(((1 + len(models)) * tokens * (vocab // i.tp) * elem     # both models' logits + logit grad
                       + LOSS_CHUNK_COPIES * chunk * (vocab // i.tp) * 4) if s == s_last else 0)
    rows.append(Row("student activations", activations, "train",
                    note=f"recompute {i.recompute}, 1F1B in flight"))
    rows.append(Row("layer working set", working, "train", note="attention scores / MLP"))
    rows.append(Row("logits + loss chunk buffers", logits, "train", note=f"chunk {i.chunk_size}"))
    if own:
        rows.extend(teacher_hidden_state_rows(teacher, i, columns))
    if i.rollout and i.vllm_memory_fraction:
        rows.extend(vllm_replica_rows(i, len(columns)))
    elif i.rollout:
        batch = max(1, i.global_batch // i.dp)   # a rank samples all of its sequences of the step at once
        kv = [2 * layers * (student.num_query_groups // i.tp) * student.head_dim * batch * i.rollout_len * elem
              for _ in columns]
        rows.append(Row("student KV cache", kv, "rollout", note=f"{batch} sequences x {i.rollout_len} tokens"))
        gen_logits = [batch * (vocab // i.tp) * 4 * 2 if s == s_last else 0 for s, _ in columns]
        rows.append(Row("sampling logits", gen_logits, "rollout"))
    return plan


def _check_split(spec: ArchSpec, layout: Layout, padded_vocab: int, key: str, expert_key: str,
                 trained: bool = False) -> None:
    """check_parallel_layout, its one-line error naming the key that sets the layout: ``key`` for tensor, pipeline
    and vocabulary, ``expert_key`` for the experts (ParallelLayoutError); ``trained``: the student."""
    for ep, name in ((1, key), (layout.expert, expert_key)):
        try:
            check_parallel_layout(spec, layout.tensor, layout.pipeline, padded_vocab=padded_vocab, ep=ep,
                                  trained=trained)
        except ParallelLayoutError as error:
            raise ParallelLayoutError(f"{name}: {error}") from None


def teacher_hidden_state_rows(teacher: ArchSpec, i: PlanInputs, columns: list[tuple[int, int]]) -> list[Row]:
    """A teacher on its own layout hands over its final hidden states (rows x sequence x h_t per student replica,
    the model's dtype): its last stage holds those of all g replicas it serves after its forward, each student
    last-stage rank keeps its replica's for the whole step (where it is a teacher last-stage rank too, they are a
    slice of the former). Both in the training step's phase, with the student's pass (an upper bound: the
    teacher's forward comes first)."""
    states = i.micro_batch * i.micro_batches * i.seq_len * teacher.hidden_size * DTYPES[i.dtype].itemsize
    g, t_last = replicas_served(i.student_layout, i.teacher_layout), i.teacher_layout.pipeline - 1
    return [Row("teacher hidden states, all served", [g * states if t == t_last else 0 for _, t in columns], "train",
                note=f"{g} replicas, teacher's last stage"),
            Row("teacher hidden states, stashed", [states if s == i.pp - 1 and t != t_last else 0 for s, t in columns],
                "train", note="student's last stage, the step")]


def vllm_replica_rows(i: PlanInputs, stages: int) -> list[Row]:
    """What a colocated vLLM replica (rollout.engine=vllm) costs every rank: its share of the GPU while it samples
    (weights + KV cache; vLLM takes exactly that much), and the CUDA graphs it keeps while asleep in training
    (an estimate: vLLM's graph pool for its default batch sizes)."""
    share = int(i.vllm_memory_fraction * i.gpu_memory_gib * GIB)
    return [Row("vLLM replica asleep (CUDA graphs)", [VLLM_ASLEEP_BYTES] * stages, note="estimate"),
            Row("vLLM replica: weights + KV cache", [share] * stages, "rollout",
                note=f"rollout.vllm_memory_fraction {i.vllm_memory_fraction:g}"),
            # models/weight_stream.py: one bucket gathered, its HF tensors cut from it one at a time
            Row("vLLM weight sync buffers", [i.weight_sync_bucket_bytes * 3 // 2] * stages, "rollout",
                note="1.5 buckets, rollout.weight_sync_bucket_mb")]


def check_vllm_share(student: ArchSpec, i: PlanInputs) -> Optional[str]:
    """Why the replica's share cannot hold the whole student (TP=1) with room for a KV cache, or None."""
    if not (i.rollout and i.vllm_memory_fraction):
        return None
    weights = total_parameters(student) * DTYPES[i.dtype].itemsize
    share = i.vllm_memory_fraction * i.gpu_memory_gib * GIB
    if weights * VLLM_MIN_SHARE_OVER_WEIGHTS > share:
        return (f"rollout.vllm_memory_fraction: {i.vllm_memory_fraction:g} of {i.gpu_memory_gib:.0f} GiB "
                f"({share / GIB:.1f} GiB) cannot hold the student's {weights / GIB:.1f} GiB of weights (TP=1) and a KV "
                f"cache; raise it to at least {min(0.95, weights * VLLM_MIN_SHARE_OVER_WEIGHTS / (i.gpu_memory_gib * GIB)):.2f} "
                f"or use rollout.engine=megatron")
    return None


# ---------------------------------------------------------------------------------------------------------------
# From a TrainConfig


def inputs_from_config(cfg, world_size: int, gpu_memory_gib: Optional[float] = None,
                       micro_batch: Optional[int] = None, vllm: Optional[bool] = None) -> PlanInputs:
    """The plan of a validated TrainConfig (its method's facts resolved: lambda is 0 for off-policy methods). On GPU
    ``models.attention=auto`` is a fused kernel (TE or SDPA), so only ``local`` keeps attention scores.
    ``micro_batch``: the size to plan when ``batch.micro_size`` is auto (else the config's); ``vllm``: whether a
    replica samples, as the run plan resolved it (None: from the config, auto counting one)."""
    r, p = cfg.rollout, cfg.parallel
    teacher_tp, teacher_pp = teacher_layout_of(p)
    own = (teacher_tp, teacher_pp) != (p.tensor, p.pipeline)   # else None: the student's, whatever that is
    return PlanInputs(
        tp=p.tensor, pp=p.pipeline, world_size=world_size,
        teacher_tp=teacher_tp if own else None, teacher_pp=teacher_pp if own else None,
        teacher_colocated=p.teacher.colocated, ep=p.expert, teacher_ep=p.teacher.expert,
        micro_batch=micro_batch or cfg.batch.micro_size, global_batch=cfg.batch.global_size,
        seq_len=cfg.data.max_length,
        dtype=cfg.precision.dtype, distributed_optimizer=cfg.optimizer.use_distributed_optimizer,
        recompute=cfg.models.recompute, attention_scores=cfg.models.attention == "local",
        rollout=r.on_policy_prob > 0, rollout_len=cfg.data.max_prompt_length + r.max_new_tokens,
        vllm_memory_fraction=r.vllm_memory_fraction if (_plans_vllm(cfg) if vllm is None else vllm) else 0.0,
        weight_sync_bucket_bytes=r.weight_sync_bucket_mb << 20,
        chunk_size=cfg.method.chunk_size,
        gpu_memory_gib=cfg.memory.gpu_memory_gib if gpu_memory_gib is None else gpu_memory_gib,
    )


def _plans_vllm(cfg) -> bool:
    """Whether the plan counts a vLLM replica: rollout.engine=vllm, or auto not yet resolved (tools/plan.py plans
    before any check of the environment; auto then counts the replica, the larger of the two), except for the
    co-generation methods, which always decode with megatron."""
    return cfg.rollout.engine in ("vllm", "auto") and not method_class(cfg.method.name).co_generation


def suggest_layout(student: ArchSpec, teacher: Optional[ArchSpec], inputs: PlanInputs) -> str:
    """The smallest model-parallel layout that fits (same world size first, then more GPUs), as a sentence."""
    def fitting(world_size: int, recompute: str):
        found = []
        for tp in (1, 2, 4, 8):
            for pp in range(1, 65):
                if world_size % (tp * pp):
                    continue
                candidate = PlanInputs(**{**inputs.__dict__, "tp": tp, "pp": pp, "world_size": world_size,
                                          "recompute": recompute})
                try:
                    plan = plan_memory(student, teacher, candidate)
                except ValueError:
                    continue
                if plan.fits:
                    found.append((tp * pp, -tp, max(plan.peaks), tp, pp))
        return min(found) if found else None

    for recompute in dict.fromkeys([inputs.recompute, "full"]):
        best = fitting(inputs.world_size, recompute)
        if best:
            _, _, peak, tp, pp = best
            extra = f" models.recompute={recompute}" if recompute != inputs.recompute else ""
            return (f"try parallel.tensor={tp} parallel.pipeline={pp}{extra} "
                    f"(peak {peak / GIB:.1f} GiB at world size {inputs.world_size})")
    mp = inputs.tp * inputs.pp
    for world in sorted({mp * k for k in range(1, 65)} | {8 * k for k in range(1, 65)}):
        if world <= inputs.world_size:
            continue
        best = fitting(world, inputs.recompute)
        if best:
            _, _, peak, tp, pp = best
            return (f"no layout fits on {inputs.world_size} GPUs; {world} GPUs would fit with parallel.tensor={tp} "
                    f"parallel.pipeline={pp} (peak {peak / GIB:.1f} GiB)")
    return "no tensor/pipeline layout up to 512 GPUs fits; shorten data.max_length or use GPUs with more memory"


def as_spec(config) -> ArchSpec:
    """An ArchSpec from an ArchSpec or a transformers config."""
    return config if isinstance(config, ArchSpec) else arch_spec(config)


# ---------------------------------------------------------------------------------------------------------------
# Model configs for planning before the weights exist


def load_hf_spec(path: str, role: str) -> tuple[ArchSpec, str]:
    """An ArchSpec from a model folder, a config.json, or (when the folder does not exist yet) the config shipped in
    configs/hf/<folder name>/ for users who have no weights yet. Returns the spec and where it came from."""
    candidates = [path]
    if not os.path.exists(path):
        candidates.append(os.path.join(SHIPPED_HF_CONFIGS, os.path.basename(os.path.normpath(path))))
    for candidate in candidates:
        folder = os.path.dirname(candidate) if candidate.endswith(".json") else candidate
        if os.path.isfile(os.path.join(folder, "config.json")):
            return arch_spec(read_hf_config(folder)), os.path.normpath(os.path.join(folder, "config.json"))
    raise FileNotFoundError(f"{role}: no config.json at {path}"
                            + (f" nor in {os.path.normpath(candidates[-1])}" if len(candidates) > 1 else "")
                            + f"; pass --{role}-config PATH")
