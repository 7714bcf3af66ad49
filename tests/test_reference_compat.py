"""``reference_compat`` against the released TSD-KD code, read and transcribed here (not imported, not copied).

The oracle ``released_loss`` is a plain dense fp64 transcription of the released loss (github kmswin1/TSD-KD,
DistillTrainer.py: ``generalized_jsd_loss`` with ``indirect_kd_loss``, as ``compute_loss`` calls it: default
temperature 1, gamma_em 1, tau 1, K 10, one ``threshold`` for rho and the opener fraction, alpha 0.1) on its own
tensors: the completion block [B, G, V] and labels with -100 where the row has no target. Our loss must give every
term and the student gradient within 1e-10, on those tensors and through our layout (right-padded prompt + response
rows, ragged prompts, the block built from prompt lengths by the tsdkd method).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from megatron_tsdkd.data import TrainingBatch
from megatron_tsdkd.losses import TSDKDLossConfig, tsdkd_loss
from megatron_tsdkd.methods.tsdkd import TSDKD, TSDKDConfig

V, G = 16, 9
TOL = 1e-10


# ------------------------------------------------------------------------------------------ the released loss
def released_loss(student, teacher, labels, beta=0.9, threshold=0.1, alpha=0.1, K=10):
    """(total, direct, entropy term, ranking term) of the released code on completion-block logits [B, G, V]."""
    log_s, log_t = F.log_softmax(student, -1), F.log_softmax(teacher, -1)
    log_m = torch.logsumexp(torch.stack([log_s + math.log(1 - beta), log_t + math.log(beta)]), dim=0)
    mask = labels != -100
    h_s = -(log_s.exp() * log_s).sum(-1)                        # the whole block, pads and empty rows included
    h_t = -(log_t.exp() * log_t).sum(-1)
    gate = torch.sigmoid(h_s - h_t).detach()                    # tau = 1
    on_targets = h_s[mask]
    if on_targets.numel():
        cut = torch.quantile(on_targets.float(), threshold)     # fp32 quantile of the targets' entropies
        chosen = h_s >= cut                                     # compared over the whole block
        share = on_targets.float() / on_targets.float().sum()
        d = int((torch.cumsum(share, -1) >= threshold).float().argmax(-1))  # crossing excluded; 0 if never
    else:
        chosen, d = torch.zeros_like(mask), 0
    entropy = (h_s * chosen).sum() / chosen.sum()               # NaN without targets
    # ranking: the student's top-K at the first d columns, ordered by the teacher, mean-centred, forward cumulative
    # normaliser, masked with the targets of those columns, sum / (count + 1e-8) (an int64 count plus a Python
    # float is fp32, where 1e-8 vanishes: exactly sum / count, and 0 without any)
    top, ids = torch.topk(student[:, :d], K, dim=2)
    order = torch.argsort(teacher[:, :d].gather(2, ids), dim=2, descending=True)
    ranked = top.gather(2, order)
    ranked = ranked - ranked.mean(dim=2, keepdim=True)
    nll = -(ranked - torch.logcumsumexp(ranked, dim=2)).sum(dim=2)
    opener_mask = labels[:, :d] != -100
    ranking = (nll * opener_mask).sum() / (opener_mask.sum() + 1e-8)
    kl_s = log_s.exp() * (log_s - log_m)
    kl_t = log_t.exp() * (log_t - log_m)
    jsd = (beta * kl_t + (1 - beta) * kl_s) * gate.unsqueeze(-1)
    direct = jsd[mask].sum() / mask.sum()
    return direct + entropy + alpha * ranking, direct, entropy, ranking


# ------------------------------------------------------------------------------------------ the cases
RESPONSES = (9, 2, 0, 5, 7)     # targets per row: full, short, empty (end token first), medium, long


def block_case(seed=0, low_entropy_opening=True):
    """Completion-block logits [B, G, V] and labels. A low-entropy opening (peaked student logits over the first
    columns) pushes the batch-wide opener past the short row's response, so its pads fall in the ranking slice."""
    gen = torch.Generator().manual_seed(seed)
    student = 2 * torch.randn(len(RESPONSES), G, V, generator=gen, dtype=torch.float64)
    teacher = 2 * torch.randn(len(RESPONSES), G, V, generator=gen, dtype=torch.float64)
    if low_entropy_opening:
        student[:, :3] *= 6
    labels = torch.full((len(RESPONSES), G), -100)
    for row, r in enumerate(RESPONSES):
        labels[row, :r] = 7
    return student, teacher, labels


def terms(out):
    return out.loss, out.direct, out.entropy, out.indirect


def check_terms_and_gradients(ours, expected, wrt, what):
    """Every term's value and its student gradient (and the total's) within TOL (relative to max(1, |value|))."""
    for name, a, b in zip(("total", "direct", "entropy", "ranking"), ours, expected):
        assert abs(float(a) - float(b)) <= TOL * max(1.0, abs(float(b))), f"{what}: {name} {float(a)} vs {float(b)}"
        ga = torch.autograd.grad(a, wrt, retain_graph=True)[0]
        gb = torch.autograd.grad(b, wrt, retain_graph=True)[0]
        err = float((ga - gb).abs().max())
        assert err <= TOL * max(1.0, float(gb.abs().max())), f"{what}: gradient of {name} differs by {err:.2e}"


def nonvacuous(student, labels, threshold):
    """The case exercises what the released rules do differently: the opener reaches past the short row, and
    the entropy set holds positions of the empty row."""
    log_s = F.log_softmax(student.detach(), -1)
    h = -(log_s.exp() * log_s).sum(-1)
    mask = labels != -100
    share = h[mask].float() / h[mask].float().sum()
    d = int((torch.cumsum(share, 0) >= threshold).float().argmax())
    assert d > RESPONSES[1], f"opener length {d} does not reach past the short response"
    assert (h[2] >= torch.quantile(h[mask].float(), threshold)).any(), "no position of the empty row is selected"


@pytest.mark.parametrize("beta,threshold", [(0.9, 0.1), (0.5, 0.3)])
def test_compat_equals_the_released_loss_on_its_own_tensors(beta, threshold):
    student, teacher, labels = block_case()
    nonvacuous(student, labels, threshold)
    student.requires_grad_()
    expected = released_loss(student, teacher, labels, beta=beta, threshold=threshold)
    cfg = TSDKDLossConfig(beta=beta, rho=threshold, opener_fraction=threshold, reference_compat=True, chunk_size=7)
    check_terms_and_gradients(terms(tsdkd_loss(student, teacher, (labels != -100).float(), cfg)), expected, student,
                              f"block beta={beta} threshold={threshold}")


def rows_case(prompts, seed=1):
    """Our layout: right-padded rows [B, L] of prompt + response (collate convention: row i's targets are columns
    p_i - 1 .. p_i + r_i - 2, the last column a pad), junk logits outside the targets, and the TrainingBatch."""
    gen = torch.Generator().manual_seed(seed)
    width = max(p + r for p, r in zip(prompts, RESPONSES))
    student = 2 * torch.randn(len(RESPONSES), width, V, generator=gen, dtype=torch.float64)
    teacher = 2 * torch.randn(len(RESPONSES), width, V, generator=gen, dtype=torch.float64)
    mask = torch.zeros(len(RESPONSES), width)
    for row, (p, r) in enumerate(zip(prompts, RESPONSES)):
        student[row, p - 1:p + 2] *= 6                  # low-entropy opening
        mask[row, p - 1:p - 1 + r] = 1
    ids = torch.zeros(len(RESPONSES), width, dtype=torch.long)
    batch = TrainingBatch(ids, ids, mask, ids, torch.tensor(prompts), torch.tensor(prompts) + torch.tensor(RESPONSES))
    return student, teacher, batch


def block_view(rows, prompts, labels_from):
    """The released block read off our rows (autograd-aware gather), and its labels: row i from column p_i - 1,
    G columns; past the row's end the block repeats its last column (a pad), as compat documents."""
    width = rows.shape[1]
    columns = torch.tensor(prompts).unsqueeze(1) - 1 + torch.arange(G)
    inside = columns < width
    columns = columns.clamp(max=width - 1)
    block = rows.gather(1, columns.unsqueeze(-1).expand(-1, -1, V))
    targets = inside & (labels_from.gather(1, columns) != 0)
    return block, torch.where(targets, 7, -100)


@pytest.mark.parametrize("prompts", [(4, 1, 6, 3, 2),     # ragged prompts, every block inside its row
                                     (7, 1, 6, 3, 2)])    # row 0's block runs past the row: repeated last pad
def test_compat_through_our_layout_equals_the_released_loss_on_the_completion_block(prompts):
    student, teacher, batch = rows_case(prompts)
    student.requires_grad_()
    block_s, labels = block_view(student, prompts, batch.loss_mask)
    block_t, _ = block_view(teacher, prompts, batch.loss_mask)
    nonvacuous(block_s, labels, 0.1)
    assert int((labels != -100).sum()) == sum(RESPONSES)
    expected = released_loss(block_s, block_t, labels)
    method = TSDKD(TSDKDConfig(reference_compat=True, chunk_size=5))
    out = method.loss(student, teacher, batch)
    assert abs(float(out.loss) - float(expected[0])) <= TOL * abs(float(expected[0])), f"{prompts}: total"
    for name, b in zip(("direct", "entropy", "indirect"), expected[1:]):   # logged metrics are fp32
        assert abs(float(out.metrics[name]) - float(b)) <= 1e-6 * max(1.0, abs(float(b))), f"{prompts}: {name}"
    grad = torch.autograd.grad(out.loss, student)[0]
    expected_grad = torch.autograd.grad(expected[0], student, retain_graph=True)[0]
    assert float((grad - expected_grad).abs().max()) <= TOL * float(expected_grad.abs().max())
    # the terms one by one, straight through the loss with the start columns the method passes
    cfg = TSDKDLossConfig(reference_compat=True, chunk_size=5)
    ours = tsdkd_loss(student, teacher, batch.loss_mask, cfg, completion_start=batch.prompt_lengths - 1)
    check_terms_and_gradients(terms(ours), expected, student, f"rows {prompts}")


def test_pads_per_row_follow_the_completion_block():
    """G - r_i non-target positions per row, G the longest response: what the entropy set can select."""
    from megatron_tsdkd.losses.reference_compat import completion_block
    prompts = (7, 1, 6, 3, 2)
    _, _, batch = rows_case(prompts)
    block = completion_block(batch.loss_mask, batch.prompt_lengths - 1)
    assert tuple(block.inverse.shape) == (len(RESPONSES), max(RESPONSES))
    assert block.target.sum(1).tolist() == list(RESPONSES)
    assert (~block.target).sum(1).tolist() == [G - r for r in RESPONSES]


def test_a_micro_batch_without_targets_is_zero_here_and_nan_there():
    student, teacher, labels = block_case()
    labels[:] = -100
    student.requires_grad_()
    assert math.isnan(float(released_loss(student, teacher, labels)[0]))
    out = tsdkd_loss(student, teacher, torch.zeros(labels.shape), TSDKDLossConfig(reference_compat=True))
    assert float(out.loss) == 0.0
    out.loss.backward()
    assert not student.grad.any()


def test_compat_settings_that_the_released_code_cannot_express_are_refused():
    with pytest.raises(ValueError, match="temperature"):
        TSDKDLossConfig(reference_compat=True, temperature=2.0)
    with pytest.raises(ValueError, match="opener_fraction"):
        TSDKDLossConfig(reference_compat=True, rho=0.2)
