"""The loss library on one device: oracles (TRL, dense transcriptions of METHOD.md), gradchecks, edge cases.

Parallel equality (TP = 1, 2, 4) lives in test_losses_parallel.py.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from megatron_tsdkd.losses import (
    Divergence,
    TSDKDLossConfig,
    VocabShard,
    cross_entropy_loss,
    forward_kl_loss,
    gather_global_ids,
    generalized_jsd_loss,
    log_normalizer,
    plackett_luce_nll,
    reverse_kl_loss,
    skew_kl_loss,
    skew_reverse_kl_loss,
    token_entropy,
    token_statistics,
    topk_global,
    tsdkd_loss,
)

B, S, V = 3, 8, 11


def make_batch(dtype=torch.float64, seed=0, scale=2.0):
    gen = torch.Generator().manual_seed(seed)
    student = (scale * torch.randn(B, S, V, generator=gen)).to(dtype).requires_grad_()
    teacher = (scale * torch.randn(B, S, V, generator=gen)).to(dtype).requires_grad_()
    mask = torch.zeros(B, S)
    mask[0, 2:7] = 1   # prompt, response, one trailing pad
    mask[1, 3:] = 1
    mask[2, 7] = 1     # a one-token response
    return student, teacher, mask


def grad_of(loss, tensor):
    return torch.autograd.grad(loss, tensor, allow_unused=True, retain_graph=True)[0]


def assert_close(actual, expected, what, rtol=1e-10):
    err = float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30))
    assert err <= rtol, f"{what}: relative difference {err:.3e}"


# ------------------------------------------------------------------------------------------ dense transcriptions
def dense_divergence(kind, z_s, z_t, weight=0.0):
    """Per-token D over the last dimension, written straight from the definitions."""
    log_s, log_t = F.log_softmax(z_s, -1), F.log_softmax(z_t, -1)
    p_s, p_t = log_s.exp(), log_t.exp()
    kl = lambda p, log_p, log_q: (p * (log_p - log_q)).sum(-1)  # noqa: E731
    if kind == "forward_kl":
        return kl(p_t, log_t, log_s)
    if kind == "reverse_kl":
        return kl(p_s, log_s, log_t)
    if kind == "jsd":
        m = weight * p_t + (1 - weight) * p_s
        return weight * kl(p_t, log_t, m.log()) + (1 - weight) * kl(p_s, log_s, m.log())
    if kind == "skew_kl":
        return kl(p_t, log_t, (weight * p_t + (1 - weight) * p_s).log())
    if kind == "skew_reverse_kl":
        return kl(p_s, log_s, (weight * p_s + (1 - weight) * p_t).log())
    raise AssertionError(kind)


def dense_entropy(z):
    return -(F.softmax(z, -1) * F.log_softmax(z, -1)).sum(-1)


def dense_pl(s, reverse_normaliser=False):
    """L_PL = -sum_j [s_j - logsumexp(s_j..s_K)]  (reference: logsumexp(s_1..s_j))."""
    K = s.shape[-1]
    return -sum(s[..., j] - torch.logsumexp(s[..., : j + 1] if reverse_normaliser else s[..., j:], -1)
                for j in range(K))


def dense_tsdkd(student, teacher, mask, cfg, vocab_size=None):
    """METHOD.md sections 1-3 (and section 6 when cfg.reference_compat), one line per equation, dense tensors."""
    v = vocab_size or student.shape[-1]
    z_s, z_t = student[..., :v] / cfg.temperature, teacher.detach()[..., :v] / cfg.temperature
    valid = mask != 0
    n = int(valid.sum())
    kind = {0.0: "forward_kl", 1.0: "reverse_kl"}.get(cfg.beta, "jsd")
    d = dense_divergence(kind, z_s, z_t, cfg.beta)                                           # D_t
    h_s, h_t = dense_entropy(z_s), dense_entropy(z_t)                                        # H_S,t, H_T,t
    w = torch.sigmoid((h_s - h_t).detach() / cfg.tau) if cfg.use_gate else torch.ones_like(h_s)  # w_t
    direct = (w * d)[valid].sum() / max(n, 1)                                                # L_direct
    if not cfg.reference_compat:
        k = max(1, math.floor(cfg.rho * n + 1e-9))                                           # |I| = rho N
        entropy = h_s[valid][torch.topk(h_s[valid].detach(), k).indices].mean()              # L_em
        opener = torch.zeros_like(valid)
        for b in range(mask.shape[0]):
            if valid[b].any():
                cols = torch.nonzero(valid[b]).view(-1)
                frac = h_s[b, cols].detach().cumsum(0) / h_s[b, cols].detach().sum()
                m_b = int(torch.nonzero(frac >= cfg.opener_fraction)[0]) + 1              # crossing included
                opener[b, cols[:m_b]] = True
    else:   # the released code, these tensors being its completion block (tests/test_reference_compat.py)
        q = torch.quantile(h_s[valid].detach().float(), cfg.rho)                             # fp32, as released
        chosen = h_s.detach() >= q                                     # ~90%, every position (pads included)
        entropy = h_s[chosen].sum() / chosen.sum()
        share = h_s[valid].detach().float() / h_s[valid].detach().float().sum()             # batch-wide, fp32
        m = int((share.cumsum(0) >= cfg.opener_fraction).float().argmax())                  # crossing excluded
        opener = valid & (torch.arange(mask.shape[1]) < m)                         # the first m columns' targets
    ids = torch.topk(z_s[opener].detach(), cfg.top_k, -1).indices                           # student's top-K
    order = torch.argsort(z_t[opener].gather(-1, ids), dim=-1, descending=True, stable=True)     # teacher ranking pi
    s_ranked = z_s[opener].gather(-1, ids).gather(-1, order)                                 # s_j in pi order
    indirect = dense_pl(s_ranked, cfg.reference_compat).mean() if opener.any() else direct * 0  # L_indirect
    loss = direct + (cfg.gamma_em * entropy if cfg.use_entropy else 0) + (cfg.alpha * indirect if cfg.use_indirect
                                                                            else 0)
    return loss, direct, entropy, indirect


# ------------------------------------------------------------------------------------------ oracle: TRL's GKD
def _trl_gkd():
    try:
        from trl.experimental.gkd import GKDTrainer   # trl >= 1.x moved GKD here
    except ImportError:
        from trl import GKDTrainer
    return GKDTrainer


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_generalized_jsd_equals_trl_gkd(beta, temperature):
    student, teacher, mask = make_batch()
    # TRL masks with labels == -100 and, for reduction="batchmean" with labels, divides the masked sum by the number
    # of unmasked labels: exactly our mean over response targets. Labels only act as the mask there.
    labels = torch.where(mask != 0, 1, -100)
    expected = _trl_gkd().generalized_jsd_loss(student, teacher.detach(), labels=labels, beta=beta,
                                               temperature=temperature, reduction="batchmean")
    actual = generalized_jsd_loss(student, teacher, mask, beta=beta, temperature=temperature, chunk_size=4)
    assert actual.dtype == torch.float64
    assert_close(actual, expected, f"value beta={beta} T={temperature}")
    assert_close(grad_of(actual, student), grad_of(expected, student), f"gradient beta={beta} T={temperature}")


# ------------------------------------------------------------------------------------------ divergences vs dense
@pytest.mark.parametrize("name,fn,kind,weight", [
    ("forward_kl", lambda s, t, m, **k: forward_kl_loss(s, t, m, **k), "forward_kl", 0.0),
    ("reverse_kl", lambda s, t, m, **k: reverse_kl_loss(s, t, m, **k), "reverse_kl", 0.0),
    ("jsd 0.3", lambda s, t, m, **k: generalized_jsd_loss(s, t, m, beta=0.3, **k), "jsd", 0.3),
    ("skew_kl 0.1", lambda s, t, m, **k: skew_kl_loss(s, t, m, alpha=0.1, **k), "skew_kl", 0.1),
    ("skew_kl 0", lambda s, t, m, **k: skew_kl_loss(s, t, m, alpha=0.0, **k), "skew_kl", 0.0),
    ("skew_reverse_kl 0.1", lambda s, t, m, **k: skew_reverse_kl_loss(s, t, m, alpha=0.1, **k), "skew_reverse_kl", 0.1),
])
def test_divergences_equal_dense_transcription(name, fn, kind, weight):
    student, teacher, mask = make_batch()
    for temperature in (1.0, 2.0):
        actual = fn(student, teacher, mask, temperature=temperature, chunk_size=3)
        d = dense_divergence(kind, student / temperature, teacher.detach() / temperature, weight)
        expected = d[mask != 0].mean()
        assert_close(actual, expected, f"{name} value T={temperature}")
        assert_close(grad_of(actual, student), grad_of(expected, student), f"{name} gradient T={temperature}")
        assert grad_of(actual, teacher) is None, f"{name}: teacher logits received a gradient"


def test_cross_entropy_equals_torch():
    student, _, mask = make_batch()
    labels = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(3))
    labels[mask == 0] = -100  # ignored positions may hold anything
    actual = cross_entropy_loss(student, labels, mask, chunk_size=4)
    expected = F.cross_entropy(student.reshape(-1, V), labels.reshape(-1), ignore_index=-100)
    assert_close(actual, expected, "cross-entropy value")
    assert_close(grad_of(actual, student), grad_of(expected, student), "cross-entropy gradient")
    with pytest.raises(ValueError, match="label 11 .* outside the vocabulary"):
        cross_entropy_loss(student, torch.where(mask != 0, 11, 0), mask)


def test_entropy_and_primitives_equal_dense():
    student, _, mask = make_batch()
    shard = VocabShard.of(student, None, 9)
    assert_close(token_entropy(student, mask, temperature=2.0), dense_entropy(student / 2)[mask != 0], "entropy")
    assert_close(log_normalizer(student, shard), torch.logsumexp(student[..., :9], -1), "log-normaliser")
    values, ids = topk_global(student, 4, shard)
    dense_values, dense_ids = torch.topk(student[..., :9], 4, -1)
    assert torch.equal(ids, dense_ids) and torch.equal(values, dense_values.detach())
    assert torch.equal(gather_global_ids(student, ids, shard), dense_values)
    padded = __import__("megatron_tsdkd.losses", fromlist=["mask_padded_vocab"]).mask_padded_vocab(student, shard)
    assert torch.isinf(padded[..., 9:]).all() and torch.equal(padded[..., :9], student[..., :9])


# ------------------------------------------------------------------------------------------ gradcheck (float64)
def test_gradcheck_token_statistics_every_divergence():
    student, teacher, mask = make_batch(scale=1.0)
    s, t = student.detach()[:, :, :7].reshape(-1, 7)[:6].clone(), teacher.detach()[:, :, :7].reshape(-1, 7)[:6]
    rows = torch.tensor([0, 2, 3, 5])
    shard = VocabShard.of(s, None, 6)  # one padded column
    kinds = [Divergence("none"), Divergence("forward_kl"), Divergence("reverse_kl"), Divergence("jsd", 0.3),
             Divergence("skew_kl", 0.1), Divergence("skew_reverse_kl", 0.2)]
    for divergence in kinds:
        def f(x, divergence=divergence):
            out = token_statistics(x, t, rows, divergence, shard, temperature=1.7, chunk_size=3, top_k=3)
            return out.divergence, out.student_entropy, out.candidate_student
        assert torch.autograd.gradcheck(f, (s.requires_grad_(),)), divergence


def test_gradcheck_cross_entropy_and_primitives():
    student, _, mask = make_batch(scale=1.0)
    s = student.detach()[:2].clone().requires_grad_()
    labels = torch.randint(0, 9, (2, S), generator=torch.Generator().manual_seed(1))
    shard = VocabShard.of(s, None, 9)
    ids = torch.randint(0, 9, (2, S, 3), generator=torch.Generator().manual_seed(2))
    assert torch.autograd.gradcheck(lambda x: cross_entropy_loss(x, labels, mask[:2], vocab_size=9, chunk_size=3),
                                    (s,))
    assert torch.autograd.gradcheck(lambda x: log_normalizer(x, shard), (s,))
    assert torch.autograd.gradcheck(lambda x: gather_global_ids(x, ids, shard), (s,))
    scores = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    for compat in (False, True):
        assert torch.autograd.gradcheck(lambda x: plackett_luce_nll(x, reference_compat=compat), (scores,))


# ------------------------------------------------------------------------------------------ TSD-KD terms
SWITCHES = list(itertools.product([True, False], repeat=4))


@pytest.mark.parametrize("use_gate,use_entropy,use_indirect,compat", SWITCHES)
def test_tsdkd_terms_equal_dense_transcription(use_gate, use_entropy, use_indirect, compat):
    student, teacher, mask = make_batch()
    cfg = TSDKDLossConfig(use_gate=use_gate, use_entropy=use_entropy, use_indirect=use_indirect,
                          reference_compat=compat, beta=0.7, temperature=1.0 if compat else 1.5, tau=0.5,
                          gamma_em=0.8, rho=0.25, alpha=0.3, opener_fraction=0.25 if compat else 0.3, top_k=4,
                          chunk_size=5)
    out = tsdkd_loss(student, teacher, mask, cfg)
    loss, direct, entropy, indirect = dense_tsdkd(student, teacher, mask, cfg)
    assert_close(out.direct, direct, "L_direct")
    if use_entropy:
        assert_close(out.entropy, entropy, "L_em")
    if use_indirect:
        assert_close(out.indirect, indirect, "L_indirect")
    assert_close(out.loss, loss, "total")
    assert_close(grad_of(out.loss, student), grad_of(loss, student), "gradient of the total")
    assert grad_of(out.loss, teacher) is None, "teacher logits received a gradient"


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_tsdkd_gkd_limits_and_temperature(beta):
    student, teacher, mask = make_batch()
    cfg = TSDKDLossConfig(beta=beta, temperature=2.0, top_k=3)
    out = tsdkd_loss(student, teacher, mask, cfg)
    assert_close(out.loss, dense_tsdkd(student, teacher, mask, cfg)[0], f"total at beta={beta}")


def test_tsdkd_without_switches_is_plain_gkd():
    student, teacher, mask = make_batch()
    off = TSDKDLossConfig(use_gate=False, use_entropy=False, use_indirect=False)
    out = tsdkd_loss(student, teacher, mask, off)
    assert_close(out.loss, generalized_jsd_loss(student, teacher, mask, beta=0.9), "switches off vs GKD")
    assert float(out.gate_mean) == 1.0 and float(out.entropy) == 0.0 and float(out.indirect) == 0.0


def test_tsdkd_diagnostics():
    student, teacher, mask = make_batch()
    cfg = TSDKDLossConfig(rho=0.25, top_k=3)
    out = tsdkd_loss(student, teacher, mask, cfg)
    n = int((mask != 0).sum())
    h_s, h_t = dense_entropy(student.detach()), dense_entropy(teacher.detach())
    assert_close(out.gate_mean, torch.sigmoid(h_s - h_t)[mask != 0].mean(), "gate mean")
    assert int(out.selected_count) == math.floor(0.25 * n)
    assert 1.0 <= float(out.opener_length) <= n


# ------------------------------------------------------------------------------------------ reference_compat
def test_reference_compat_reverses_the_ranking():
    """Position 0 holds the crafted top-3; two uniform positions follow, so with c = 0.5 the paper's opener is
    positions 0-1 and the reference's batch-wide opener (crossing excluded) is position 0 alone."""
    crafted = torch.tensor([3.0, 2.0, 1.0, -5.0, -6.0])
    student = torch.stack([crafted, torch.zeros(5), torch.zeros(5)]).unsqueeze(0)
    agree = torch.tensor([5.0, 4.0, 3.0, 0.0, 0.0]).expand(1, 3, 5)
    disagree = torch.tensor([3.0, 4.0, 5.0, 0.0, 0.0]).expand(1, 3, 5)
    mask = torch.ones(1, 3)
    indirect = {}
    for compat in (False, True):
        cfg = TSDKDLossConfig(top_k=3, rho=0.5 if compat else 0.1, opener_fraction=0.5, reference_compat=compat)
        for name, teacher in (("agree", agree), ("disagree", disagree)):
            out = tsdkd_loss(student, teacher, mask, cfg)
            assert float(out.opener_length) == (1 if compat else 2)
            indirect[compat, name] = float(out.indirect)
    assert indirect[False, "agree"] < indirect[False, "disagree"], "paper: agreeing with the teacher costs less"
    assert indirect[True, "agree"] > indirect[True, "disagree"], "reference: the reversed ranking costs less"
    s = torch.tensor([3.0, 2.0, 1.0])
    assert_close(plackett_luce_nll(s, reference_compat=True), plackett_luce_nll(s.flip(0)), "compat = reversed",
                 rtol=1e-6)


def test_reference_compat_entropy_set_is_about_ninety_percent():
    gen = torch.Generator().manual_seed(5)
    student, teacher = torch.randn(4, 30, 7, generator=gen), torch.randn(4, 30, 7, generator=gen)
    mask = torch.ones(4, 30)
    paper = tsdkd_loss(student, teacher, mask, TSDKDLossConfig(top_k=3))
    compat = tsdkd_loss(student, teacher, mask, TSDKDLossConfig(top_k=3, reference_compat=True))
    assert int(paper.selected_count) == 12                      # 10% of 120
    assert 105 <= int(compat.selected_count) <= 110             # H_S >= its 10% quantile: ~90% of 120
    mask[:, 25:] = 0                                            # trailing pads enter the compat set, not the paper's
    compat_padded = tsdkd_loss(student, teacher, mask, TSDKDLossConfig(top_k=3, reference_compat=True))
    q = torch.quantile(dense_entropy(student)[mask != 0], 0.1)
    assert int(compat_padded.selected_count) == int((dense_entropy(student) >= q).sum()) > 0.9 * 100


def test_reference_compat_opener_is_batch_wide():
    """Row 0 spends its entropy early, row 1 late: per-row openers differ, the compat one is a single length."""
    V_ = 6
    confident, unsure = torch.tensor([8.0, 0, 0, 0, 0, 0]), torch.zeros(V_)
    rows = [[unsure, unsure] + [confident] * 6, [confident] * 6 + [unsure, unsure]]
    student = torch.stack([torch.stack(r) for r in rows]) + 0.01 * torch.randn(2, 8, V_)
    teacher = torch.randn(2, 8, V_)
    mask = torch.ones(2, 8)
    cfg = TSDKDLossConfig(top_k=3, opener_fraction=0.3)
    paper = tsdkd_loss(student, teacher, mask, cfg)
    assert float(paper.opener_length) == pytest.approx((1 + 7) / 2)    # row 0 crosses at 1, row 1 at 7
    compat_cfg = TSDKDLossConfig(top_k=3, rho=0.3, opener_fraction=0.3, reference_compat=True)
    compat = tsdkd_loss(student, teacher, mask, compat_cfg)
    assert float(compat.opener_length) == 1                             # flattened: crosses at 1, excluded
    compat_late = tsdkd_loss(student.flip(0), teacher, mask, compat_cfg)  # row 0 now spends its entropy late
    assert float(compat_late.opener_length) == 7                        # crosses at 7, applied to both rows
    for out, s in ((compat, student), (compat_late, student.flip(0))):
        assert_close(out.indirect, dense_tsdkd(s, teacher, mask, compat_cfg)[3], "compat opener", rtol=1e-6)


# ------------------------------------------------------------------------------------------ edge cases
def test_empty_mask_gives_zero_loss_and_zero_gradients():
    student, teacher, mask = make_batch()
    empty = torch.zeros_like(mask)
    for compat in (False, True):
        out = tsdkd_loss(student, teacher, empty, TSDKDLossConfig(reference_compat=compat))
        assert float(out.loss) == 0.0 and not torch.isnan(out.loss)
        grad = grad_of(out.loss, student)
        assert grad is not None and not grad.any()
    for fn in (generalized_jsd_loss, forward_kl_loss, reverse_kl_loss, skew_kl_loss, skew_reverse_kl_loss):
        loss = fn(student, teacher, empty)
        assert float(loss) == 0.0 and not grad_of(loss, student).any()
    ce = cross_entropy_loss(student, torch.zeros(B, S, dtype=torch.long), empty)
    assert float(ce) == 0.0 and not grad_of(ce, student).any()


def test_one_token_responses():
    student, teacher, _ = make_batch()
    mask = torch.zeros(B, S)
    mask[:, -1] = 1
    cfg = TSDKDLossConfig(top_k=4)
    out = tsdkd_loss(student, teacher, mask, cfg)
    assert float(out.opener_length) == 1.0 and int(out.selected_count) == 1
    assert_close(out.loss, dense_tsdkd(student, teacher, mask, cfg)[0], "one-token responses")


def test_all_equal_logits():
    student, teacher = torch.zeros(1, 4, V, requires_grad=True), torch.zeros(1, 4, V)
    mask = torch.ones(1, 4)
    out = tsdkd_loss(student, teacher, mask, TSDKDLossConfig(top_k=4))
    assert abs(float(out.direct)) < 1e-6
    assert abs(float(out.entropy) - math.log(V)) < 1e-5
    assert abs(float(out.indirect) - sum(math.log(k) for k in range(1, 5))) < 1e-5  # uniform PL: log K!
    grad = grad_of(out.loss, student)
    assert torch.isfinite(grad).all()


def test_padded_vocabulary_equals_the_unpadded_one():
    student, teacher, mask = make_batch()
    garbage = torch.full((B, S, 5), 50.0, dtype=torch.float64)  # padding rows must not matter, whatever they hold
    padded_s = torch.cat([student, garbage], -1)
    padded_t = torch.cat([teacher, -garbage], -1)
    cfg = TSDKDLossConfig(top_k=4)
    out_padded = tsdkd_loss(padded_s, padded_t, mask, cfg, vocab_size=V)
    out = tsdkd_loss(student, teacher, mask, cfg)
    assert_close(out_padded.loss, out.loss, "padded vs unpadded")
    grad = grad_of(out_padded.loss, padded_s)
    assert not grad[..., V:].any()
    assert_close(grad[..., :V], grad_of(out.loss, student), "gradient on real columns")
    assert_close(cross_entropy_loss(padded_s, torch.zeros(B, S, dtype=torch.long), mask, vocab_size=V),
                 cross_entropy_loss(student, torch.zeros(B, S, dtype=torch.long), mask), "cross-entropy padded")


def test_clear_errors():
    student, teacher, mask = make_batch()
    with pytest.raises(ValueError, match="top_k = 12 exceeds the real vocabulary size 11"):
        tsdkd_loss(student, teacher, mask, TSDKDLossConfig(top_k=12))
    with pytest.raises(ValueError, match="top_k = 10 exceeds the real vocabulary size 8"):
        tsdkd_loss(student, teacher, mask, TSDKDLossConfig(), vocab_size=8)
    with pytest.raises(ValueError, match=r"teacher logits shard \(24, 12\) differs from student logits shard \(24, 11\)"):
        tsdkd_loss(student, torch.cat([teacher, teacher[..., :1]], -1), mask, TSDKDLossConfig(top_k=3))
    with pytest.raises(ValueError, match="teacher logits shard"):
        generalized_jsd_loss(student, teacher[..., :9], mask)
    with pytest.raises(ValueError, match=r"mask shape \(3, 7\) does not match student"):
        generalized_jsd_loss(student, teacher, mask[:, :7])
    with pytest.raises(ValueError, match=r"vocab_size = 12 must lie in \[1, 11\]"):
        forward_kl_loss(student, teacher, mask, vocab_size=12)
    with pytest.raises(ValueError, match="beta = 1.5"):
        generalized_jsd_loss(student, teacher, mask, beta=1.5)
    with pytest.raises(ValueError, match="skew alpha = 1.0"):
        skew_kl_loss(student, teacher, mask, alpha=1.0)


@pytest.mark.parametrize("field,value", [("beta", -0.1), ("temperature", 0.0), ("tau", -1.0), ("gamma_em", -1.0),
                                         ("rho", 0.0), ("alpha", -0.5), ("opener_fraction", 1.5), ("top_k", 0),
                                         ("chunk_size", 0), ("use_gate", "yes")])
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=rf"^{field}: must"):
        TSDKDLossConfig(**{field: value})


def test_bf16_logits_give_fp32_loss_and_bf16_gradients():
    student, teacher, mask = make_batch(dtype=torch.float32)
    out32 = tsdkd_loss(student, teacher, mask, TSDKDLossConfig(top_k=3))
    s16 = student.detach().bfloat16().requires_grad_()
    out16 = tsdkd_loss(s16, teacher.detach().bfloat16(), mask, TSDKDLossConfig(top_k=3))
    assert out16.loss.dtype == torch.float32
    out16.loss.backward()
    assert s16.grad.dtype == torch.bfloat16
    assert abs(float(out16.loss) - float(out32.loss)) < 0.05 * abs(float(out32.loss))
