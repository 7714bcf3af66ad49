"""Per-GPU memory plan of an ``engine: deepspeed`` run (engines/deepspeed/engine.py), before anything is allocated.

The same table, rows and verdict as the megatron plan (planning/memory_plan.py, whose activation formulas it reuses
at TP=1), with DeepSpeed's model-state accounting. N is the student's parameter count (exact, from the mapping),
L its largest single parameter block (a transformer layer or the embedding), d the data-parallel GPUs, e the bytes
of the model dtype. Per GPU:

    ZeRO-2:          weights e*N + gradients e*N/d (the 16-bit partition) + optimizer 16*N/d
    ZeRO-2, offload: weights e*N (gradients and optimizer state live in CPU memory)
    ZeRO-3:          weights e*N/d + optimizer 16*N/d + the gathered largest block (weights + gradients) 4*L
    ZeRO-3, offload: weights e*N/d + 4*L

"optimizer" is the fp32 master copy, Adam's two moments and the fp32 gradient partition (4 + 8 + 4 bytes; fp32
weights are their own master: 12). For bf16 these are DeepSpeed's own estimators
(``estimate_zero2_model_states_mem_needs`` / ``estimate_zero3_model_states_mem_needs``, tests/test_plan.py checks the
equality); DeepSpeed has no estimator of activations, logits or the teacher, so those rows are ours. The teacher is
a ZeRO-3 inference engine (weights e*Nt/d plus its largest block gathered and one prefetched) or a full copy per GPU.
The models are transformers modules at TP=1 with fused (SDPA) attention unless ``models.attention=local`` (HF's
eager attention); their logits cover the whole vocabulary. Rollouts are transformers' ``generate``: a KV cache for
the rank's sequences of the step. ``zero_host_load_bytes`` is the host's side of loading, for the host verdict.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_tsdkd.models.dtypes import DTYPES
from megatron_tsdkd.models.hf_config import ArchSpec
from megatron_tsdkd.planning.memory_plan import (GIB, LOSS_CHUNK_COPIES, RUNTIME_RESERVE, MemoryPlan, PlanInputs, Row,
                                                 layer_parameters, layer_saved_activations, layer_working_set,
                                                 stage_end_activations, stage_parameters, suggest_layout,
                                                 total_parameters, vllm_replica_rows)

ZERO_OPTIMIZER_BYTES = 16       # fp32 master + Adam moments + fp32 gradient partition, per parameter (bf16/fp16)
GATHERED_BLOCK_BYTES = 4        # ZeRO-3: the largest block's 16-bit weights and gradients, gathered


@dataclass(frozen=True)
class ZeroSettings:
    zero_stage: int = 3
    offload_optimizer: bool = False
    teacher_zero3: bool = True


@dataclass
class ZeroMemoryPlan(MemoryPlan):
    zero: ZeroSettings = ZeroSettings()

    def layout_line(self) -> str:
        i, z = self.inputs, self.zero
        return (f"DeepSpeed ZeRO-{z.zero_stage} over {i.dp} GPUs (world {i.world_size}), optimizer "
                f"{'offloaded to CPU' if z.offload_optimizer else 'on GPU'}, teacher "
                f"{'ZeRO-3 partitioned' if z.teacher_zero3 else 'a full copy per GPU'}, micro-batch {i.micro_batch}"
                f" x {i.micro_batches} per step (global {i.global_batch}), sequence {i.seq_len}, {i.dtype}, "
                f"recompute {i.recompute}, attention {'eager (scores kept)' if i.attention_scores else 'SDPA'}")


def largest_block(spec: ArchSpec) -> int:
    """The largest parameter block ZeRO-3 gathers at once: one transformer layer, or the embedding / LM head."""
    return max(layer_parameters(spec, 1, spec.vocab_size), spec.vocab_size * spec.hidden_size)


def student_state_bytes(params: int, block: int, dp: int, dtype: str, zero: ZeroSettings) -> dict[str, int]:
    """The student's model states per GPU, by row (see the module docstring)."""
    e = DTYPES[dtype].itemsize
    optimizer = ZERO_OPTIMIZER_BYTES if e < 4 else ZERO_OPTIMIZER_BYTES - 4
    if zero.zero_stage == 2:
        rows = {"student weights": e * params}
        if not zero.offload_optimizer:
            rows["student gradients"] = -(-e * params // dp)
            rows["optimizer state"] = -(-optimizer * params // dp)
        return rows
    rows = {"student weights": -(-e * params // dp), "gathered largest block": GATHERED_BLOCK_BYTES * block}
    if not zero.offload_optimizer:
        rows["optimizer state"] = -(-optimizer * params // dp)
    return rows


def plan_zero_memory(student: ArchSpec, teacher: Optional[ArchSpec], inputs: PlanInputs,
                     zero: ZeroSettings) -> ZeroMemoryPlan:
    """The per-GPU plan of a DeepSpeed run (one 'stage': every GPU holds the same)."""
    i = inputs
    if i.tp != 1 or i.pp != 1:
        raise ValueError("engine=deepspeed plans TP=1 PP=1 only")
    elem = DTYPES[i.dtype].itemsize
    s_params = stage_parameters(student, 1, 1, 0, student.vocab_size)
    t_params = stage_parameters(teacher, 1, 1, 0, teacher.vocab_size) if teacher else 0
    vocab = max(student.vocab_size, teacher.vocab_size if teacher else 0)
    plan = ZeroMemoryPlan(i, student, teacher, vocab, [s_params], [t_params], zero=zero)
    rows = plan.rows
    if teacher:
        if zero.teacher_zero3:
            rows.append(Row("teacher weights", [-(-t_params * elem // i.dp) + 2 * elem * largest_block(teacher)],
                            note=f"{i.dtype}, ZeRO-3 /{i.dp} + 2 gathered blocks"))
        else:
            rows.append(Row("teacher weights", [t_params * elem], note=f"{i.dtype}, full copy"))
    notes = {"student weights": i.dtype + (f", /{i.dp}" if zero.zero_stage == 3 else ""),
             "student gradients": f"{i.dtype}, /{i.dp}",
             "optimizer state": f"fp32 master + Adam + fp32 grads, /{i.dp}",
             "gathered largest block": "weights + gradients"}
    for name, value in student_state_bytes(s_params, largest_block(student), i.dp, i.dtype, zero).items():
        rows.append(Row(name, [value], note=notes[name]))
    rows.append(Row("CUDA/NCCL runtime reserve", [RUNTIME_RESERVE]))

    b, seq = i.micro_batch, i.seq_len
    tokens = b * seq
    models = [student] + ([teacher] if teacher else [])
    if i.recompute == "full":   # HF gradient checkpointing: each layer's input, one layer recomputed at a time
        kept = student.num_layers * tokens * student.hidden_size * elem
        kept += layer_saved_activations(student, 1, tokens, b, seq, elem, i.attention_scores)
    else:
        kept = student.num_layers * layer_saved_activations(student, 1, tokens, b, seq, elem, i.attention_scores)
    kept += stage_end_activations(student, 1, tokens, elem, True, True)
    rows.append(Row("student activations", [kept], "train", note=f"recompute {i.recompute}"))
    rows.append(Row("layer working set", [max(layer_working_set(m, 1, tokens, b, seq, elem, i.attention_scores)
                                              for m in models)], "train", note="attention scores / MLP"))
    chunk = min(i.chunk_size, tokens)
    rows.append(Row("logits + loss chunk buffers",
                    [(1 + len(models)) * tokens * vocab * elem + LOSS_CHUNK_COPIES * chunk * vocab * 4], "train",
                    note=f"full vocabulary, chunk {i.chunk_size}"))
    if i.rollout and i.vllm_memory_fraction:
        rows.extend(vllm_replica_rows(i, 1))
    elif i.rollout:
        batch = max(1, i.global_batch // i.dp)
        rows.append(Row("student KV cache", [2 * student.num_layers * student.num_query_groups * student.head_dim
                                             * batch * i.rollout_len * elem], "rollout",
                        note=f"{batch} sequences x {i.rollout_len} tokens"))
        rows.append(Row("sampling logits", [batch * vocab * 4 * 2], "rollout"))
    return plan


def largest_tensor(spec: ArchSpec) -> int:
    """The most elements in one HF tensor: the embedding (or output layer), an MLP projection or the query one; of a
    MoE model the experts' gate and up projections, which transformers holds as one [experts, 2 x width, h]
    parameter per layer."""
    mlp = 2 * spec.num_experts * spec.moe_ffn_hidden_size if spec.is_moe else spec.ffn_hidden_size
    return max(spec.vocab_size * spec.hidden_size, mlp * spec.hidden_size,
               spec.num_heads * spec.head_dim * spec.hidden_size)


def zero_host_load_bytes(student: ArchSpec, teacher: Optional[ArchSpec], inputs: PlanInputs,
                         zero: ZeroSettings) -> int:
    """Per rank, the peak host bytes the DeepSpeed engine materialises while it loads its models, beyond the ZeRO
    partitions themselves (the device plan counts those; on a GPU they live there). For the host verdict
    (host_memory_plan.py), which multiplies it by the ranks of a node.

    Partitioned (a ZeRO-3 student; the teacher under teacher_zero3 inference) a model is built under zero.Init and
    filled one module at a time from the memory-mapped checkpoint (deepspeed_engine.load_hf_model): only rank 0
    copies, and a tensor whose dtype differs from its parameter's is converted on the host first (torch's copy to a
    GPU): at most the largest tensor in fp32, 4*T (counted for every rank). Unpartitioned every rank materialises the
    whole model before it goes to the GPU: 4*N for the student (loaded in fp32, DeepSpeed casts; ZeRO-2 replicates
    the parameters, so it cannot load partitioned), e*Nt for a teacher kept as a full copy. The models load one after
    the other and the student's host copy is gone (partitioned or moved to the GPU by deepspeed.initialize) before
    the teacher's load: the peak is the larger of the two. The checkpoint pages the loader reads are page cache
    (mapped files: reclaimable, shared by the node's ranks), not counted. On a CPU run an unpartitioned model's host
    copy becomes its device copy, which the device plan counts too: an overestimate there."""
    elem = DTYPES[inputs.dtype].itemsize
    peak = 4 * (largest_tensor(student) if zero.zero_stage == 3 else total_parameters(student))
    if teacher is not None:
        peak = max(peak, 4 * largest_tensor(teacher) if zero.teacher_zero3 else elem * total_parameters(teacher))
    return peak


def zero_host_state_bytes(student: ArchSpec, inputs: PlanInputs, zero: ZeroSettings) -> int:
    """Per rank, the optimizer state ZeRO-Offload keeps in host memory (deepspeed.offload_optimizer=cpu): this
    rank's partition of the fp32 master weights and Adam moments, and of the fp32 gradients it steps on; 0 without
    offload. The host verdict (host_memory_plan.py) multiplies it by the ranks of a node."""
    if not zero.offload_optimizer:
        return 0
    e = DTYPES[inputs.dtype].itemsize
    per_parameter = ZERO_OPTIMIZER_BYTES if e < 4 else ZERO_OPTIMIZER_BYTES - 4   # the fp32 gradients included
    return -(-per_parameter * total_parameters(student) // inputs.dp)


def zero_settings(cfg) -> ZeroSettings:
    d = cfg.deepspeed
    return ZeroSettings(d.zero_stage, d.offload_optimizer == "cpu", d.teacher_zero3_inference)


def suggest_zero(student: ArchSpec, teacher: Optional[ArchSpec], inputs: PlanInputs, zero: ZeroSettings) -> str:
    """The first DeepSpeed setting that fits (ZeRO-3, then offload, then recompute), else the megatron engine."""

    candidates = [(ZeroSettings(3, zero.offload_optimizer, True), inputs.recompute),
                  (ZeroSettings(3, True, True), inputs.recompute), (ZeroSettings(3, True, True), "full")]
    for settings, recompute in candidates:
        candidate = PlanInputs(**{**inputs.__dict__, "recompute": recompute})
        plan = plan_zero_memory(student, teacher, candidate, settings)
        if plan.fits:
            keys = [f"deepspeed.zero_stage={settings.zero_stage}"]
            if settings.offload_optimizer:
                keys.append("deepspeed.offload_optimizer=cpu")
            if settings.teacher_zero3 != zero.teacher_zero3:
                keys.append("deepspeed.teacher_zero3_inference=true")
            if recompute != inputs.recompute:
                keys.append(f"models.recompute={recompute}")
            return f"try {' '.join(keys)} (peak {max(plan.peaks) / GIB:.1f} GiB)"
    return f"no ZeRO setting fits; use engine=megatron: {suggest_layout(student, teacher, inputs)}"
