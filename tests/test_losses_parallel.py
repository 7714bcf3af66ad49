"""Every loss, switch and primitive gives the same values AND student gradients at TP = 1, 2 and 4.

One harness call per TP size computes everything (pools are costly to start); rank r holds vocabulary columns
[r * V/TP, (r + 1) * V/TP). Gradients are gathered back along the vocabulary and compared with the single-device run.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from harness import run_parallel
from megatron_tsdkd.losses import (
    TSDKDLossConfig,
    cross_entropy_loss,
    forward_kl_loss,
    gather_global_ids,
    generalized_jsd_loss,
    log_normalizer,
    reverse_kl_loss,
    skew_kl_loss,
    skew_reverse_kl_loss,
    token_entropy,
    topk_global,
    tsdkd_loss,
)
from megatron_tsdkd.losses.vocab_parallel import VocabShard

PADDED_VOCAB = 24  # divisible by 1, 2, 4


def full_inputs():
    gen = torch.Generator().manual_seed(7)
    student = 2 * torch.randn(3, 9, PADDED_VOCAB, generator=gen)
    teacher = 2 * torch.randn(3, 9, PADDED_VOCAB, generator=gen)
    mask = torch.zeros(3, 9)
    mask[0, 2:8] = 1   # prompt, response, one trailing pad
    mask[1, 4:] = 1
    mask[2, 8] = 1     # a one-token response
    labels = torch.randint(0, 20, (3, 9), generator=gen)
    return student, teacher, mask, labels


def all_losses(group, rank: int, world: int) -> dict:
    """{case: (value(s), student gradient on this rank's shard)} for every loss, switch and primitive."""
    student_full, teacher_full, mask, labels = full_inputs()
    width = PADDED_VOCAB // world
    columns = slice(rank * width, (rank + 1) * width)
    results = {}

    def record(name, fn, vocab_size=22):
        student = student_full[..., columns].clone().requires_grad_()
        teacher = teacher_full[..., columns].clone().requires_grad_()
        out = fn(student, teacher, vocab_size)
        values = torch.stack([v.float() for v in out]) if isinstance(out, tuple) else out
        values.sum().backward()
        assert teacher.grad is None or not teacher.grad.any(), f"{name}: teacher logits received a gradient"
        results[name] = (values.detach(), student.grad.clone())

    for beta, temperature in [(0.0, 1.0), (0.5, 2.0), (0.9, 1.0), (1.0, 2.0)]:
        record(f"gkd beta={beta} T={temperature}", lambda s, t, v, b=beta, tt=temperature: generalized_jsd_loss(
            s, t, mask, beta=b, temperature=tt, tp_group=group, vocab_size=v, chunk_size=5))
    record("forward_kl", lambda s, t, v: forward_kl_loss(s, t, mask, temperature=1.5, tp_group=group, vocab_size=v,
                                                         chunk_size=4))
    record("reverse_kl", lambda s, t, v: reverse_kl_loss(s, t, mask, tp_group=group, vocab_size=v, chunk_size=4))
    record("skew_kl", lambda s, t, v: skew_kl_loss(s, t, mask, alpha=0.1, tp_group=group, vocab_size=v,
                                                   chunk_size=4))
    record("skew_reverse_kl", lambda s, t, v: skew_reverse_kl_loss(s, t, mask, alpha=0.3, temperature=2.0,
                                                                   tp_group=group, vocab_size=v, chunk_size=4))
    record("cross_entropy", lambda s, t, v: cross_entropy_loss(s, labels, mask, tp_group=group, vocab_size=v,
                                                               chunk_size=4))
    record("entropy", lambda s, t, v: token_entropy(s, mask, temperature=2.0, tp_group=group, vocab_size=v))
    for gate, entropy, indirect, compat in itertools.product([True, False], repeat=4):
        cfg = TSDKDLossConfig(use_gate=gate, use_entropy=entropy, use_indirect=indirect, reference_compat=compat,
                              top_k=4, rho=0.3, opener_fraction=0.3, chunk_size=5)
        record(f"tsdkd {cfg}", lambda s, t, v, c=cfg: _tsdkd_terms(s, t, mask, c, group, v))
    # vocab_size 15: at TP = 4 the last rank holds no real column and rank 2 only three.
    for compat in (False, True):
        cfg = TSDKDLossConfig(top_k=5, temperature=1.0 if compat else 2.0, reference_compat=compat, chunk_size=7)
        record(f"tsdkd vocab=15 compat={compat}", lambda s, t, v, c=cfg: _tsdkd_terms(s, t, mask, c, group, 15))
    # reference_compat on a completion block built from start columns: ragged starts, a row without targets and
    # a row whose block runs past the row end (repeated last pad), with the diagnostics' extra backward
    block_mask, start = torch.zeros(3, 9), torch.tensor([1, 6, 4])
    block_mask[0, 1:4] = 1
    block_mask[2, 4:9] = 1
    for gate, entropy in ((True, True), (False, True), (True, False)):
        cfg = TSDKDLossConfig(use_gate=gate, use_entropy=entropy, top_k=4, rho=0.3, opener_fraction=0.3,
                              reference_compat=True, chunk_size=5)
        record(f"tsdkd compat block {cfg}", lambda s, t, v, c=cfg: _tsdkd_terms(s, t, block_mask, c, group, v,
                                                                                 completion_start=start))

    shard = VocabShard.of(student_full[..., columns], group, 22)
    record("log_normalizer", lambda s, t, v: log_normalizer(s, shard).sum())
    values, ids = topk_global(student_full[..., columns], 5, shard)
    results["topk values"], results["topk ids"] = (values, None), (ids.float(), None)
    record("gather at ids", lambda s, t, v: (gather_global_ids(s, ids, shard) * torch.arange(5.0)).sum())
    return results


def _tsdkd_terms(s, t, mask, cfg, group, vocab_size, completion_start=None):
    out = tsdkd_loss(s, t, mask, cfg, tp_group=group, vocab_size=vocab_size, completion_start=completion_start)
    return (out.loss, out.direct, out.entropy, out.indirect, out.gate_mean, out.opener_length,
            out.selected_count.float())


def _worker():
    from megatron.core import parallel_state
    return all_losses(parallel_state.get_tensor_model_parallel_group(),
                      parallel_state.get_tensor_model_parallel_rank(),
                      parallel_state.get_tensor_model_parallel_world_size())


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.fixture(scope="module")
def single_device():
    return all_losses(None, 0, 1)


@pytest.mark.parametrize("tp", [2, 4])
def test_values_and_gradients_match_single_device(single_device, tp):
    per_rank = run_parallel(_worker, world_size=tp, tp=tp)
    assert per_rank[0].keys() == single_device.keys()
    for name, (value, grad) in single_device.items():
        for rank in range(tp):  # every rank sees the same replicated value
            assert _relative(per_rank[rank][name][0], value) <= 1e-5, f"TP={tp} rank {rank}: value of {name}"
        if grad is not None:
            gathered = torch.cat([per_rank[r][name][1] for r in range(tp)], dim=-1)
            assert _relative(gathered, grad) <= 1e-5, f"TP={tp}: student gradient of {name}"
            assert grad.abs().max() > 0, f"{name}: gradient is all zero, the check would be vacuous"


def test_tp_group_of_size_one_is_single_device(single_device):
    """A real process group of one rank (TP = 1 inside a 2-process world) behaves as group None."""
    per_rank = run_parallel(_worker, world_size=2, tp=1)
    for name, (value, grad) in single_device.items():
        assert _relative(per_rank[1][name][0], value) <= 1e-6, name
        if grad is not None:
            assert _relative(per_rank[1][name][1], grad) <= 1e-6, name
