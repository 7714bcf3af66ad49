"""Term balance, measured: per-term logit-gradient norms and shares, selection diagnostics, and the warning.

Oracles: dense full-vocabulary transcriptions (test_losses.dense_tsdkd for the terms, autograd on dense logits for
their gradients), at TP = 1 and TP = 2; a short training run's TensorBoard events and warning lines.
"""
from __future__ import annotations

import logging
import math
import re

import pytest
import torch
import torch.nn.functional as F

from harness import run_parallel, run_serial
from megatron_tsdkd.data import TrainingBatch
from megatron_tsdkd.losses import TSDKDLossConfig, tsdkd_loss
from megatron_tsdkd.losses.config import TermShares
from megatron_tsdkd.losses.tsdkd import DIAGNOSTICS
from megatron_tsdkd.methods.base import LossContext, ShareWarning
from megatron_tsdkd.methods.tsdkd import TSDKD, TSDKDConfig
from megatron_tsdkd.engines.metrics import ShareWatch
from test_losses import dense_entropy, dense_tsdkd
import test_train
from test_train import overrides

workdir = test_train.workdir   # the tiny teacher/student pair and data set of the training tests (a fixture)
PADDED_VOCAB, VOCAB = 24, 22    # two padded columns; 24 splits over TP = 2
CONFIGS = {
    "paper": TSDKDLossConfig(top_k=4, rho=0.5, opener_fraction=0.3, chunk_size=5),
    "reference": TSDKDLossConfig(top_k=5, rho=0.3, opener_fraction=0.3, reference_compat=True, chunk_size=7),
    "no entropy": TSDKDLossConfig(top_k=4, rho=0.6, use_entropy=False, gamma_em=0.5, alpha=0.3),
}


def full_inputs():
    gen = torch.Generator().manual_seed(11)
    student = 2 * torch.randn(3, 9, PADDED_VOCAB, generator=gen, dtype=torch.float64)
    teacher = student + 1.5 * torch.randn(3, 9, PADDED_VOCAB, generator=gen, dtype=torch.float64)  # agree at times
    mask = torch.zeros(3, 9)
    mask[0, 2:8] = 1   # prompt, response, one trailing pad
    mask[1, 4:] = 1
    mask[2, 8] = 1     # a one-token response
    return student, teacher, mask


# ------------------------------------------------------------------------------------------ dense twins
def dense_term_norms(cfg):
    """||d term / d z|| for the weighted dense terms (autograd over the full vocabulary) and norm / sum."""
    student, teacher, mask = full_inputs()
    student.requires_grad_()
    _, direct, entropy, indirect = dense_tsdkd(student, teacher, mask, cfg, VOCAB)
    terms = {"direct": direct, "entropy": cfg.gamma_em * entropy if cfg.use_entropy else None,
             "indirect": cfg.alpha * indirect if cfg.use_indirect else None}
    norms = {}
    for name, term in terms.items():
        norms[name] = 0.0 if term is None else float(torch.autograd.grad(term, student, retain_graph=True)[0].norm())
    total = sum(norms.values())
    return norms, {name: value / total for name, value in norms.items()}


def dense_selection_statistics(cfg):
    """METHOD.md's entropy set I and opener written densely; the diagnostics' definitions read off them."""
    student, teacher, mask = full_inputs()
    z_s, z_t = student[..., :VOCAB] / cfg.temperature, teacher[..., :VOCAB] / cfg.temperature
    valid = mask != 0
    h_s, h_t = dense_entropy(z_s), dense_entropy(z_t)
    if cfg.reference_compat:   # the tensors are the released code's completion block (test_reference_compat.py)
        chosen = h_s >= torch.quantile(h_s[valid].float(), cfg.rho)
        share = h_s[valid].float() / h_s[valid].float().sum()
        m = int((share.cumsum(0) >= cfg.opener_fraction).float().argmax())
        opener = valid & (torch.arange(mask.shape[1]) < m)
    else:
        k = max(1, math.floor(cfg.rho * int(valid.sum()) + 1e-9))
        where = valid.nonzero()[torch.topk(h_s[valid], k).indices]                       # top-rho by H_S
        chosen = torch.zeros_like(valid)
        chosen[where[:, 0], where[:, 1]] = True
        opener = torch.zeros_like(valid)
        for b in range(mask.shape[0]):
            cols = torch.nonzero(valid[b]).view(-1)
            frac = h_s[b, cols].cumsum(0) / h_s[b, cols].sum()
            opener[b, cols[: int(torch.nonzero(frac >= cfg.opener_fraction)[0]) + 1]] = True
    agreement = (z_s.argmax(-1) == z_t.argmax(-1))[chosen].double().mean()
    ids = torch.topk(z_s[opener], cfg.top_k, -1).indices
    p_candidates = F.softmax(z_t[opener], -1).gather(-1, ids)
    beyond = (p_candidates.sum(-1) - p_candidates.max(-1).values).mean() if cfg.use_indirect else torch.zeros(())
    return {"select/student_entropy": float(h_s[chosen].mean()), "select/teacher_entropy": float(h_t[chosen].mean()),
            "select/top1_agreement": float(agreement), "rerank/teacher_mass_beyond_top1": float(beyond)}


# ------------------------------------------------------------------------------------------ the library
def library_diagnostics(group, rank: int, world: int) -> dict:
    """{config name: diagnostics} from tsdkd_loss on this rank's vocabulary shard."""
    student_full, teacher_full, mask = full_inputs()
    width = PADDED_VOCAB // world
    columns = slice(rank * width, (rank + 1) * width)
    results = {}
    for name, cfg in CONFIGS.items():
        student = student_full[..., columns].clone().requires_grad_()
        out = tsdkd_loss(student, teacher_full[..., columns], mask, cfg, tp_group=group, vocab_size=VOCAB,
                         diagnose=True)
        assert set(out.diagnostics) == set(DIAGNOSTICS)
        results[name] = {k: float(v) for k, v in out.diagnostics.items()}
    return results


def _tp_worker():
    from megatron.core import parallel_state as ps
    return library_diagnostics(ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_rank(),
                               ps.get_tensor_model_parallel_world_size())


def _check_against_dense(per_config: dict, what: str) -> None:
    for name, cfg in CONFIGS.items():
        got = per_config[name]
        norms, shares = dense_term_norms(cfg)
        for term in ("direct", "entropy", "indirect"):
            for kind, expected in (("grad_norm", norms[term]), ("grad_share", shares[term])):
                key = f"{kind}/{term}"
                assert abs(got[key] - expected) <= 1e-6 * max(1.0, abs(expected)), (what, name, key, got[key],
                                                                                       expected)
        assert norms["direct"] > 0 and (norms["indirect"] > 0), f"{name}: a vacuous gradient-norm check"
        assert abs(sum(got[f"grad_share/{t}"] for t in ("direct", "entropy", "indirect")) - 1) <= 1e-6
        dense = dense_selection_statistics(cfg)
        assert 0 < dense["select/top1_agreement"] < 1, f"{name}: a vacuous top-1 agreement check"
        for key, expected in dense.items():
            assert abs(got[key] - expected) <= 1e-6 * max(1.0, abs(expected)), (what, name, key, got[key], expected)


def test_term_gradient_norms_and_selection_statistics_equal_dense_at_tp1():
    _check_against_dense(library_diagnostics(None, 0, 1), "TP=1")


def test_term_gradient_norms_and_selection_statistics_equal_dense_at_tp2():
    per_rank = run_parallel(_tp_worker, world_size=2, tp=2)
    assert per_rank[0] == per_rank[1], "every rank of the TP group reports the same diagnostics"
    _check_against_dense(per_rank[0], "TP=2")


def test_diagnose_changes_neither_loss_nor_gradient_and_is_off_by_default():
    student, teacher, mask = full_inputs()
    cfg = CONFIGS["paper"]
    grads = []
    for diagnose in (False, True):
        s = student.clone().requires_grad_()
        out = tsdkd_loss(s, teacher, mask, cfg, vocab_size=VOCAB, diagnose=diagnose)
        out.loss.backward()
        grads.append((out.loss.detach(), s.grad))
        assert bool(out.diagnostics) == diagnose
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    with pytest.raises(ValueError, match="require grad"):
        tsdkd_loss(student, teacher, mask, cfg, vocab_size=VOCAB, diagnose=True)


def test_a_term_with_tiny_weight_has_a_tiny_share():
    """Shares follow the weights: the gradient of alpha * L_indirect scales with alpha."""
    student, teacher, mask = full_inputs()
    shares = []
    for alpha in (1.0, 1e-3):
        s = student.clone().requires_grad_()
        out = tsdkd_loss(s, teacher, mask, TSDKDLossConfig(top_k=4, rho=0.3, alpha=alpha), vocab_size=VOCAB,
                         diagnose=True)
        shares.append(out.diagnostics)
    big, small = shares
    ratio = float(small["grad_norm/indirect"] / big["grad_norm/indirect"])
    assert abs(ratio - 1e-3) <= 1e-9
    assert float(small["grad_share/indirect"]) < float(big["grad_share/indirect"])


# ------------------------------------------------------------------------------------------ the warning
def test_share_watch_fires_after_patience_once_per_stretch(caplog):
    caplog.set_level(logging.WARNING, logger="megatron_tsdkd.train")
    watch = ShareWatch(ShareWarning("grad_share/direct", 0.1, 3, "lower method.gamma_em / method.alpha"))
    shares = [0.05, 0.05, 0.2, 0.05, 0.05, 0.05, 0.01, 0.01, 0.5, 0.0, 0.0, 0.0]
    fired = [step for step, share in enumerate(shares, 1)
             if watch.observe(step, {"grad_share/direct": share, "grad_share/indirect": 1 - share})]
    assert fired == [6, 12]
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == 2 and "\n" not in lines[0]
    assert "grad_share/direct = 0.05" in lines[0] and "method.gamma_em" in lines[0] and "method.alpha" in lines[0]
    assert "grad_share/indirect 0.95" in lines[0]
    assert ShareWatch(None).observe(1, {"grad_share/direct": 0.0}) is None


def test_settings_are_validated_with_the_key_named():
    with pytest.raises(ValueError, match="direct_share_warning"):
        TSDKDLossConfig(direct_share_warning=1.5)
    with pytest.raises(ValueError, match="direct_share_patience"):
        TSDKDLossConfig(direct_share_patience=0)


# ------------------------------------------------------------------------------------------ training runs
def _train_capturing_warnings(argv, engine="megatron"):
    """(metrics of the logged steps, warning lines) of one training run with either engine."""
    from megatron_tsdkd.config import load_config
    from megatron_tsdkd.engines.trainer import build_trainer

    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("megatron_tsdkd.train")
    logger.addHandler(handler)
    try:
        if engine == "deepspeed":
            history = build_trainer(load_config(None, argv + ["engine=deepspeed"])).train()
        else:
            history = build_trainer(load_config(None, argv)).train()
    finally:
        logger.removeHandler(handler)
    return [h.metrics for h in history if h.metrics is not None], records


def _runs(runs):
    """Several runs in one worker process (a pool costs seconds to start)."""
    return [_train_capturing_warnings(argv, engine) for argv, engine in runs]


def _scalars(log_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def _balance_warnings(lines):
    return [line for line in lines if "grad_share/direct" in line]


def test_training_logs_grad_shares_and_warns_only_when_direct_is_drowned(workdir, tmp_path):
    """4 steps logged every 2 with a threshold the paper's weights stay under: TensorBoard holds every diagnostic
    at steps 2 and 4 and the warning fires at step 4 (patience 2), with both engines (DeepSpeed's equal to
    megatron's); with the entropy and ranking terms off, grad_share/direct is 1 and nothing fires."""
    watch = ["method.direct_share_warning=0.9", "method.direct_share_patience=2", f"checkpoint.dir={tmp_path}/ck"]
    drowned = overrides(workdir, "tsdkd", extra=watch + ["schedule.max_steps=4", "logging.interval=2",
                                                         "logging.diagnostics_interval=2"])
    alone = overrides(workdir, "tsdkd", extra=watch + ["schedule.max_steps=2", "logging.diagnostics_interval=1",
                                                       "method.use_entropy=false",
                                                       "method.use_indirect=false", f"logging.dir={tmp_path}/tb2"])
    (metrics, warnings), (ds_metrics, ds_warnings), (alone_metrics, alone_warnings) = run_serial(_runs, [
        (drowned + [f"logging.dir={tmp_path}/tb"], "megatron"), (drowned + [f"logging.dir={tmp_path}/tb_ds"],
                                                                 "deepspeed"), (alone, "megatron")])
    assert [m["grad_share/direct"] < 0.9 for m in metrics] == [True, True], metrics
    for tag in (*DIAGNOSTICS, "loss/direct"):
        assert [step for step, _ in _scalars(tmp_path / "tb", tag)] == [2, 4], tag
    logged = _scalars(tmp_path / "tb", "grad_share/direct")
    assert [v for _, v in logged] == pytest.approx([m["grad_share/direct"] for m in metrics], rel=1e-6)
    for m in metrics:
        assert sum(m[f"grad_share/{t}"] for t in ("direct", "entropy", "indirect")) == pytest.approx(1.0, abs=1e-5)
        assert 0.0 <= m["select/top1_agreement"] <= 1.0 and m["grad_norm/indirect"] > 0
    for lines in (warnings, ds_warnings):
        balance = _balance_warnings(lines)
        assert len(balance) == 1 and balance[0].startswith("step 4: grad_share/direct = "), lines
        assert "method.gamma_em" in balance[0] and "method.alpha" in balance[0]
    for m, d in zip(metrics, ds_metrics, strict=True):   # DeepSpeed's output hooks must not scale the diagnostics
        for name in DIAGNOSTICS:
            assert d[name] == pytest.approx(m[name], rel=1e-4, abs=1e-7), (name, m[name], d[name])
    assert [m["grad_share/direct"] for m in alone_metrics] == [1.0, 1.0]
    assert not _balance_warnings(alone_warnings), alone_warnings


# ------------------------------------------------------------------------------------------ the balance (shares)
TARGETS = TermShares(direct=0.5, entropy=0.3, indirect=0.2)


def balanced_method(targets=TARGETS, decay=0.9, **settings):
    settings = {"top_k": 4, "rho": 0.5, "opener_fraction": 0.3, "chunk_size": 5, **settings}
    return TSDKD(TSDKDConfig(balance="shares", target_shares=targets, balance_decay=decay, **settings))


def method_batch(mask):
    ids = torch.zeros(mask.shape, dtype=torch.long)
    return TrainingBatch(ids, ids, mask, ids, torch.tensor([3, 5, 9]), torch.tensor([9, 9, 10]))


def balanced_steps(method, student_full, teacher_full, mask, columns=slice(None), group=None, steps=4, noise=0.0):
    """``steps`` micro-batches through the method (logits perturbed by ``noise`` each time): per step the loss,
    the balance weights and the student gradient on this shard."""
    from megatron.core import parallel_state as ps

    # the trainer hands the method megatron's data-parallel group; without megatron's groups, the default group
    dp_group = ps.get_data_parallel_group() if ps.model_parallel_is_initialized() else None
    gen = torch.Generator().manual_seed(3)
    results = []
    for _ in range(steps):
        shift = noise * torch.randn(student_full.shape, generator=gen, dtype=student_full.dtype)
        student = (student_full + shift)[..., columns].clone().requires_grad_()
        out = method.loss(student, teacher_full[..., columns], method_batch(mask),
                          LossContext(tp_group=group, dp_group=dp_group, vocab_size=VOCAB, diagnose=True))
        out.loss.backward()
        weights = torch.tensor([float(out.diagnostics[f"balance/weight_{t}"]) for t in ("direct", "entropy",
                                                                                          "indirect")])
        results.append((out.loss.detach(), weights, student.grad))
    return results


def test_balance_reaches_the_target_shares_on_fixed_logits():
    """The dense oracle's term norms times the applied weights give the targets (within 5%, after warm-up), and
    the logged grad_share/* say so too."""
    student, teacher, mask = full_inputs()
    method = balanced_method()
    steps = balanced_steps(method, student, teacher, mask)
    norms, shares = dense_term_norms(CONFIGS["paper"])
    assert shares["direct"] < 0.1, "the unbalanced direct share is not small: a vacuous check"
    for _, weights, _ in steps[1:]:
        applied = torch.tensor([norms[t] for t in ("direct", "entropy", "indirect")], dtype=torch.float64) * weights
        applied = applied / applied.sum()
        for got, want in zip(applied.tolist(), (TARGETS.direct, TARGETS.entropy, TARGETS.indirect)):
            assert abs(got - want) <= 0.05 * want, (applied, TARGETS)
    assert set(method.diagnostics) >= {"balance/weight_direct", "grad_share/direct"}


def test_balance_settles_on_noisy_logits():
    """Micro-batches that differ (noise on the logits): the smoothed weights still put each term near its target
    on the last micro-batch (within 5% of the shares, measured by the dense oracle on that micro-batch)."""
    student, teacher, mask = full_inputs()
    method = balanced_method(decay=0.5)
    steps = balanced_steps(method, student, teacher, mask, steps=12, noise=0.02)
    gen = torch.Generator().manual_seed(3)
    shifts = [0.02 * torch.randn(student.shape, generator=gen, dtype=student.dtype) for _ in range(12)]
    s = (student + shifts[-1]).requires_grad_()
    _, direct, entropy, indirect = dense_tsdkd(s, teacher, mask, CONFIGS["paper"], VOCAB)
    terms = (direct, CONFIGS["paper"].gamma_em * entropy, CONFIGS["paper"].alpha * indirect)
    norms = torch.stack([torch.autograd.grad(t, s, retain_graph=True)[0].norm() for t in terms]) * steps[-1][1]
    applied = (norms / norms.sum()).tolist()
    for got, want in zip(applied, (TARGETS.direct, TARGETS.entropy, TARGETS.indirect)):
        assert abs(got - want) <= 0.05 * want, applied


def test_balance_is_exact_when_the_targets_are_the_measured_shares():
    student, teacher, mask = full_inputs()
    _, shares = dense_term_norms(CONFIGS["paper"])
    measured = TermShares(**shares)
    balanced = balanced_steps(balanced_method(measured), student, teacher, mask, steps=2)
    plain = TSDKD(TSDKDConfig(top_k=4, rho=0.5, opener_fraction=0.3, chunk_size=5))
    s = student.clone().requires_grad_()
    out = plain.loss(s, teacher, method_batch(mask), LossContext(vocab_size=VOCAB))
    out.loss.backward()
    for loss, weights, grad in balanced:
        assert torch.allclose(weights, torch.ones(3, dtype=weights.dtype), rtol=0, atol=1e-9), weights
        assert abs(float(loss) - float(out.loss)) <= 1e-9 * abs(float(out.loss))
        assert float((grad - s.grad).abs().max()) <= 1e-9 * float(s.grad.abs().max())


def test_balance_state_resumes_exactly_and_switched_off_terms_keep_weight_one():
    student, teacher, mask = full_inputs()
    first = balanced_method()
    balanced_steps(first, student, teacher, mask, steps=2)
    resumed = balanced_method()
    resumed.load_state_dict(first.state_dict())
    a = balanced_steps(first, student, teacher, mask, steps=1, noise=0.1)[0]
    b = balanced_steps(resumed, student, teacher, mask, steps=1, noise=0.1)[0]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
    assert balanced_method().state_dict() == {"balance": {"average": None, "updates": 0}}
    no_entropy = balanced_steps(balanced_method(use_entropy=False), student, teacher, mask, steps=2)[-1][1]
    assert float(no_entropy[1]) == 1.0 and float(no_entropy[0]) != 1.0


def test_balance_settings_are_validated_with_the_key_named():
    from megatron_tsdkd.config import ConfigError, load_config
    paths = ["models.student.path=s", "models.teacher.path=t", "data.train=d.jsonl", "method.name=tsdkd"]
    for override, key in (("method.target_shares.direct=0.9", "method.target_shares: must sum to 1"),
                          ("method.balance=always", "method.balance: must be one of"),
                          ("method.target_shares.entropy=-0.1", "method.target_shares.entropy: must lie in"),
                          ("method.balance_decay=1", "method.balance_decay: must lie in [0, 1)")):
        with pytest.raises(ConfigError, match=re.escape(key)):
            load_config(None, [*paths, "method.balance=shares", override])
    cfg = load_config(None, [*paths, "method.balance=shares", "method.target_shares.direct=0.4",
                             "method.target_shares.entropy=0.4"])
    assert cfg.method.target_shares == TermShares(0.4, 0.4, 0.2)


def _balance_worker(perturb_by_rank: bool):
    """The balanced method for three micro-batches on this rank's vocabulary shard (TP) or its own logits (DP)."""
    from megatron.core import parallel_state as ps
    student, teacher, mask = full_inputs()
    rank, world = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    if perturb_by_rank:   # data-parallel ranks see different micro-batches
        student = student + 0.3 * ps.get_data_parallel_rank() * torch.ones_like(student).cumsum(-1) / PADDED_VOCAB
    width = PADDED_VOCAB // world
    return balanced_steps(balanced_method(), student, teacher, mask, slice(rank * width, (rank + 1) * width),
                          ps.get_tensor_model_parallel_group(), steps=3, noise=0.05)


def test_balance_at_tp2_equals_tp1_and_is_shared_by_data_parallel_ranks():
    student, teacher, mask = full_inputs()
    single = balanced_steps(balanced_method(), student, teacher, mask, steps=3, noise=0.05)
    per_rank = run_parallel(_balance_worker, False, world_size=2, tp=2)
    for step, (loss, weights, grad) in enumerate(single):
        for rank in range(2):
            assert abs(float(per_rank[rank][step][0]) - float(loss)) <= 1e-9 * abs(float(loss)), (step, rank)
            assert torch.allclose(per_rank[rank][step][1], weights, rtol=1e-9, atol=0), (step, rank)
        gathered = torch.cat([per_rank[r][step][2] for r in range(2)], dim=-1)
        assert float((gathered - grad).abs().max()) <= 1e-9 * float(grad.abs().max()), step
    # DP = 2 (TP = 1): each rank its own logits, one set of weights: those of the ranks' averaged norms
    per_rank = run_parallel(_balance_worker, True, world_size=2, tp=1)
    assert all(torch.equal(per_rank[0][s][1], per_rank[1][s][1]) for s in range(3))
    assert not torch.equal(per_rank[0][0][0], per_rank[1][0][0]), "the ranks' micro-batches do not differ"
    mine = balanced_steps(balanced_method(), student, teacher, mask, steps=3, noise=0.05)
    assert not torch.allclose(per_rank[0][-1][1], mine[-1][1]), "the weights ignore the other rank"


def _balanced_resume(base, folder):
    """Metrics of an uninterrupted 4-step run, and of a run cut after step 3 (its last complete checkpoint: step 2)
    then resumed."""
    from megatron_tsdkd.config import load_config
    from megatron_tsdkd.engines.trainer import build_trainer

    def train(argv, stop_after=None):
        history = build_trainer(load_config(None, argv)).train(stop_after=stop_after)
        return [h.metrics for h in history if h.metrics is not None]

    full = train(base + [f"checkpoint.dir={folder}/full"])
    train(base + [f"checkpoint.dir={folder}/cut"], stop_after=3)
    return full, train(base + [f"checkpoint.dir={folder}/cut", "checkpoint.resume=auto"])


def test_balance_state_is_checkpointed_and_a_resumed_run_continues_exactly(workdir, tmp_path):
    """Steps 3 and 4 after the resume equal the uninterrupted run's: their weights come from the EMA of the steps
    before, so a lost or stale balance state changes them (a fresh EMA would hold step 3's norms alone)."""
    base = overrides(workdir, "tsdkd", extra=["method.balance=shares", "checkpoint.interval=2", "logging.interval=1",
                                              "logging.diagnostics_interval=1", f"logging.dir={tmp_path}/tb",
                                              "schedule.max_steps=4"])
    full, resumed = run_serial(_balanced_resume, base, str(tmp_path))
    assert len(full) == 4 and len(resumed) == 2
    for a, b in zip(full[2:], resumed):
        for key in ("loss/total", "balance/weight_direct", "balance/weight_entropy", "balance/weight_indirect"):
            assert abs(a[key] - b[key]) <= 1e-9 * max(1.0, abs(a[key])), (key, full, resumed)
    assert full[-1]["grad_share/direct"] == pytest.approx(0.6, abs=0.05)
