"""Step metrics: reduced across data-parallel ranks on the last pipeline stage, shown on global rank 0.

What rank 0 shows for each logged step (every ``logging.interval`` steps, each diagnostic step, and the last one):
- TensorBoard scalars in ``logging.dir``, always. The writer opens with ``purge_step`` = the first step this run
  will log, so after a resume the steps between the checkpoint and the kill, which are trained again, appear once
  (with the new values): TensorBoard hides every older event at or after that step.
- One text line through Python logging (logger ``megatron_tsdkd.train``; ``tsdkd-train`` sends it to stderr):
  step/total, ETA, the loss and its terms, tokens/s, lr, grad norm, peak memory, time per phase.
- Or a tqdm progress bar (named after the method) INSTEAD of the text lines, only when ``logging.progress_bar`` is
  true and stderr is a terminal. A bar written to a file or a pipe (Slurm logs, the launcher's tee'd node logs) is
  one unreadable line of carriage returns, so there the text lines are written whatever ``progress_bar`` says, and
  a terminal never gets both.

- Diagnostics a method reports (MethodOutput.diagnostics, e.g. TSD-KD's ``grad_share/*``: extra backward passes)
  come every ``logging.diagnostics_interval`` steps and at the last step (config.LoggingConfig.diagnoses; such a
  step is always logged), as TensorBoard scalars under their own names; ``ShareWatch`` turns the method's
  ``ShareWarning`` into one warning line when its diagnostic stays below the threshold for N consecutive
  diagnostic steps.
- A logged step's metrics reach rank 0 as one packed tensor (``reduce_to_rank0``): one all-reduce over the
  data-parallel group on the last stage, one tensor broadcast over the pipeline group; no pickled objects.

``startup_summary`` is what the trainer logs before its first step and ``tsdkd-train --dry-run`` prints: layout,
memory plan verdict, steps, data, and the config keys that differ from the defaults (the full resolved YAML at
DEBUG level; ``tsdkd-train --print-config`` prints it, and every checkpoint holds it as config.yaml).
"""
from __future__ import annotations

import logging
import os
import sys
import time
from typing import Mapping, Optional, Sequence, Union

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_tsdkd.config import default_config, to_dict
from megatron_tsdkd.planning.placement import replicas_served
from megatron_tsdkd.planning.run_config import config_yaml, flat_config
from megatron_tsdkd.runtime.collectives import all_reduce_values, broadcast_values
from megatron_tsdkd.runtime.device_choices import device_kind, peak_memory as measured

log = logging.getLogger("megatron_tsdkd.train")
GIB = 1024**3
# the order of the step; the text line lists them so (time/rollout includes the vLLM replicas' time/weight_sync)
PHASE_ORDER = ("time/rollout", "time/weight_sync", "time/teacher_forward", "time/student_forward",
               "time/student_backward", "time/optimizer")


def reduce_to_rank0(local: Optional[Mapping[str, Union[float, torch.Tensor]]],
                    names: Optional[Sequence[str]] = None) -> Optional[dict[str, float]]:
    """Collective. ``local``: this rank's metrics on the last pipeline stage (None elsewhere), numbers or 0-d
    device tensors; ``names``: their names in one order that every rank knows (from the config and the method),
    needed where a rank has no ``local`` (default: ``local``'s keys). The values travel as ONE packed tensor: one
    all-reduce for the mean over the data-parallel group, then (PP > 1) one tensor broadcast from the last stage
    to the first, where global rank 0 lives. Only rank 0 reads them back (one host sync); it gets the dict."""
    names = list(local) if names is None else list(names)
    values = None
    if ps.is_pipeline_last_stage():
        if len(local) != len(names):
            raise ValueError(f"reduce_to_rank0: metrics {sorted(local)} differ from the names {sorted(names)}")
        values = all_reduce_values([local[name] for name in names], group=ps.get_data_parallel_group())
        values /= ps.get_data_parallel_world_size()
    if ps.get_pipeline_model_parallel_world_size() > 1:
        values = broadcast_values(values, len(names), src=ps.get_pipeline_model_parallel_last_rank(),
                                  group=ps.get_pipeline_model_parallel_group())
    return dict(zip(names, values.tolist())) if dist.get_rank() == 0 else None


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def step_metrics(method, reported: Optional[list], rollout, update, phases: Mapping[str, float], drift: dict,
                 diagnosed: bool, dp: int) -> Optional[dict[str, float]]:
    """Collective: one logged step's metrics on global rank 0 (None elsewhere). ``reported``: this rank's
    micro-batch values (engines/trainer.py ``micro_batch_loss``) where the losses ran, None on the other ranks;
    ``phases``: seconds per phase (``time/<name>``), known on every rank like the rest of the step's values. Loss
    terms are token-weighted sums divided by the step's tokens: per-token means of the whole step; diagnostics are
    means over micro-batches, then (reduce_to_rank0) over data-parallel ranks."""
    pairs = rollout.pairs
    step_values = {f"time/{name}": value for name, value in phases.items()}
    step_values.update({
        "rollout/on_policy": float(rollout.on_policy),
        "rollout/response_length": sum(len(r) for _, r in pairs) / len(pairs),
        "optim/lr": update.lr, "optim/grad_norm": float(update.grad_norm) if update.grad_norm is not None else 0.0,
        "optim/update_skipped": 0.0 if update.applied else 1.0,
        "optim/loss_scale": update.loss_scale,   # fp16's dynamic scale, 1 otherwise (may be a device scalar)
        "throughput/tokens_per_s": sum(len(p) + len(r) for p, r in pairs) / max(phases.get("step", 0.0), 1e-9),
    })
    step_values.update(drift)   # the rollout guard's figures (on-policy steps), the engine's (loss/router_aux)
    loss_names = ("total",) + method.logs
    sums = [f"loss/{k}" for k in loss_names] + ["tokens/response"]
    diagnostics = list(method.diagnostics) if diagnosed else []
    local = None
    if reported is not None:   # device scalars, read back on rank 0 only, after the collectives
        weighted = torch.stack([r["weighted"] for r in reported]).sum(0)
        tokens = torch.stack([r["tokens"] for r in reported]).sum()
        local = dict(zip(sums, [*weighted.unbind(), tokens]))
        if diagnostics:
            local.update(zip(diagnostics, torch.stack([r["diagnostics"] for r in reported]).mean(0).unbind()))
        local.update(step_values)
    metrics = reduce_to_rank0(local, sums + diagnostics + list(step_values))   # one packed tensor, DP means
    if metrics is not None:   # weighted sums / tokens: the per-token means of the whole step
        for name in loss_names:
            metrics[f"loss/{name}"] /= max(metrics["tokens/response"], 1.0)
        metrics["tokens/response"] *= dp   # the step's total
    return metrics


# ---------------------------------------------------------------------------------------------------------------
# The text line


def format_duration(seconds: float) -> str:
    seconds = max(int(round(seconds)), 0)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def peak_memory() -> str:
    """This process's peak memory (what is measured depends on the device: runtime/device_choices.py)."""
    return measured()


def step_line(step: int, total: int, eta_seconds: Optional[float], metrics: dict[str, float], memory: str) -> str:
    """``step 10/80 (12%) | eta 1m12s | loss 0.0351 (direct 0.03, ...) | grad share (direct 0.2, ...) | ...``"""
    parts = [f"step {step}/{total} ({100 * step // max(total, 1)}%)"]
    parts.append(f"eta {format_duration(eta_seconds)}" if eta_seconds is not None else "eta ?")
    terms = [f"{name[5:]} {value:.4g}" for name, value in metrics.items()
             if name.startswith("loss/") and name != "loss/total"]
    loss = f"loss {metrics.get('loss/total', float('nan')):.4g}"
    parts.append(loss + (f" ({', '.join(terms)})" if terms else ""))
    shares = [f"{name[11:]} {value:.2g}" for name, value in metrics.items() if name.startswith("grad_share/")]
    if shares:   # which loss term drives the update (a method's diagnostics, e.g. TSD-KD's)
        parts.append(f"grad share ({', '.join(shares)})")
    if "throughput/tokens_per_s" in metrics:   # what TensorBoard shows: per data-parallel replica
        parts.append(f"{metrics['throughput/tokens_per_s']:,.0f} tokens/s per replica")
    if "optim/lr" in metrics:
        parts.append(f"lr {metrics['optim/lr']:.3e}")
    if "optim/grad_norm" in metrics:
        parts.append(f"grad norm {metrics['optim/grad_norm']:.4g}"
                     + (" (update skipped)" if metrics.get("optim/update_skipped") else ""))
    if "rollout/logprob_diff" in metrics:   # the rollout guard's figure (engines/rollout_guard.py)
        parts.append(f"rollout logprob diff {metrics['rollout/logprob_diff']:.2g}")
    parts.append(memory)
    names = [n for n in PHASE_ORDER if n in metrics] + sorted(
        n for n in metrics if n.startswith("time/") and n not in PHASE_ORDER and n != "time/step")
    phases = [f"{name[5:]} {metrics[name]:.2f}" for name in names]
    if "time/step" in metrics:
        parts.append(f"time {metrics['time/step']:.2f}s" + (f" ({', '.join(phases)})" if phases else ""))
    return " | ".join(parts)


def shows_progress_bar(progress_bar: bool, stream) -> bool:
    """The bar only on a terminal (see the module docstring); the text lines everywhere else."""
    isatty = getattr(stream, "isatty", None)
    return bool(progress_bar and isatty is not None and isatty())


class MetricsLogger:
    """TensorBoard + text lines or a progress bar on global rank 0; a no-op elsewhere. ``start_step`` is the step
    the run starts from (a resumed run's checkpoint step)."""

    def __init__(self, log_dir: str, total_steps: int, start_step: int, progress_bar: bool, name: str = "train",
                 stream=None):
        self.active = _rank() == 0
        self.writer = self.bar = None
        self.total_steps, self.start_step = total_steps, start_step
        self.started = time.monotonic()
        if not self.active:
            return
        # hides events of an earlier attempt at the steps this run logs again (see the module docstring)
        self.writer = summary_writer(log_dir, purge_step=start_step + 1)
        stream = sys.stderr if stream is None else stream
        if shows_progress_bar(progress_bar, stream):
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc=name, unit="step", dynamic_ncols=True,
                            file=stream)

    def eta(self, step: int) -> Optional[float]:
        done = step - self.start_step
        if done <= 0:
            return None
        return (time.monotonic() - self.started) / done * (self.total_steps - step)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.active:
            return
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{metrics.get('loss/total', float('nan')):.4f}",
                                 lr=f"{metrics.get('optim/lr', 0.0):.2e}")
        else:
            log.info("%s", step_line(step, self.total_steps, self.eta(step), metrics, peak_memory()))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
        if self.bar is not None:
            self.bar.close()


class ShareWatch:
    """One warning line on rank 0 (where the metrics are) when ``rule.metric`` has stayed below ``rule.threshold``
    for ``rule.patience`` consecutive steps that report it (the diagnostic steps: every
    ``logging.diagnostics_interval`` steps); warned once per such stretch (re-armed when it recovers).
    ``rule`` None (the method asks for nothing) or a step without that metric: nothing happens, the count stays."""

    def __init__(self, rule):
        self.rule, self.below = rule, 0

    def observe(self, step: int, metrics: Optional[dict[str, float]]) -> Optional[str]:
        """Feed one logged step's metrics; returns the warning when it fires."""
        if self.rule is None or metrics is None or self.rule.metric not in metrics:
            return None
        value = metrics[self.rule.metric]
        self.below = self.below + 1 if value < self.rule.threshold else 0
        if self.below != self.rule.patience:
            return None
        group = self.rule.metric.rpartition("/")[0]
        others = ", ".join(f"{name} {v:.3g}" for name, v in sorted(metrics.items())
                           if name.startswith(group + "/") and name != self.rule.metric)
        line = (f"step {step}: {self.rule.metric} = {value:.3g} has stayed below {self.rule.threshold:g} for "
                f"{self.rule.patience} diagnostic steps ({others}): {self.rule.advice}")
        log.warning("%s", line)
        return line


def summary_writer(log_dir: str, **kwargs):
    """A TensorBoard writer whose event file sorts after every event file already in ``log_dir``.

    TensorBoard reads a folder's event files in name order, and a name starts with the second it was created in
    (``events.out.tfevents.<seconds>.<host>.<pid>.<counter>``, compared as text). A file opened in the same second
    as the previous one (a run resumed within a second, as tests do) may sort first, and TensorBoard then drops its
    steps as orphaned by the older file's. Waiting for the next second, in that case only, keeps the order."""
    import glob

    from torch.utils.tensorboard import SummaryWriter

    stamps = [int(name.split(".")[3]) for name in map(os.path.basename, glob.glob(
        os.path.join(glob.escape(log_dir), "events.out.tfevents.*"))) if name.split(".")[3].isdigit()]
    newest, deadline = max(stamps, default=0), time.monotonic() + 2.0   # bounded: a node whose clock lags waits
    while int(time.time()) <= newest and time.monotonic() < deadline:   # at most a second, and only in that case
        time.sleep(0.05)
    return SummaryWriter(log_dir=log_dir, **kwargs)


def log_scalars(log_dir: str, step: int, values: dict[str, float]) -> None:
    """A few scalars outside the training loop (the job's accuracy before and after), on global rank 0."""
    if _rank() != 0:
        return
    with summary_writer(log_dir) as writer:
        for name, value in values.items():
            writer.add_scalar(name, value, step)


# ---------------------------------------------------------------------------------------------------------------
# The start-up summary


def changed_settings(cfg) -> dict[str, dict[str, object]]:
    """The resolved config's keys whose values differ from the defaults (the method's own defaults for
    ``method.*``, lambda's default for that method), grouped by section: ``{"batch": {"global_size": 32}}``."""
    base, current = flat_config(to_dict(default_config(cfg.method.name))), flat_config(to_dict(cfg))
    grouped: dict[str, dict[str, object]] = {}
    for key, value in current.items():
        if key not in base or base[key] != value:
            section, _, rest = key.partition(".")
            grouped.setdefault(section if rest else "", {})[rest or section] = value
    return grouped


def startup_summary(cfg, inputs, plan, start_step: int = 0) -> list[str]:
    """The lines logged before the first step (and printed by ``tsdkd-train --dry-run``): ``plan`` is the run plan
    (planning/run_plan.py), ``inputs`` the checked inputs."""
    lay, b = plan.layout, cfg.batch
    teacher = cfg.models.teacher.path if inputs is None or inputs.teacher is not None else ""
    micro = plan.micro_batches
    lines = [
        f"run: method {cfg.method.name}, student {cfg.models.student.path}"
        + (f", teacher {teacher}" if teacher else ", no teacher")
        + f", {cfg.precision.dtype}, on-policy probability {plan.on_policy_prob:g}"
        + (f", rollouts on {_rollout_words(cfg, plan)}" if plan.rollout_backend else "")
        + f", on {device_kind()}",
        f"layout: TP={lay.tensor} PP={lay.pipeline} DP={lay.data_parallel}"
        + (f" EP={lay.expert}" if lay.expert > 1 else "") + f", world size {lay.world_size}; {micro} "
        f"micro-batch{'es' if micro != 1 else ''} of {plan.micro_size} sequences per step on each data-parallel "
        f"rank (global batch {b.global_size})",
    ]
    if plan.teacher_has_own_layout:
        t, g = plan.teacher_layout, replicas_served(plan.layout, plan.teacher_layout)
        experts = f" EP={t.expert}" if t.expert > 1 else ""
        lines.append(f"teacher layout: TP={t.tensor} PP={t.pipeline} DP={t.data_parallel}{experts} on its own process "
                     f"groups "
                     f"(each replica serves {g} student replica{'s' if g != 1 else ''}; final hidden states handed "
                     f"to the student's last stage, its output layer re-sharded over the student's TP)")
    lines += [
        f"memory plan {plan.memory.verdict()}",
    ]
    if plan.memory.host is not None:
        lines.append(f"memory plan {plan.memory.host.verdict()}")
    total = plan.total_steps
    if start_step:
        lines.append(f"steps: resuming at step {start_step} of {total} ({total - start_step} to go)")
    else:
        lines.append(f"steps: {total} from the start")
    lines[-1] += (f"; checkpoints every {cfg.checkpoint.interval} steps" if cfg.checkpoint.interval
                  else "; a checkpoint at the end") + f" in {cfg.checkpoint.dir}"
    if inputs is not None:
        data = f"data: {cfg.data.train}: {inputs.train.stats.summary()}"
        if inputs.eval_examples:
            data += f"; eval: {len(inputs.eval_examples)} problems from {cfg.data.eval}"
        lines.append(data)
    lines.append("config (keys that differ from the defaults; tsdkd-train --print-config shows all):")
    for section, values in changed_settings(plan.resolved_config(cfg)).items():
        text = " ".join(f"{k}={v}" for k, v in values.items())
        lines.append(f"  {section}: {text}" if section else f"  {text}")
    return lines


def _rollout_words(cfg, plan) -> str:
    """Who samples (the run plan's rollout backend)."""
    return {"vllm": f"vLLM (a TP=1 replica per rank, GPU share {cfg.rollout.vllm_memory_fraction:g}, weights synced "
                    f"after each optimizer step)",
            "megatron": f"megatron (KV-cached decode at TP={plan.layout.tensor} PP={plan.layout.pipeline})",
            "co-generation": f"megatron (student and teacher co-generate at TP={plan.layout.tensor} "
                             f"PP={plan.layout.pipeline})",
            "hf": "transformers' generate"}[plan.rollout_backend]


def log_startup_summary(cfg, inputs, plan, start_step: int) -> None:
    """The trainer's start-up summary on global rank 0 (INFO), with the full resolved config at DEBUG."""
    if _rank() != 0:
        return
    for line in startup_summary(cfg, inputs, plan, start_step=start_step):
        log.info("%s", line)
    if log.isEnabledFor(logging.DEBUG):
        log.debug("resolved config:\n%s", config_yaml(cfg))
