"""``engine: deepspeed``: the same methods, losses, data pipeline, metrics and checkpoint rules on Hugging Face models
with DeepSpeed ZeRO, for users on one node who want no conversion step.

What differs from the megatron engine (training/trainer.py), and nothing else:
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

Loss normalisation is the megatron engine's: each micro-batch's method loss (a mean over its targets) is weighted
by its target count and the gradients are divided by the step's total targets over all data-parallel ranks (the
backward sees ``loss * n * dp / N``; DeepSpeed averages over the dp ranks). The learning rate follows the
megatron engine's schedule value for value (``lr_at``), set on the optimizer's groups before each step; weight
decay skips biases and 1-D parameters, as megatron-core does.
"""
from __future__ import annotations

import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megatron_tsdkd.config import TrainConfig
from megatron_tsdkd.runtime.timing import PhaseClock
from megatron_tsdkd.data import micro_batches, training_sampler
from megatron_tsdkd.methods import build_method
from megatron_tsdkd.models.dtypes import DTYPES
from megatron_tsdkd.runtime.seeds import derive_seed
from megatron_tsdkd.training.inputs import PreflightError, RunInputs, check_inputs
from megatron_tsdkd.generation.token_selection import log_probs_of
from megatron_tsdkd.losses.rollout_drift import rollout_drift
from megatron_tsdkd.training.loop import Rollout, StepResult, TrainingLoop
from megatron_tsdkd.training.rollout_guard import RolloutGuard
from megatron_tsdkd.training.preemption import PreemptionFlag, job_signals_deferred

log = logging.getLogger("megatron_tsdkd.train")

# ---------------------------------------------------------------------------------------------------------------
# pure pieces: the schedule, the DeepSpeed config, the parameter groups


def lr_at(cfg: TrainConfig, total_steps: int, step: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based): megatron-core's OptimizerParamScheduler with the
    arguments training/optim.py gives it (linear warm-up from 0, then cosine / linear decay to min_lr, or constant)."""
    o, s = cfg.optimizer, cfg.schedule
    warmup = int(round(s.warmup_fraction * total_steps))
    decay_steps = max(total_steps, warmup + 1)
    init_lr = 0.0 if warmup else o.lr
    if warmup > 0 and step <= warmup:
        return init_lr + (o.lr - init_lr) * step / warmup
    if s.decay == "constant":
        return o.lr
    if step > decay_steps:
        return o.min_lr
    ratio = (step - warmup) / (decay_steps - warmup)
    coeff = 1.0 - ratio if s.decay == "linear" else 0.5 * (math.cos(math.pi * ratio) + 1.0)
    return o.min_lr + coeff * (o.lr - o.min_lr)


def ds_config(cfg: TrainConfig, dp_size: int) -> dict:
    """The student's DeepSpeed config."""
    d, o, b = cfg.deepspeed, cfg.optimizer, cfg.batch
    zero = {"stage": d.zero_stage}
    if d.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu"}
    adam = {"lr": o.lr, "betas": [o.adam_beta1, o.adam_beta2], "eps": o.adam_eps, "weight_decay": o.weight_decay}
    if d.optimizer == "torch_adam":
        adam["torch_adam"] = True
    config = {
        "train_batch_size": b.global_size,
        "train_micro_batch_size_per_gpu": b.micro_size,
        "gradient_accumulation_steps": b.global_size // (dp_size * b.micro_size),
        "gradient_clipping": o.clip_grad,
        "optimizer": {"type": "AdamW", "params": adam},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": d.optimizer == "cpu_adam",
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.precision.dtype == "bf16":
        config["bf16"] = {"enabled": True}
    elif cfg.precision.dtype == "fp16":
        config["fp16"] = {"enabled": True}
    return config


def teacher_ds_config(cfg: TrainConfig) -> dict:
    config = {"train_micro_batch_size_per_gpu": cfg.batch.micro_size, "zero_optimization": {"stage": 3},
              "steps_per_print": 10**9}
    if cfg.precision.dtype in ("bf16", "fp16"):
        config[cfg.precision.dtype] = {"enabled": True}
    return config


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """megatron-core's default rule: no weight decay for biases and 1-D parameters (norms). A parameter built under
    ZeRO-3's zero.Init holds an empty placeholder; its real shape is ``ds_shape``."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            dims = len(getattr(param, "ds_shape", param.shape))
            (no_decay if dims == 1 or name.endswith(".bias") else decay).append(param)
    return [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0})
            if g["params"]]


def check_hf_sources(inputs: RunInputs) -> None:
    for key, source in (("models.student.path", inputs.student), ("models.teacher.path", inputs.teacher)):
        if source is not None and source.format != "hf":
            raise PreflightError(f"{key}: {source.path} is a megatron-core checkpoint; engine=deepspeed loads Hugging "
                                 f"Face folders only: export it first (tsdkd-convert mcore-to-hf --mcore "
                                 f"{source.path} --out <folder>) or use engine=megatron")


def load_hf_model(source, dtype: torch.dtype, zero3_config: Optional[dict] = None) -> torch.nn.Module:
    """The HF model of ``source`` in ``dtype``. With ``zero3_config`` (the DeepSpeed config of the ZeRO-3 engine it
    will join) it is loaded partitioned, so no rank ever holds a full copy (issue 27): transformers builds it under
    ``deepspeed.zero.Init`` (each module's parameters split over the ranks as soon as the module exists, on the
    accelerator), then fills one module at a time: the ranks all-gather that module, rank 0 copies its tensors from
    the memory-mapped checkpoint, DeepSpeed re-partitions. Every rank maps the shard files; only rank 0 reads them.
    Without it (a ZeRO-2 student: ZeRO-2 replicates parameters, so every rank needs the whole student anyway; a
    teacher kept as a full copy per rank) every rank loads the whole model.

    transformers finds the config through a weak global reference to the last ``HfDeepSpeedConfig`` made: this one
    is held for the load only and dropped after, so the student's and the teacher's loads each see their own, and
    nothing later (generate, save_pretrained) sees one, as before."""
    from transformers import AutoModelForCausalLM

    if zero3_config is None:
        return AutoModelForCausalLM.from_pretrained(source.weights, dtype=dtype)
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    live = HfDeepSpeedConfig(zero3_config)
    if not live.is_zero3():
        raise ValueError("load_hf_model: zero3_config must be a ZeRO stage 3 config")
    try:
        return AutoModelForCausalLM.from_pretrained(source.weights, dtype=dtype)
    finally:
        unset_hf_deepspeed_config()
        del live


# ---------------------------------------------------------------------------------------------------------------
# the trainer


@dataclass
class _Parts:   # what metrics.startup_summary reads
    inputs: RunInputs
    memory_plan: object
    total_steps: int
    num_microbatches: int


class DeepSpeedTrainer(TrainingLoop):
    def __init__(self, cfg: TrainConfig, inputs: Optional[RunInputs] = None):
        import deepspeed

        from megatron_tsdkd.runtime import ParallelLayout, device, init_distributed

        self.cfg = cfg
        self.preemption = PreemptionFlag()           # first: a signal during loading must not be lost
        inputs = inputs or check_inputs(cfg)
        check_hf_sources(inputs)
        # torch.distributed (+ megatron's TP=PP=1 groups, which the shared metrics reduction reads); DeepSpeed
        # reuses the default process group
        init_distributed(ParallelLayout(1, 1), seed=cfg.seed)
        deepspeed.init_distributed(dist_backend=dist.get_backend())
        self.inputs, self.tokens, self.device = inputs, inputs.tokens, device()
        self.rank, self.dp_size = dist.get_rank(), dist.get_world_size()
        b = cfg.batch
        if b.global_size % (self.dp_size * b.micro_size):
            raise ValueError(f"batch.global_size ({b.global_size}) must be a multiple of data-parallel size "
                             f"({self.dp_size}) x batch.micro_size ({b.micro_size})")
        self.num_microbatches = b.global_size // (self.dp_size * b.micro_size)
        self.sampler = training_sampler(inputs.train, cfg.data, b.global_size // cfg.rollout.num_samples, self.rank,
                                        self.dp_size, cfg.seed)
        self.total_steps = cfg.schedule.max_steps or cfg.schedule.epochs * self.sampler.batches_per_epoch
        self.method = build_method(cfg.method)
        self.loss_names = ("total",) + self.method.logs
        from megatron_tsdkd.training.metrics import ShareWatch
        self.share_watch = ShareWatch(self.method.share_warning())
        r = cfg.rollout
        self.guard = RolloutGuard(r.engine, r.max_logprob_diff, r.logprob_diff_patience)

        dtype = DTYPES[cfg.precision.dtype]
        torch.manual_seed(cfg.seed)
        # ZeRO-3 models load partitioned (load_hf_model); DeepSpeed casts the student to the training dtype
        student_config, teacher_config = ds_config(cfg, self.dp_size), teacher_ds_config(cfg)
        zero3 = cfg.deepspeed.zero_stage == 3
        student = load_hf_model(inputs.student, torch.float32, student_config if zero3 else None)
        if cfg.models.recompute == "full":   # each layer's input kept, the layer recomputed in the backward
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
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
        self.parts = _Parts(inputs, inputs.memory_plan, self.total_steps, self.num_microbatches)
        self.step = 0
        self.stopped_by_signal = False
        # Last, after the models and the optimizer, as training/build.py builds it for the megatron engine. Every rank
        # is its own data-parallel rank, so its "model-parallel group" is itself (megatron's TP=PP=1 group, size 1):
        # the replica generates this rank's whole batch and gathers nothing. The whole world would be wrong there.
        from megatron.core import parallel_state as ps

        from megatron_tsdkd.training.build import build_vllm_rollouts

        self.rollouts = build_vllm_rollouts(cfg, inputs, self._student_hf_tensors, ps.get_model_parallel_group(),
                                            b.global_size // self.dp_size)

    @property
    def student(self) -> torch.nn.Module:
        return self.engine.module

    def _student_hf_tensors(self):
        """(HF name, tensor) for every parameter of the student, for the vLLM replica's ``load_weights``. Streamed
        so that no rank holds a second full copy: under ZeRO-3 one module's own parameters are gathered at a time
        (collective over the world: every rank must drain the iterator, which they do, all being equally stale);
        under ZeRO-2 they are whole already and the gather is a no-op. Tensors are detached views, not copies: the
        consumer copies them (vLLM may buffer a few until a fused layer is complete; DeepSpeed's release swaps
        ``param.data`` for an empty tensor rather than overwriting it, so a buffered one stays valid). A tied
        parameter is sent under its first name only (the embedding): vLLM ties the output layer itself."""
        import deepspeed

        zero3, seen = self.cfg.deepspeed.zero_stage == 3, set()
        for prefix, module in self.student.named_modules():
            own = [(name, p) for name, p in module.named_parameters(recurse=False) if id(p) not in seen]
            if not own:
                continue
            seen.update(id(p) for _, p in own)
            with deepspeed.zero.GatheredParameters([p for _, p in own], modifier_rank=None, enabled=zero3):
                for name, param in own:
                    yield (f"{prefix}.{name}" if prefix else name), param.detach()

    # ----------------------------------------------------------------------------------------------------------
    # checkpoints

    def save_checkpoint(self) -> str:
        from megatron_tsdkd.models import HF_META_DIR, copy_hf_meta
        from megatron_tsdkd.models.mcore_checkpoint import write_latest
        from megatron_tsdkd.runtime.atomic_files import write_text_atomic
        from megatron_tsdkd.runtime.collectives import barrier
        from megatron_tsdkd.training.checkpoint import _prune, step_dir_name
        from megatron_tsdkd.training.run_config import CONFIG_FILE, config_yaml

        c = self.cfg.checkpoint
        tag = step_dir_name(self.step)
        folder = os.path.join(c.dir, tag)
        state = {"trainer": {"step": self.step, "seed": self.cfg.seed, "sampler": self.sampler.state_dict(),
                             "method": self.method.state_dict()}}   # e.g. TSD-KD's term balance (same on every rank)
        with job_signals_deferred():
            self.engine.save_checkpoint(c.dir, tag=tag, client_state=state, save_latest=False)
        barrier()
        if self.rank == 0:
            copy_hf_meta(self.inputs.student.meta_dir, os.path.join(folder, HF_META_DIR))
            write_text_atomic(os.path.join(folder, CONFIG_FILE), config_yaml(self.cfg))
            write_latest(c.dir, tag)   # every rank's shard is on disk
            _prune(c.dir, c.keep_last)
        barrier()
        return folder

    def maybe_resume(self) -> bool:
        from megatron_tsdkd.training.checkpoint import latest_checkpoint

        resume = self.cfg.checkpoint.resume
        if resume == "none":
            return False
        folder = latest_checkpoint(self.cfg.checkpoint.dir) if resume == "auto" else resume
        if folder is None:
            return False
        folder = os.path.normpath(folder)
        path, client = self.engine.load_checkpoint(os.path.dirname(folder), tag=os.path.basename(folder),
                                                   load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:
            raise RuntimeError(f"{folder}: DeepSpeed could not load this checkpoint")
        state = client["trainer"]
        self.step = int(state["step"])
        self.sampler.load_state_dict(state["sampler"])
        self.method.load_state_dict(state.get("method", {}))
        if self.rollouts is not None:   # the replica holds the weights from before the load
            self.rollouts.weights_changed()
        if self.rank == 0:
            log.warning("resumed from %s at step %d", folder, self.step)
        return True

    # ----------------------------------------------------------------------------------------------------------
    # export

    def gathered_state_dict(self) -> Optional[dict]:
        """Collective: the student's full state dict on rank 0 (ZeRO-3 partitions gathered), None elsewhere."""
        if self.cfg.deepspeed.zero_stage == 3:
            state = self.engine._zero3_consolidated_16bit_state_dict()
        else:
            state = self.student.state_dict()
        return {k: v.detach().cpu().clone() for k, v in state.items()} if self.rank == 0 else None

    def export_hf(self, out_dir: str) -> None:
        """Collective: the student as a Hugging Face folder (save_pretrained) with the source's tokenizer files."""
        import json

        from megatron_tsdkd.models import copy_hf_meta
        from megatron_tsdkd.models.hf_export import EXPORT_MARKER, written_by_export
        from megatron_tsdkd.runtime.atomic_files import honour_umask
        from megatron_tsdkd.runtime.collectives import barrier

        state = self.gathered_state_dict()
        if self.rank == 0:
            if written_by_export(out_dir):
                shutil.rmtree(out_dir)
            copy_hf_meta(self.inputs.student.meta_dir, out_dir)   # tokenizer, generation config
            self.student.save_pretrained(out_dir, state_dict=state)   # config.json of the trained model
            honour_umask(out_dir)   # safetensors writes 0600 files
            with open(os.path.join(out_dir, EXPORT_MARKER), "w") as f:
                json.dump({"engine": "deepspeed", "dtype": str(next(iter(state.values())).dtype)}, f)
        barrier()

    # ----------------------------------------------------------------------------------------------------------
    # one step

    def _rollout(self, examples) -> Rollout:
        """The step's (prompt, response) pairs: sampled by the student with probability lambda, else the data's."""
        r = self.cfg.rollout
        if random.Random(derive_seed(self.cfg.seed, self.step)).random() >= r.on_policy_prob:
            return Rollout([(e.prompt_ids, e.response_ids) for e in examples], on_policy=False)
        seed = derive_seed(self.cfg.seed, self.step, salt=1 + self.rank)
        if self.rollouts is not None:   # the colocated vLLM replica, synced first if the weights moved
            start = time.perf_counter()
            out, sync_seconds = self.rollouts.generate([e.prompt_ids for e in examples], r,
                                                       eos_token_ids=self.tokens.stop_ids, generator_seed=seed)
            pairs = [(examples[i // r.num_samples].prompt_ids, resp) for i, resp in enumerate(out.responses)]
            return Rollout(pairs, True, time.perf_counter() - start, sync_seconds, out.logprobs)
        from transformers import LogitsProcessor, LogitsProcessorList

        from megatron_tsdkd.data.collate import collate_prompts

        vocab, stops = self.tokens.vocab_size, set(self.tokens.stop_ids)

        class _RealVocabulary(LogitsProcessor):   # rows beyond the tokenizer are never sampled
            def __call__(self, input_ids, scores):
                scores[:, vocab:] = -float("inf")
                return scores

        start = time.perf_counter()
        prompts = collate_prompts([e.prompt_ids for e in examples], self.tokens.pad_id, padding_side="left")
        torch.manual_seed(seed)
        sampling = {} if r.greedy else {"temperature": r.temperature, "top_p": r.top_p, "top_k": r.top_k or None}
        self.student.eval()
        with torch.no_grad():
            out = self.student.generate(
                input_ids=prompts.input_ids.to(self.device), attention_mask=prompts.attention_mask.to(self.device),
                max_new_tokens=r.max_new_tokens, do_sample=not r.greedy, num_return_sequences=r.num_samples,
                eos_token_id=list(self.tokens.stop_ids), pad_token_id=self.tokens.pad_id,
                logits_processor=LogitsProcessorList([_RealVocabulary()]),
                synced_gpus=self.cfg.deepspeed.zero_stage == 3 and self.dp_size > 1,
                output_logits=True, return_dict_in_generate=True, **sampling)
            new = out.sequences[:, prompts.input_ids.shape[1]:]
            # each token's log-probability at temperature 1 over the real vocabulary, from the raw logits
            scores = torch.stack([log_probs_of(step[:, :vocab], new[:, j]) for j, step in enumerate(out.logits)], 1)
        self.student.train()
        pairs, logprobs = [], []
        for i, (row, row_scores) in enumerate(zip(new.tolist(), scores.tolist())):
            end = next((j + 1 for j, t in enumerate(row) if t in stops), None)
            response = row[:end] if end is not None else row
            if end is None:
                while response and response[-1] == self.tokens.pad_id:
                    response = response[:-1]
            pairs.append((examples[i // r.num_samples].prompt_ids, response))
            logprobs.append(row_scores[:len(response)])
        return Rollout(pairs, True, time.perf_counter() - start, 0.0, logprobs)

    def _logits(self, model, batch) -> torch.Tensor:
        return model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits

    def train_step(self) -> StepResult:
        from megatron_tsdkd.runtime.collectives import all_reduce_values
        from megatron_tsdkd.training.metrics import reduce_to_rank0

        t0 = time.perf_counter()
        examples = [self.inputs.train[i] for i in self.sampler.next_batch()]
        rollout = self._rollout(examples)
        pairs, on_policy = rollout.pairs, rollout.on_policy
        batches, _ = micro_batches(pairs, self.cfg.batch.micro_size, self.tokens.pad_id, self.cfg.data.max_length,
                                   self.device, logprobs=rollout.logprobs)
        counts = [(b.loss_mask != 0).sum() for b in batches]
        total = float(all_reduce_values([float(sum(int(c) for c in counts))])[0])   # the step's targets, all ranks
        lr = lr_at(self.cfg, self.total_steps, self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        clock = PhaseClock()   # CUDA events on GPU, wall time on CPU: no host sync inside the step
        weighted, diagnostics, drift = None, [], None
        diagnosed = self.cfg.logging.diagnoses(self.step + 1, self.total_steps)
        self.method.logging_step = diagnosed   # the method computes its diagnostics on diagnostic steps only
        for batch, count in zip(batches, counts):
            teacher_logits = None
            if self.teacher is not None:
                with clock.phase("teacher_forward"), torch.no_grad():
                    teacher_logits = self._logits(self.teacher, batch)
            with clock.phase("student_forward"):
                student_logits = self._logits(self.engine, batch)
                # DeepSpeed hooks its outputs to divide gradients by GAS outside engine.backward: the term
                # gradients (diagnostics, the term balance) take autograd.grad up to this view, before that hook
                student_logits = student_logits.view_as(student_logits)
                if teacher_logits is not None and teacher_logits.shape[-1] != student_logits.shape[-1]:
                    width = min(teacher_logits.shape[-1], student_logits.shape[-1])   # both >= the real vocabulary
                    teacher_logits, student_logits = teacher_logits[..., :width], student_logits[..., :width]
                result = self.method.loss(student_logits, teacher_logits, batch, tp_group=None,
                                          vocab_size=self.tokens.vocab_size)
                if batch.rollout_logprobs is not None:   # the rollout guard's sums (training/rollout_guard.py)
                    sums = rollout_drift(student_logits, batch.labels, batch.loss_mask, batch.rollout_logprobs,
                                         None, self.tokens.vocab_size)
                    drift = sums if drift is None else drift + sums
            with clock.phase("student_backward"):
                self.engine.backward(result.loss * (count * self.dp_size / max(total, 1.0)), scale_wrt_gas=False)
            with clock.phase("optimizer"):
                self.engine.step()   # DeepSpeed steps the optimizer (clipping first) at the accumulation boundary
            values = torch.stack([result.loss.detach().float()] + [result.metrics[k].float() for k in self.method.logs])
            weighted = values * count if weighted is None else weighted + values * count
            if diagnosed and self.method.diagnostics:
                diagnostics.append(torch.stack([result.diagnostics[k].float() for k in self.method.diagnostics]))
        drift = self.guard.observe(self.step + 1, drift) if on_policy else {}
        if self.rollouts is not None and self.engine.was_step_applied():   # an fp16 overflow skips the update
            self.rollouts.weights_changed()
        t5 = time.perf_counter()
        self.step += 1
        if not self.cfg.logging.logs(self.step, self.total_steps):
            return StepResult(self.step, None)
        grad_norm = self.engine.get_global_grad_norm()
        local = dict(zip((f"loss/{k}" for k in self.loss_names), weighted.tolist()))
        local["tokens/response"] = float(sum(int(c) for c in counts))
        if diagnostics:   # means over micro-batches, then (reduce_to_rank0) over data-parallel ranks
            local.update(zip(self.method.diagnostics, torch.stack(diagnostics).mean(0).tolist()))
        local.update({f"time/{k}": v for k, v in clock.pop().items()})
        local.update({
            "time/rollout": rollout.seconds, "time/step": t5 - t0, "rollout/on_policy": float(on_policy),
            "rollout/response_length": sum(len(r) for _, r in pairs) / len(pairs), "optim/lr": lr,
            "optim/grad_norm": float(grad_norm) if grad_norm is not None else 0.0,
            "optim/update_skipped": 0.0 if self.engine.was_step_applied() else 1.0,
            "throughput/tokens_per_s": sum(len(p) + len(r) for p, r in pairs) / max(t5 - t0, 1e-9),
        })
        local.update(drift)   # the rollout guard's figures (on-policy steps)
        if self.rollouts is not None:   # the part of time/rollout that fed the replica the new weights
            local["time/weight_sync"] = rollout.sync_seconds   # every rank has a replica: the same names everywhere
        metrics = reduce_to_rank0(local)
        if metrics is not None:
            for name in self.loss_names:
                metrics[f"loss/{name}"] /= max(metrics["tokens/response"], 1.0)
            metrics["tokens/response"] *= self.dp_size
            self.share_watch.observe(self.step, metrics)
        return StepResult(self.step, metrics)

    # ----------------------------------------------------------------------------------------------------------
    # the loop: training/loop.py (the megatron engine's), with this engine's line in the summary

    def log_summary(self) -> None:
        if self.rank == 0:
            d = self.cfg.deepspeed
            log.info("engine: deepspeed ZeRO-%d (student; optimizer %s, offload %s), teacher %s", d.zero_stage,
                     d.optimizer, d.offload_optimizer,
                     "ZeRO-3 partitioned" if d.teacher_zero3_inference else "a full copy per rank")
        super().log_summary()

    def close(self) -> None:
        """End the vLLM replica, if any. Last thing in the job: vLLM's shutdown also ends the default process group
        (generation/vllm_replica.py)."""
        if self.rollouts is not None:
            self.rollouts.close()
            self.rollouts = None


def run_deepspeed_job(cfg: TrainConfig, inputs: Optional[RunInputs] = None) -> DeepSpeedTrainer:
    """``tsdkd-train`` with engine=deepspeed: training, then the HF export. (Before/after accuracy is the megatron
    engine's; with this engine use tools/lm-eval on the export.)"""
    trainer = DeepSpeedTrainer(cfg, inputs)
    trainer.train()
    say = print if dist.get_rank() == 0 else (lambda *a, **k: None)
    if trainer.stopped_by_signal:
        say(f"stopped by a signal at step {trainer.step}; the checkpoint is in {cfg.checkpoint.dir}", flush=True)
        trainer.close()   # last: vLLM's shutdown ends the default process group
        return trainer
    if cfg.checkpoint.export_hf:
        trainer.export_hf(cfg.checkpoint.export_hf)
        say(f"exported the student as a Hugging Face model to {cfg.checkpoint.export_hf}", flush=True)
    say(f"training finished at step {trainer.step}", flush=True)
    trainer.close()   # last: vLLM's shutdown ends the default process group
    return trainer
