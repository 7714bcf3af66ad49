"""fp16 trains through megatron's loss scaling, and overlapping gradient reduce / weight gather with compute changes
no number.

- fp16 follows fp32: the same run in both precisions gives the same loss curve within fp16's rounding, and learns.
- a forced overflow (a loss scale far beyond fp16's range) is skipped, not applied: weights and Adam's step count
  unchanged, the learning-rate schedule not advanced, ``optim/update_skipped`` 1, the scale halved (hysteresis 1).
- overlap: DP=2 runs with ``optimizer.overlap_grad_reduce`` / ``overlap_param_gather`` on (small buckets, several
  micro-batches, on-policy rollouts) and off (as before the keys existed) give the same losses and weights; the
  weights a save or an export reads are current (``sync_student_params``).
"""
from __future__ import annotations

import math

import torch
from harness import run_parallel, run_serial
from test_train import _train, overrides, workdir  # noqa: F401 - the tiny teacher/student/data fixture

STEPS = 4


def _fixed_batch(workdir, tmp_path):
    fixed = tmp_path / "fixed.jsonl"
    fixed.write_text("".join(open(workdir / "train.jsonl").readlines()[:4]))
    return [f"data.train={fixed}", "data.shuffle=false", "schedule.warmup_fraction=0", "schedule.decay=constant"]


def test_fp16_loss_curve_follows_fp32(workdir, tmp_path):
    argv = overrides(workdir, "sft", False, [f"schedule.max_steps={STEPS}", "optimizer.lr=1e-2",
                                             *_fixed_batch(workdir, tmp_path)])
    curves = {}
    for dtype in ("fp32", "fp16"):
        metrics = run_serial(_train, argv + [f"precision.dtype={dtype}", f"checkpoint.dir={tmp_path}/{dtype}"])
        curves[dtype] = metrics
    fp32 = [m["loss/total"] for m in curves["fp32"]]
    fp16 = [m["loss/total"] for m in curves["fp16"]]
    print("fp32", fp32, "\nfp16", fp16)
    assert len(fp16) == STEPS and all(math.isfinite(x) for x in fp16)
    assert all(m["optim/update_skipped"] == 0.0 for m in curves["fp16"])           # the default start fits
    assert [m["optim/loss_scale"] for m in curves["fp16"]] == [1024.0] * STEPS
    assert [m["optim/loss_scale"] for m in curves["fp32"]] == [1.0] * STEPS
    assert fp32[-1] < 0.9 * fp32[0], fp32                                          # the run learns
    # Tolerance: fp16 rounds weights and activations at 2**-11 (~5e-4) relative; after a few steps the curves may
    # part by a few of those (measured: <= 5e-4 absolute on losses of ~4). 2e-3 relative leaves 4x headroom and is
    # 1/100 of the curve's fall over these steps. (A loss scale that never reaches the loss is caught below: the
    # overflow test's huge scale then overflows nothing.)
    for a, b in zip(fp32, fp16):
        assert abs(a - b) <= 2e-3 * abs(a), (fp32, fp16)


def _overflowing_step(argv):
    from megatron.core.utils import unwrap_model

    from megatron_tsdkd.config import load_config
    from megatron_tsdkd.engines.megatron.optim import adam_step
    from megatron_tsdkd.engines.trainer import build_trainer

    trainer = build_trainer(load_config(None, argv))
    weights = [p.detach().clone() for p in unwrap_model(trainer.student).parameters()]
    scale = float(trainer.engine.optimizer.get_loss_scale())
    first = trainer.train_step()
    unchanged = all(torch.equal(a, b) for a, b in zip(weights, unwrap_model(trainer.student).parameters()))
    return {"metrics": first.metrics, "unchanged": unchanged, "adam_step": adam_step(trainer.engine.optimizer),
            "scheduler_steps": trainer.engine.scheduler.num_steps, "scale_before": scale, "scale_after": float(trainer.engine.optimizer.get_loss_scale())}


def test_fp16_overflow_is_skipped_not_applied(workdir, tmp_path):
    argv = overrides(workdir, "sft", False, ["precision.dtype=fp16", f"checkpoint.dir={tmp_path}/ck",
                                             "optimizer.loss_scale_initial=1099511627776",   # 2**40: inf in fp16
                                             "optimizer.loss_scale_hysteresis=1", "parallel.tensor=2"])
    ranks = run_parallel(_overflowing_step, argv, world_size=2, tp=2)
    for rank in ranks:
        assert rank["unchanged"] and rank["adam_step"] == 0.0, rank
        assert rank["scheduler_steps"] == 0, rank        # the learning-rate schedule waits for the skipped update
        assert rank["scale_before"] == 2.0 ** 40 and rank["scale_after"] == 2.0 ** 39, rank
    metrics = ranks[0]["metrics"]
    assert metrics["optim/update_skipped"] == 1.0 and metrics["optim/loss_scale"] == 2.0 ** 39, metrics
    assert metrics["optim/grad_norm"] == 0.0 and math.isfinite(metrics["loss/total"]), metrics


def _overlap_run(argv):
    from megatron.core.utils import unwrap_model

    from megatron_tsdkd.config import load_config
    from megatron_tsdkd.engines.megatron.engine import sync_student_params
    from megatron_tsdkd.engines.trainer import build_trainer

    trainer = build_trainer(load_config(None, argv))
    history = trainer.train()          # ends with a save, which brings the weights up to date first
    model = unwrap_model(trainer.student)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    # one more step: only this rank's shard of the update is in place until a forward or sync_student_params
    trainer.total_steps += 1
    trainer.train_step()
    stale = {n: p.detach().clone() for n, p in model.named_parameters()}
    sync_student_params(trainer.student)
    synced = {n: p.detach().clone() for n, p in model.named_parameters()}
    return {"losses": [h.metrics["loss/total"] for h in history if h.metrics], "weights": weights,
            "synced": synced, "sync_changed": any(not torch.equal(stale[n], synced[n]) for n in synced),
            "buckets": len(trainer.student.bucket_groups),
            "overlap": (trainer.student.ddp_config.overlap_grad_reduce, trainer.student.use_forward_hook)}


def test_overlap_changes_no_number_at_dp2(workdir, tmp_path):
    """Bit for bit. Clipping is off here: the distributed optimizer sums the squared gradients shard by shard, and
    the shards follow the bucket layout, so with clipping a different ``bucket_size`` alone moves the clip factor
    in its last bits (measured: weights then agree to 2.5e-6, losses to all printed digits)."""
    base = overrides(workdir, "tsdkd", True, [f"schedule.max_steps={STEPS - 1}", "batch.micro_size=1",
                                              "schedule.decay=constant",   # the extra step still moves the weights
                                              "optimizer.clip_grad=1e9"])
    today = run_parallel(_overlap_run, base + [f"checkpoint.dir={tmp_path}/off", "optimizer.overlap_grad_reduce=false",
                                               "optimizer.overlap_param_gather=false"], world_size=2)
    overlap = run_parallel(_overlap_run, base + [f"checkpoint.dir={tmp_path}/on", "optimizer.bucket_size=4000"],
                           world_size=2)
    assert today[0]["overlap"] == (False, False) and today[0]["buckets"] == 1
    assert overlap[0]["overlap"] == (True, True) and overlap[0]["buckets"] > 2, overlap[0]["buckets"]
    for off, on in zip(today, overlap):
        assert len(off["losses"]) == STEPS - 1 or off["losses"] == []    # metrics come back on rank 0 only
        assert off["losses"] == on["losses"]
        for key in ("weights", "synced"):
            for name, value in off[key].items():
                assert torch.equal(value, on[key][name]), (key, name, (value - on[key][name]).abs().max())
        assert not off["sync_changed"]          # without the overlap the step itself gathered the weights
        assert on["sync_changed"]               # with it, a reader outside a forward must sync first
    assert today[0]["losses"] and len(today[0]["losses"]) == STEPS - 1
