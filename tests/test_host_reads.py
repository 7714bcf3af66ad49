"""Device reads and pipeline shape exchanges per training step (issue 27, items 4 and 5).

A GPU step should read the device back only a fixed number of times, whatever the number of micro-batches: the
loss path takes its target positions and label checks from the host (data/collate.py), and at PP > 1 the p2p
communicator is told each micro-batch's activation shape instead of exchanging it before every transfer
(engines/megatron/colocation.py). On the CPU every tensor is a host tensor, so the test counts every call that WOULD read
a CUDA tensor back (``.item()``, ``.tolist()``, ``bool``/``int``/``float``/``index`` of a tensor, ``nonzero``,
boolean-mask indexing, ...) made during one real training step, at PP=1 and PP=2, with 2 and 8 micro-batches.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch
from harness import run_parallel, run_serial
from torch.overrides import TorchFunctionMode

from test_train import overrides, workdir  # noqa: F401 - the tiny teacher/student pair and data set

# Calls that synchronise with the device and copy a CUDA tensor's data to the host.
READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "is_nonzero", "nonzero",
         "argwhere", "masked_select", "unique", "unique_consecutive"}
MASKED = {"__getitem__", "__setitem__", "index_put", "index_put_"}   # a read when indexed by a boolean tensor
# Reads of tensors that live on the host on a GPU too: megatron's RNG tracker compares the CPU generator's state
# (tensor_parallel/random.py), torch's optimizers keep their step counters on the CPU.
HOST_TENSORS = (os.path.join("megatron", "core", "tensor_parallel", "random.py"), os.path.join("torch", "optim", ""))
TORCH = os.path.dirname(torch.__file__)
MICRO = {2: 4, 8: 1}   # micro-batches per step -> batch.micro_size, for batch.global_size=8 at DP=1
CASES = [("gkd", True), ("tsdkd", False)]   # (method, on-policy): the rollout guard's drift and TSD-KD's terms


def _is_read(name: str, args, kwargs) -> bool:
    if name in READS:
        return True
    if name == "repeat_interleave":   # its output size is data-dependent only for per-element repeats
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
        return isinstance(repeats, torch.Tensor) and repeats.numel() > 1 and kwargs.get("output_size") is None
    if name in MASKED:
        index = args[1] if len(args) > 1 else None
        parts = index if isinstance(index, (tuple, list)) else (index,)
        return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)
    return False


def _call_site() -> str | None:
    """file:line of the innermost caller outside torch and this file; None for a read of a host tensor."""
    frame, site = sys._getframe(2), None
    while frame is not None:
        path = frame.f_code.co_filename
        if any(part in path for part in HOST_TENSORS):
            return None
        if site is None and not path.startswith(TORCH) and path != __file__:
            site = f"{path.split('site-packages' + os.sep)[-1].split('/work/main/')[-1]}:{frame.f_lineno}"
        frame = frame.f_back
    return site


class HostReads(TorchFunctionMode):
    """Counts the calls that would read a CUDA tensor back to the host while ``active``, by name and call site."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}
        self.active = True

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if self.active and _is_read(name, args, kwargs):
            site = _call_site()
            if site is not None:
                key = f"{name} {site}"
                self.counts[key] = self.counts.get(key, 0) + 1
        return func(*args, **kwargs)


def test_the_counter_sees_every_kind_of_read():
    t = torch.tensor([1.0, 2.0])
    with HostReads() as reads:
        t.sum().item(), t.tolist(), bool(t[0]), int(t[0]), float(t[0]), t[t > 1], torch.nonzero(t)
        t.clone()[t > 1] = 0.0
        t.repeat_interleave(torch.tensor([1, 2]))
        t + 1, t.index_select(0, torch.tensor([1])), t.repeat_interleave(2)   # device work: no read
    assert sorted(key.split()[0] for key in reads.counts) == sorted(
        ["item", "tolist", "__bool__", "__int__", "__float__", "__getitem__", "nonzero", "__setitem__",
         "repeat_interleave"]) and set(reads.counts.values()) == {1}


def test_collated_targets_are_the_masks_and_spare_the_losses_every_read():
    """Collate's targets equal target_positions(mask) (zero weights left out, padding included); every loss given
    them returns what it returns without them, reading nothing back; labels out of the vocabulary still stop."""
    from megatron_tsdkd.data.collate import collate_training
    from megatron_tsdkd.losses import cross_entropy_loss, generalized_jsd_loss, minillm_loss, tsdkd_loss
    from megatron_tsdkd.losses.inputs import target_positions
    from megatron_tsdkd.losses.rollout_drift import rollout_drift
    from megatron_tsdkd.losses.sequence_ranking import sequence_ranking_loss

    vocab = 20
    batch = collate_training([([1, 2], [3, 4, 5]), ([1], [7]), ([2, 2, 2], [9, 8, 6], [0.0, 0.5, 1.0]),
                              ([1, 2], [19, 4])], pad_id=0, pad_to_multiple_of=4, logprobs=None)
    assert torch.equal(batch.targets.positions, target_positions(batch.loss_mask))
    assert batch.targets.shape == (4, 8) and batch.targets.label_range == (3, 19)
    g = torch.Generator().manual_seed(0)
    student = torch.randn(4, 8, vocab + 4, generator=g, requires_grad=True)
    teacher = torch.randn(4, 8, vocab + 4, generator=g)
    rollout = torch.randn(4, 8, generator=g)
    losses = {
        "ce": lambda t: cross_entropy_loss(student, batch.labels, batch.loss_mask, vocab_size=vocab, targets=t),
        "jsd": lambda t: generalized_jsd_loss(student, teacher, batch.loss_mask, vocab_size=vocab, targets=t),
        "tsdkd": lambda t: tsdkd_loss(student, teacher, batch.loss_mask, vocab_size=vocab, targets=t).loss,
        "minillm": lambda t: minillm_loss(student, teacher, batch.labels, batch.loss_mask, vocab_size=vocab,
                                          targets=t).loss,
        "ranking": lambda t: sequence_ranking_loss(student, teacher, batch.labels, batch.loss_mask, batch.input_ids,
                                                   batch.prompt_lengths, vocab_size=vocab, targets=t),
        "drift": lambda t: rollout_drift(student, batch.labels, batch.loss_mask, rollout, vocab_size=vocab,
                                         targets=t)}
    for name, loss in losses.items():
        with HostReads() as reads:
            told = loss(batch.targets)
            if told.requires_grad:
                told.backward()
        assert reads.counts == {}, (name, reads.counts)
        torch.testing.assert_close(told, loss(None), rtol=0, atol=0, msg=name)
    with pytest.raises(ValueError, match="label 19 .* outside the vocabulary"):
        cross_entropy_loss(student, batch.labels, batch.loss_mask, vocab_size=19, targets=batch.targets)
    with pytest.raises(ValueError, match="re-padded batch"):
        cross_entropy_loss(student[:, :6], batch.labels[:, :6], batch.loss_mask[:, :6], vocab_size=vocab,
                           targets=batch.targets)


class ShapeExchanges:
    """Counts megatron-core's shape exchanges (P2PCommunicator._communicate_shapes) and the p2p messages of each
    kind (a shape is a 3-element int64 tensor) while in use."""

    def __enter__(self):
        from megatron.core.pipeline_parallel import p2p_communication as p2p

        self.counts = {"exchanges": 0, "shape_messages": 0, "activation_messages": 0}
        self._p2p, self._exchange, self._batch = p2p, p2p.P2PCommunicator._communicate_shapes, \
            torch.distributed.batch_isend_irecv
        counts, exchange, batch = self.counts, self._exchange, self._batch

        def counted_exchange(*args, **kwargs):
            counts["exchanges"] += 1
            return exchange(*args, **kwargs)

        def counted_batch(ops):
            for op in ops:
                shape = op.tensor.dtype == torch.int64 and op.tensor.numel() == 3
                counts["shape_messages" if shape else "activation_messages"] += 1
            return batch(ops)

        p2p.P2PCommunicator._communicate_shapes = counted_exchange
        torch.distributed.batch_isend_irecv = counted_batch
        return self

    def __exit__(self, *exc):
        self._p2p.P2PCommunicator._communicate_shapes = self._exchange
        torch.distributed.batch_isend_irecv = self._batch


def _measured_step(trainer) -> dict:
    """One train_step's reads inside the schedule (``forward_backward``), in the whole step but the rollout (the
    decode has its own test: test_decode_without_syncs.py), and its shape exchanges."""
    schedule, step = HostReads(), HostReads()
    run, rollout = trainer.engine.schedule, trainer.rollout

    def counted_schedule(**kwargs):
        with schedule:
            return run(**kwargs)

    def uncounted_rollout(examples):
        step.active = False
        try:
            return rollout(examples)
        finally:
            step.active = True

    trainer.engine.schedule, trainer.rollout = counted_schedule, uncounted_rollout
    try:
        with ShapeExchanges() as exchanges, step:
            trainer.train_step()
    finally:
        trainer.engine.schedule = run
        del trainer.rollout   # the method again
    return {"schedule": schedule.counts, "step": step.counts, **exchanges.counts}


def _counts(argv):
    """Per (method, on-policy, micro-batches): the second step's counts (the first one warms up)."""
    from megatron_tsdkd.config import load_config
    from megatron_tsdkd.engines.trainer import build_trainer

    out = {}
    for method, on_policy in CASES:
        for micro, size in MICRO.items():
            cfg = load_config(None, argv + [f"method.name={method}", f"batch.micro_size={size}",
                                            f"rollout.on_policy_prob={1.0 if on_policy else 0.0}"])
            trainer = build_trainer(cfg)
            assert trainer.plan.micro_batches == micro
            trainer.train_step()
            out[method, on_policy, micro] = _measured_step(trainer)
    return out


@pytest.fixture(scope="module")
def counted(workdir, tmp_path_factory):  # noqa: F811
    argv = overrides(workdir, extra=["batch.global_size=8", "schedule.max_steps=10", "logging.interval=1000",
                                     "logging.diagnostics_interval=1000", "rollout.max_new_tokens=8",
                                     f"checkpoint.dir={tmp_path_factory.mktemp('ck')}"])
    return {"pp1": [run_serial(_counts, argv)],
            "pp2": run_parallel(_counts, argv + ["parallel.pipeline=2"], world_size=2, pp=2)}


def _total(counts: dict) -> int:
    return sum(counts.values())


def test_device_reads_per_step_do_not_grow_with_micro_batches(counted):
    for layout, ranks in counted.items():
        for rank, runs in enumerate(ranks):
            for method, on_policy in CASES:
                few, many = runs[method, on_policy, 2], runs[method, on_policy, 8]
                print(f"{layout} rank {rank} {method} {'on' if on_policy else 'off'}-policy: reads per step at 2 / 8 "
                      f"micro-batches: schedule {_total(few['schedule'])} / {_total(many['schedule'])}, whole step "
                      f"{_total(few['step'])} / {_total(many['step'])}: {many['step']}")
                assert few["schedule"] == many["schedule"] and few["step"] == many["step"], (layout, rank, method,
                                                                                             few, many)
                # in the schedule, megatron's finalize_model_grads alone (`if num_tokens > 0`); beside it, the
                # gradient norm, the rollout guard on on-policy steps
                assert _total(many["schedule"]) <= 1 and _total(many["step"]) <= 4, (layout, rank, method, many)


def test_pipeline_sends_no_shapes(counted):
    for rank, runs in enumerate(counted["pp2"]):
        for key, run in runs.items():
            print(f"pp2 rank {rank} {key}: shape exchanges {run['exchanges']}, shape messages "
                  f"{run['shape_messages']}, activation messages {run['activation_messages']}")
            assert run["exchanges"] == run["shape_messages"] == 0, (rank, key, run)
            # one activation out and one gradient back per micro-batch, nothing else
            assert run["activation_messages"] == 2 * key[2], (rank, key, run)


def _losses_both_ways(argv) -> dict:
    """Per way of learning the shapes (told: the trainer's, exchanged: megatron's variable_seq_lengths), the
    logged losses and gradient norms of each step, the shape exchanges and the micro-batch widths."""
    from megatron_tsdkd.config import load_config
    from megatron_tsdkd.engines.trainer import build_trainer

    out = {}
    for way in ("told", "exchanged"):
        trainer = build_trainer(load_config(None, argv))
        told, widths = trainer.engine.stage.schedule_arguments, []

        def arguments(batches, way=way, told=told, widths=widths):
            widths.append([b.input_ids.shape[1] for b in batches])
            return told(batches) if way == "told" else {}

        trainer.engine.stage.schedule_arguments = arguments
        with ShapeExchanges() as exchanges:
            history = trainer.train()
        out[way] = {"metrics": [{k: v for k, v in h.metrics.items() if k.startswith("loss/") or k in (
            "optim/grad_norm", "tokens/response")} for h in history if h.metrics], "widths": widths,
            **exchanges.counts}
    return out


def test_told_shapes_give_the_exchanged_shapes_losses(workdir, tmp_path):  # noqa: F811
    steps, micro = 2, 4
    argv = overrides(workdir, "gkd", True, ["batch.global_size=8", "batch.micro_size=2", f"schedule.max_steps={steps}",
                                            "logging.interval=1", "rollout.greedy=false", "rollout.max_new_tokens=12",
                                            f"checkpoint.dir={tmp_path}/ck", "parallel.pipeline=2"])
    for rank, run in enumerate(run_parallel(_losses_both_ways, argv, world_size=2, pp=2)):
        told, exchanged = run["told"], run["exchanged"]
        print(f"pp2 rank {rank}, {steps} steps of {micro} micro-batches: shape exchanges told {told['exchanges']}, "
              f"exchanged {exchanged['exchanges']}; widths {told['widths']}")
        assert told["widths"] == exchanged["widths"] and any(len(set(w)) > 1 for w in told["widths"]), run
        assert told["exchanges"] == told["shape_messages"] == 0 and exchanged["exchanges"] > 0, run
        if rank == 0:   # the logged metrics live on rank 0 (engines/metrics.py reduce_to_rank0)
            assert len(told["metrics"]) == steps and told["metrics"] == exchanged["metrics"], run
