"""``engine: deepspeed``: the same methods, losses, data pipeline, metrics and checkpoint rules on Hugging Face models
with DeepSpeed ZeRO, for users on one node who want no conversion step.

What differs from the megatron engine (engines/megatron/engine.py), and nothing else:
- the models are transformers ``AutoModelForCausalLM`` read from the HF folders (a megatron checkpoint source stops
  with one sentence: export it first); parallelism is data parallelism only (parallel.tensor = pipeline = 1);
- the student is a ``deepspeed.initialize`` engine: ZeRO stage 2 or 3, bf16 or fp32 per precision.dtype, Adam per
  ``deepspeed.optimizer`` ("torch_adam": torch.optim.AdamW, no JIT build), optional CPU offload of the optimizer
  state, gradient accumulation over the step's micro-batches and DeepSpeed's gradient_clipping;
- the teacher is frozen and never in an optimizer: a ZeRO-3 engine without optimizer (its parameters partitioned
  over the ranks and gathered layer by layer in the forward, as TRL prepares its reference models), or a full
  copy per rank with ``deepspeed.teacher_zero3_inference=false``;
- rollouts use transformers' ``generate`` on the student (KV cache of HF's own; under ZeRO-3 every step of the
  decode gathers every layer's weights, and ``synced_gpus`` keeps all ranks decoding until the longest is done, so
  an on-policy step costs about max_new_tokens student forwards of gather traffic: the megatron engine's TP
  generation is much cheaper for large students); or, with ``rollout.engine=vllm``, a colocated TP=1 vLLM replica
  per rank (generation/vllm_rollouts.py), fed the student's weights one module at a time after each optimizer step
  (under ZeRO-3 one module's gather at a time, so no rank holds a second full copy);
- checkpoints are DeepSpeed's own ``save_checkpoint`` / ``load_checkpoint`` in ``<checkpoint.dir>/step_NNNNNN``
  (model, ZeRO optimizer shards) with the trainer state (step, sampler) as client state; the folder also holds
  config.yaml and hf_meta/. ``latest`` (DeepSpeed's marker: a file naming the tag) is written by us, atomically,
  only after every rank finished the save, so it never names a half-written checkpoint. ZeRO checkpoints resume at
  the same number of processes.
The step itself is the megatron engine's (engines/trainer.py); settings.py holds the engine's pure functions.

Loss normalisation is the megatron engine's: each micro-batch's method loss (a mean over its targets) is weighted
by its target count and the gradients are divided by the step's total targets over all data-parallel ranks (the
backward sees ``loss * n * dp / N``; DeepSpeed averages over the dp ranks). The learning rate follows the
megatron engine's schedule value for value (``lr_at``), set on the optimizer's groups before each step; weight
decay skips biases and 1-D parameters, as megatron-core does.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Optional

import deepspeed
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_tsdkd.config import TrainConfig
from megatron_tsdkd.engines.deepspeed.settings import (ds_config, load_hf_model, lr_at, param_groups,
                                                       teacher_ds_config)
from megatron_tsdkd.engines.loop import Update
from megatron_tsdkd.engines.preemption import job_signals_deferred
from megatron_tsdkd.generation.rollout_backends import HfGenerate
from megatron_tsdkd.generation.vllm_rollouts import colocated_vllm_rollouts
from megatron_tsdkd.methods import LossContext
from megatron_tsdkd.models import HF_META_DIR, copy_hf_meta
from megatron_tsdkd.models.dtypes import DTYPES
from megatron_tsdkd.models.hf_export import EXPORT_MARKER, written_by_export
from megatron_tsdkd.models.run_folder import prune, step_dir_name, write_latest
from megatron_tsdkd.planning.inputs import RunInputs
from megatron_tsdkd.planning.run_config import CONFIG_FILE, config_yaml
from megatron_tsdkd.planning.run_plan import RunPlan
from megatron_tsdkd.runtime import ParallelLayout, device, init_distributed
from megatron_tsdkd.runtime.atomic_files import honour_umask, write_text_atomic
from megatron_tsdkd.runtime.collectives import all_reduce_values, barrier
from megatron_tsdkd.runtime.timing import PhaseClock

log = logging.getLogger("megatron_tsdkd.train")


class DeepSpeedEngine:
    def __init__(self, cfg: TrainConfig, inputs: RunInputs, plan: RunPlan):
        self.cfg, self.inputs, self.plan = cfg, inputs, plan
        # torch.distributed (+ megatron's TP=PP=1 groups, which the shared metrics reduction reads); DeepSpeed
        # reuses the default process group
        init_distributed(ParallelLayout(1, 1), seed=cfg.seed)
        deepspeed.init_distributed(dist_backend=dist.get_backend())
        self.device, self.dp_rank, self.dp_size = device(), dist.get_rank(), dist.get_world_size()
        dtype = DTYPES[cfg.precision.dtype]
        torch.manual_seed(cfg.seed)
        # ZeRO-3 models load partitioned (settings.load_hf_model); DeepSpeed casts the student to the training dtype
        student_config = ds_config(cfg, self.dp_size, plan.micro_size)
        teacher_config = teacher_ds_config(cfg, plan.micro_size)
        zero3 = cfg.deepspeed.zero_stage == 3
        student = load_hf_model(inputs.student, torch.float32, student_config if zero3 else None)
        if cfg.models.recompute == "full":   # each layer's input kept, the layer recomputed in the backward
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.ds, self.optimizer, _, _ = deepspeed.initialize(
            model=student, model_parameters=param_groups(student, cfg.optimizer.weight_decay), config=student_config)
        self.teacher = None
        if inputs.teacher is not None:
            partitioned = cfg.deepspeed.teacher_zero3_inference
            teacher = load_hf_model(inputs.teacher, dtype, teacher_config if partitioned else None)
            teacher.requires_grad_(False)
            if partitioned:
                teacher, *_ = deepspeed.initialize(model=teacher, config=teacher_config)
            else:
                teacher = teacher.to(self.device)
            teacher.eval()
            self.teacher = teacher

    @property
    def student(self) -> torch.nn.Module:
        return self.ds.module

    # ---- the step ----------------------------------------------------------------------------------------------

    def loss_context(self, diagnose: bool) -> LossContext:
        return LossContext(None, None, self.inputs.tokens.vocab_size, diagnose)   # every rank a DP replica

    def computes_losses(self) -> bool:
        return True   # every rank holds whole models

    def forward_backward(self, batches, seq_len: int, loss):
        """Each micro-batch's forward (teacher, then student) and backward; DeepSpeed accumulates the gradients
        and steps at the last micro-batch's ``step`` (optimizer_step). Returns what the losses reported and the
        phase seconds."""
        counts = [b.targets.positions.numel() for b in batches]   # known on the host (data/collate.py)
        total = float(all_reduce_values([float(sum(counts))])[0])   # the step's targets over all ranks
        clock, reported = PhaseClock(), []   # CUDA events on GPU, wall time on CPU: no host sync inside the step
        for i, batch in enumerate(batches):
            teacher_logits = None
            if self.teacher is not None:
                with clock.phase("teacher_forward"), torch.no_grad():
                    teacher_logits = self._logits(self.teacher, batch)
            with clock.phase("student_forward"):
                student_logits = self._logits(self.ds, batch)
                # DeepSpeed hooks its outputs to divide gradients by GAS outside engine.backward: the term
                # gradients (diagnostics, the term balance) take autograd.grad up to this view, before that hook
                student_logits = student_logits.view_as(student_logits)
                if teacher_logits is not None and teacher_logits.shape[-1] != student_logits.shape[-1]:
                    width = min(teacher_logits.shape[-1], student_logits.shape[-1])   # both >= the real vocabulary
                    teacher_logits, student_logits = teacher_logits[..., :width], student_logits[..., :width]
                m = loss(batch, student_logits, teacher_logits)
            with clock.phase("student_backward"):
                self.ds.backward(m.loss * (counts[i] * self.dp_size / max(total, 1.0)), scale_wrt_gas=False)
                if i < len(batches) - 1:
                    self.ds.step()   # not the accumulation boundary: DeepSpeed only counts it
            reported.append(m.reported)
        return reported, {"teacher_forward": 0.0, "student_forward": 0.0, **clock.pop()}

    def _logits(self, model, batch) -> torch.Tensor:
        return model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits

    def optimizer_step(self, step: int) -> Update:
        lr = lr_at(self.cfg, self.plan.total_steps, step)   # megatron's schedule, value for value
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.ds.step()   # the accumulation boundary: clipping, then the optimizer
        scale = getattr(self.optimizer, "cur_scale", 1.0) if self.cfg.precision.dtype == "fp16" else 1.0
        return Update(self.ds.was_step_applied(), self.ds.get_global_grad_norm(), lr, scale)

    def from_loss_ranks(self, value):
        return value   # every rank computes the losses

    # ---- rollouts ------------------------------------------------------------------------------------------------

    def rollout_backend(self, name: str, method):
        if name == "vllm":
            # Every rank is its own data-parallel rank, so its "model-parallel group" is itself (megatron's TP=PP=1
            # group, size 1): the replica generates this rank's whole batch and gathers nothing.
            r = self.cfg.rollout
            return colocated_vllm_rollouts(
                self.inputs.student.meta_dir, dtype=DTYPES[self.cfg.precision.dtype], tokens=self.inputs.tokens,
                max_model_len=self.cfg.data.max_prompt_length + r.max_new_tokens, max_rows=self.plan.rows_per_rank,
                memory_fraction=r.vllm_memory_fraction, seed=self.cfg.seed, stream_weights=self.student_hf_tensors,
                group=ps.get_model_parallel_group())
        return HfGenerate(self.student, self.inputs.tokens, self.device,
                          synced_gpus=self.cfg.deepspeed.zero_stage == 3 and self.dp_size > 1)

    def student_hf_tensors(self):
        """(HF name, tensor) for every parameter of the student, for the vLLM replica's ``load_weights``. Streamed
        so that no rank holds a second full copy: under ZeRO-3 one module's own parameters are gathered at a time
        (collective over the world: every rank must drain the iterator, which they do, all being equally stale);
        under ZeRO-2 they are whole already and the gather is a no-op. Tensors are detached views, not copies: the
        consumer copies them (vLLM may buffer a few until a fused layer is complete; DeepSpeed's release swaps
        ``param.data`` for an empty tensor rather than overwriting it, so a buffered one stays valid). A tied
        parameter is sent under its first name only (the embedding): vLLM ties the output layer itself."""
        zero3, seen = self.cfg.deepspeed.zero_stage == 3, set()
        for prefix, module in self.student.named_modules():
            own = [(name, p) for name, p in module.named_parameters(recurse=False) if id(p) not in seen]
            if not own:
                continue
            seen.update(id(p) for _, p in own)
            with deepspeed.zero.GatheredParameters([p for _, p in own], modifier_rank=None, enabled=zero3):
                for name, param in own:
                    yield (f"{prefix}.{name}" if prefix else name), param.detach()

    # ---- checkpoints and export ------------------------------------------------------------------------------------

    def save(self, step: int, trainer_state: dict, resolved_cfg: TrainConfig) -> str:
        c = self.cfg.checkpoint
        tag = step_dir_name(step)
        folder = os.path.join(c.dir, tag)
        with job_signals_deferred():
            self.ds.save_checkpoint(c.dir, tag=tag, client_state={"trainer": trainer_state}, save_latest=False)
        barrier()
        if self.dp_rank == 0:
            copy_hf_meta(self.inputs.student.meta_dir, os.path.join(folder, HF_META_DIR))
            write_text_atomic(os.path.join(folder, CONFIG_FILE), config_yaml(resolved_cfg))
            write_latest(c.dir, tag)   # every rank's shard is on disk
            prune(c.dir, c.keep_last)
        barrier()
        return folder

    def finalize(self, blocking: bool) -> None:
        """Saves here are synchronous: nothing left to publish."""

    def load(self, folder: str, trainer_state: dict) -> dict:
        folder = os.path.normpath(folder)
        path, client = self.ds.load_checkpoint(os.path.dirname(folder), tag=os.path.basename(folder),
                                               load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:
            raise RuntimeError(f"{folder}: DeepSpeed could not load this checkpoint")
        return client["trainer"]

    def gathered_state_dict(self) -> Optional[dict]:
        """Collective: the student's full state dict on rank 0 (ZeRO-3 partitions gathered), None elsewhere."""
        if self.cfg.deepspeed.zero_stage == 3:
            state = self.ds._zero3_consolidated_16bit_state_dict()
        else:
            state = self.student.state_dict()
        return {k: v.detach().cpu().clone() for k, v in state.items()} if self.dp_rank == 0 else None

    def export_hf(self, out_dir: str) -> None:
        """Collective: the student as a Hugging Face folder (save_pretrained) with the source's tokenizer files."""
        state = self.gathered_state_dict()
        if self.dp_rank == 0:
            if written_by_export(out_dir):
                shutil.rmtree(out_dir)
            copy_hf_meta(self.inputs.student.meta_dir, out_dir)   # tokenizer, generation config
            self.student.save_pretrained(out_dir, state_dict=state)   # config.json of the trained model
            honour_umask(out_dir)   # safetensors writes 0600 files
            with open(os.path.join(out_dir, EXPORT_MARKER), "w") as f:
                json.dump({"engine": "deepspeed", "dtype": str(next(iter(state.values())).dtype)}, f)
        barrier()

    def accuracy_model(self):
        """No before/after accuracy on this engine (its student is a transformers model): evaluate the export."""
        return None

    def step_values(self) -> dict:
        """Nothing beyond the losses: this engine trains dense students only."""
        return {}

    def log_summary_lines(self) -> None:
        if self.dp_rank == 0:
            d = self.cfg.deepspeed
            log.info("engine: deepspeed ZeRO-%d (student; optimizer %s, offload %s), teacher %s", d.zero_stage,
                     d.optimizer, d.offload_optimizer,
                     "ZeRO-3 partitioned" if d.teacher_zero3_inference else "a full copy per rank")
