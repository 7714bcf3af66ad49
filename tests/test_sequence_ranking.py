"""Sequence-level indirect feedback (losses/sequence_ranking.py) equals its dense transcription, values and student
gradients, at TP = 1 and TP = 2; the tsdkd method switches to it with method.indirect_level=sequence; bad settings
fail in the config loader naming the key."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from harness import run_parallel
from megatron_tsdkd.config import ConfigError, load_config
from megatron_tsdkd.data.collate import collate_training
from megatron_tsdkd.losses import TSDKDLossConfig, plackett_luce_nll, tsdkd_loss
from megatron_tsdkd.losses.sequence_ranking import same_prompt, sequence_ranking_loss
from megatron_tsdkd.methods import LossContext, build_method

PADDED_VOCAB, VOCAB = 24, 22
# Three prompts with their candidates as consecutive rows, as the rollout lays them out. Prompts A and C have the
# same length (told apart by their tokens); B has two identical candidates (a tie for the teacher); C has an empty
# response (no targets: it takes no part).
PROMPTS = {"A": [3, 4, 5], "B": [6, 7], "C": [3, 4, 9]}
ROWS = [("A", [10, 11, 12, 1]), ("A", [10, 13, 1]), ("A", [14, 1]),
        ("B", [15, 16, 1]), ("B", [15, 16, 1]), ("B", [17, 18, 19, 12, 1]),
        ("C", [11, 1]), ("C", [])]
GROUPS = [[0, 1, 2], [3, 4, 5], [6]]   # the valid rows of each prompt


def inputs():
    batch = collate_training([(PROMPTS[p], r) for p, r in ROWS], pad_id=0)
    gen = torch.Generator().manual_seed(3)
    shape = (*batch.loss_mask.shape, PADDED_VOCAB)
    student, teacher = 2 * torch.randn(shape, generator=gen), 2 * torch.randn(shape, generator=gen)
    teacher[4] = teacher[3]   # the two identical candidates of B get identical teacher scores
    return batch, student, teacher


def dense_loss(batch, student, teacher):
    """Full-vocabulary log-softmax, per-row mean log-likelihood, teacher's order, plackett_luce_nll per prompt."""
    def ell(logits):
        logits = logits.masked_fill(torch.arange(PADDED_VOCAB) >= VOCAB, float("-inf"))
        token = torch.log_softmax(logits, dim=-1).gather(-1, batch.labels.unsqueeze(-1)).squeeze(-1)
        return (token * batch.loss_mask).sum(1) / batch.loss_mask.sum(1).clamp(min=1)

    s, t = ell(student), ell(teacher.detach())
    assert t[3] == t[4]
    nll = [plackett_luce_nll(s[rows][torch.sort(t[rows], descending=True, stable=True).indices]) for rows in GROUPS]
    return torch.stack(nll).mean()


def shard_loss(group, rank: int, world: int, chunk_size: int):
    batch, student_full, teacher_full = inputs()
    width = PADDED_VOCAB // world
    student = student_full[..., rank * width:(rank + 1) * width].clone().requires_grad_()
    teacher = teacher_full[..., rank * width:(rank + 1) * width].clone()
    loss = sequence_ranking_loss(student, teacher, batch.labels, batch.loss_mask, batch.input_ids,
                                 batch.prompt_lengths, tp_group=group, vocab_size=VOCAB, chunk_size=chunk_size)
    loss.backward()
    return loss.detach(), student.grad


def _worker(chunk_size):
    from megatron.core import parallel_state as ps
    return shard_loss(ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_rank(),
                      ps.get_tensor_model_parallel_world_size(), chunk_size)


@pytest.fixture(scope="module")
def dense():
    batch, student, teacher = inputs()
    student.requires_grad_()
    loss = dense_loss(batch, student, teacher)
    loss.backward()
    assert student.grad.abs().max() > 0 and loss > 0   # not a vacuous comparison
    return loss.detach(), student.grad


def test_groups_are_read_off_the_prompts():
    batch, _, _ = inputs()
    same = same_prompt(batch.input_ids, batch.prompt_lengths)
    expected = torch.tensor([[ROWS[i][0] == ROWS[k][0] for k in range(len(ROWS))] for i in range(len(ROWS))])
    assert torch.equal(same, expected)


@pytest.mark.parametrize("chunk_size", [1024, 5])
def test_single_device_equals_dense(dense, chunk_size):
    loss, grad = shard_loss(None, 0, 1, chunk_size)
    torch.testing.assert_close(loss, dense[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, dense[1], rtol=1e-5, atol=1e-7)


def test_tp2_equals_dense(dense):
    per_rank = run_parallel(_worker, 5, world_size=2, tp=2)
    for loss, _ in per_rank:
        torch.testing.assert_close(loss, dense[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.cat([g for _, g in per_rank], dim=-1), dense[1], rtol=1e-5, atol=1e-7)


def test_one_candidate_per_prompt_gives_zero():
    batch, student, teacher = inputs()
    rows = [0, 3, 6]   # one candidate of each prompt
    student = student[rows].requires_grad_()
    loss = sequence_ranking_loss(student, teacher[rows], batch.labels[rows], batch.loss_mask[rows],
                                 batch.input_ids[rows], batch.prompt_lengths[rows], vocab_size=VOCAB)
    loss.backward()
    assert loss == 0 and not student.grad.any()


def test_method_adds_alpha_times_sequence_ranking_to_token_terms():
    batch, student, teacher = inputs()
    config = load_config(None, _overrides("method.indirect_level=sequence")).method
    method = build_method(config)
    out = method.loss(student, teacher, batch, LossContext(vocab_size=VOCAB))
    token = tsdkd_loss(student, teacher, batch.loss_mask, dataclasses.replace(config, use_indirect=False),
                       vocab_size=VOCAB)
    expected = token.loss + config.alpha * dense_loss(batch, student, teacher)
    torch.testing.assert_close(out.loss, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.metrics["indirect"], dense_loss(batch, student, teacher), rtol=1e-6, atol=1e-6)
    # the default stays the paper's token-level ranking
    default = build_method(load_config(None, _overrides()).method)
    assert default.config.indirect_level == "token"
    torch.testing.assert_close(default.loss(student, teacher, batch, LossContext(vocab_size=VOCAB)).loss,
                               tsdkd_loss(student, teacher, batch.loss_mask, default.config, vocab_size=VOCAB).loss)


def test_sequence_mode_grad_share_counts_the_sequence_term():
    """On logging steps the indirect term's gradient norm is that of alpha x the sequence loss (dense autograd)."""
    batch, student, teacher = inputs()
    student = student.double().requires_grad_()
    teacher = teacher.double()
    method = build_method(load_config(None, _overrides("method.indirect_level=sequence")).method)
    out = method.loss(student, teacher, batch, LossContext(vocab_size=VOCAB, diagnose=True))
    grad = torch.autograd.grad(method.config.alpha * dense_loss(batch, student, teacher), student)[0]
    norm = out.diagnostics["grad_norm/indirect"]
    assert float(norm) > 0
    torch.testing.assert_close(norm.double(), grad.norm(), rtol=1e-6, atol=1e-9)
    shares = [float(out.diagnostics[f"grad_share/{t}"]) for t in ("direct", "entropy", "indirect")]
    assert abs(sum(shares) - 1.0) < 1e-6 and shares[2] > 0


def _overrides(*extra):
    return ["models.student.path=s", "models.teacher.path=t", "data.train=d.jsonl", "batch.global_size=32",
            "batch.micro_size=16", "method.name=tsdkd", "rollout.num_samples=4", *extra]


@pytest.mark.parametrize("extra, key", [
    (("method.indirect_level=sequence", "rollout.num_samples=1"), "rollout.num_samples"),
    (("method.indirect_level=sequence", "rollout.on_policy_prob=0"), "rollout.on_policy_prob"),
    (("method.indirect_level=sequence", "rollout.on_policy_prob=0.5"), "rollout.on_policy_prob"),
    (("method.indirect_level=sequence", "batch.global_size=24", "batch.micro_size=6"), "batch.micro_size"),
    (("method.indirect_level=sentence",), "method.indirect_level"),
])
def test_config_errors_name_the_key(extra, key):
    with pytest.raises(ConfigError, match=rf"(^|: ){key}: "):
        load_config(None, _overrides(*extra))


def test_valid_sequence_config_and_direct_construction():
    cfg = load_config(None, _overrides("method.indirect_level=sequence"))
    assert cfg.method.indirect_level == "sequence"
    with pytest.raises(ValueError, match="indirect_level"):
        TSDKDLossConfig(indirect_level="sentence")
