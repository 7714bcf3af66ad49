"""MiniLLM and Speculative KD: losses exact across TP = 1/2/4 against a dense full-vocabulary transcription
(values and student gradients), co-generation's limits (SKD with K = vocabulary is plain student sampling, K = 1
is the teacher's greedy decoding, MiniLLM's mixture with a = 0 is plain student sampling) under TP and PP, and a
short training run of each method.

Launches: one per layout (TP1, TP2, TP4 for the losses; TP1, TP2 and PP2 for co-generation, sharing the
launches where the layout is the same), and one two-rank training run of both methods.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from harness import run_parallel
import test_train
from test_generation import _load
from tiny_models import VOCAB_SIZE, make_tiny_hf_model

from megatron_tsdkd.generation import SamplingConfig
from megatron_tsdkd.generation.co_generation import CoSampling
from megatron_tsdkd.losses import minillm_loss
from megatron_tsdkd.losses.minillm import future_mean
from megatron_tsdkd.methods import LossContext
from megatron_tsdkd.methods.skd import SKDConfig, SpeculativeKD

PADDED_VOCAB, REAL_VOCAB = 24, 22
MINILLM_CASES = {   # name -> (mix_alpha, weight_clip, length_normalise)
    "paper": (0.2, 0.2, True), "on_policy": (0.0, 0.2, True), "unclipped": (0.6, 0.0, True),
    "raw_return": (0.2, 0.2, False),
}
SKD_CASES = {"forward_kl": {}, "jsd": {"skd_divergence": "jsd", "beta": 0.3, "temperature": 2.0},
             "reverse_kl": {"skd_divergence": "reverse_kl"}}
PROMPTS = [[5, 17, 33, 9, 100, 250, 31], [7, 8], [42, 43, 44, 45, 46]]
MAX_NEW, EOS, PAD, SEED = 10, 2, 0, 5
LOSS_TPS = (1, 2, 4)
LAW_SAMPLES, LAW_ALPHA, LAW_K, LAW_BINS = 3000, 0.5, 5, 6
CHI2_P1E4 = {4: 23.51, 5: 25.74, 6: 27.86}   # chi-square quantiles at p = 1e-4 by degrees of freedom
GEN_LAYOUTS = [(1, 1, 1), (2, 2, 1), (2, 1, 2)]   # world, tp, pp


def full_inputs():
    gen = torch.Generator().manual_seed(3)
    student = 2 * torch.randn(3, 9, PADDED_VOCAB, generator=gen)
    teacher = 2 * torch.randn(3, 9, PADDED_VOCAB, generator=gen)
    mask = torch.zeros(3, 9)
    mask[0, 2:8] = 1   # prompt, response, one trailing pad
    mask[1, 4:] = 1
    mask[2, 8] = 1     # a one-token response
    labels = torch.randint(0, REAL_VOCAB, (3, 9), generator=gen)
    return student, teacher, mask, labels


# ---------------------------------------------------------------------------------------------------------------
# dense transcriptions (full vocabulary, plain autograd, loops instead of cumulative sums)

def dense_minillm(student, teacher, labels, mask, alpha, clip, normalise):
    logq = student[..., :REAL_VOCAB].log_softmax(-1)
    logp = teacher[..., :REAL_VOCAB].log_softmax(-1)
    kl = (logq.exp() * (logq - logp)).sum(-1)
    lq = logq.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    lp = logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        q, p = lq.exp(), lp.exp()
        w = q / (alpha * p + (1 - alpha) * q)
        if clip:
            w = w.clamp(1 - clip, 1 + clip)
        future = torch.zeros_like(q)
        for b in range(mask.shape[0]):
            for t in range(mask.shape[1]):
                later = [u for u in range(t + 1, mask.shape[1]) if mask[b, u]]
                total = sum(float(lp[b, u] - lq[b, u]) for u in later)
                future[b, t] = total / len(later) if (normalise and later) else total
    n = mask.sum()
    single = (mask * w * kl).sum() / n
    long = (mask * -(w * future) * lq).sum() / n
    return torch.stack([single + long, single, long])


def dense_divergence(student, teacher, mask, settings):
    cfg = SKDConfig(name="skd", **settings)
    zs = student[..., :REAL_VOCAB] / cfg.temperature
    zt = teacher[..., :REAL_VOCAB] / cfg.temperature
    ps, pt = zs.softmax(-1), zt.softmax(-1)

    def kl(a, b):
        return (a * (a.log() - b.log())).sum(-1)
    if cfg.skd_divergence == "forward_kl":
        d = kl(pt, ps)
    elif cfg.skd_divergence == "reverse_kl":
        d = kl(ps, pt)
    else:
        m = cfg.beta * pt + (1 - cfg.beta) * ps
        d = cfg.beta * kl(pt, m) + (1 - cfg.beta) * kl(ps, m)
    return (mask * d).sum() / mask.sum()


def dense_results():
    student_full, teacher_full, mask, labels = full_inputs()
    results = {}
    for name, (alpha, clip, norm) in MINILLM_CASES.items():
        s = student_full.double().requires_grad_()
        out = dense_minillm(s, teacher_full.double(), labels, mask.double(), alpha, clip, norm)
        out.sum().backward()
        results[f"minillm {name}"] = (out.detach().float(), s.grad.float())
    for name, settings in SKD_CASES.items():
        s = student_full.double().requires_grad_()
        out = dense_divergence(s, teacher_full.double(), mask.double(), settings)
        out.backward()
        results[f"skd {name}"] = (out.detach().float().reshape(1), s.grad.float())
    return results


# ---------------------------------------------------------------------------------------------------------------
# code that runs on the ranks

def _shard_losses(group, rank: int, world: int) -> dict:
    student_full, teacher_full, mask, labels = full_inputs()
    width = PADDED_VOCAB // world
    columns = slice(rank * width, (rank + 1) * width)
    results = {}

    def record(name, fn):
        student = student_full[..., columns].clone().requires_grad_()
        values = fn(student, teacher_full[..., columns].clone())
        values.sum().backward()
        results[name] = (values.detach(), student.grad.clone())

    for name, (alpha, clip, norm) in MINILLM_CASES.items():
        record(f"minillm {name}", lambda s, t, a=alpha, c=clip, n=norm: torch.stack(list(minillm_loss(
            s, t, labels, mask, mix_alpha=a, weight_clip=c, length_normalise=n, tp_group=group,
            vocab_size=REAL_VOCAB, chunk_size=4)[:3])))
    batch = SimpleNamespace(loss_mask=mask, labels=labels)
    for name, settings in SKD_CASES.items():
        method = SpeculativeKD(SKDConfig(name="skd", chunk_size=5, **settings))
        record(f"skd {name}", lambda s, t, m=method: m.loss(s, t, batch, LossContext(
            tp_group=group, vocab_size=REAL_VOCAB)).loss.reshape(1))
    return results


def _co_generation_checks(dirs: dict[str, str], law: bool) -> dict:
    from megatron_tsdkd.generation import generate
    from megatron_tsdkd.generation.co_generation import co_generate

    student, teacher = _load(dirs["student"]), _load(dirs["teacher"])
    sampled = SamplingConfig(max_new_tokens=MAX_NEW, temperature=1.0)
    common = dict(eos_token_ids=(EOS,), pad_token_id=PAD, vocab_size=VOCAB_SIZE, generator_seed=SEED)

    def co(rule, config=sampled):
        out = co_generate(student, teacher, PROMPTS, config, rule, **common)
        return out.responses, out.teacher_tokens

    out = {}
    if law:   # the first token of one prompt, many times: its frequencies are checked against the rule's law
        one = SamplingConfig(max_new_tokens=1, num_samples=LAW_SAMPLES)
        for key, rule in (("mix_law", CoSampling("mixture", mix_alpha=LAW_ALPHA)),
                          ("skd_law", CoSampling("speculative", top_k=LAW_K))):
            out[key] = [r[0] for r in co_generate(student, teacher, [PROMPTS[0]], one, rule, **common).responses]
    return out | {
        "student_sampled": generate(student, PROMPTS, sampled, **common).responses,
        "teacher_greedy": generate(teacher, PROMPTS, SamplingConfig(max_new_tokens=MAX_NEW, greedy=True),
                                   **common).responses,
        "skd_full_vocab": co(CoSampling("speculative", top_k=VOCAB_SIZE)),
        "skd_top1": co(CoSampling("speculative", top_k=1)),
        "skd_top5": co(CoSampling("speculative", top_k=5)),
        "mix_0": co(CoSampling("mixture", mix_alpha=0.0))[0],
        "mix_half": co(CoSampling("mixture", mix_alpha=0.5))[0],
        "mix_1_greedy": co(CoSampling("mixture", mix_alpha=1.0), SamplingConfig(max_new_tokens=MAX_NEW,
                                                                                 greedy=True))[0],
    }


def _rank_work(dirs, tp: int, losses: bool, generation: bool) -> dict:
    from megatron.core import parallel_state as ps

    out = {}
    if losses:
        out["losses"] = _shard_losses(ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_rank(), tp)
    if generation:
        out["generation"] = _co_generation_checks(dirs, law=tp == 1)
    return out


# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory) -> dict[str, str]:
    """A Llama student and a Qwen2 teacher on one vocabulary (different weights, so the rules differ)."""
    root = tmp_path_factory.mktemp("tiny_pair")
    return {"student": make_tiny_hf_model("llama", str(root / "student"), seed=12),
            "teacher": make_tiny_hf_model("qwen2", str(root / "teacher"), seed=11)}


@pytest.fixture(scope="module")
def rank_results(tiny_pair) -> dict[tuple[int, int], list[dict]]:
    """(tp, pp) -> per-rank results of the layout's launch."""
    layouts = {(tp, tp, 1) for tp in LOSS_TPS} | set(GEN_LAYOUTS)
    results = {}
    for world, tp, pp in sorted(layouts):
        losses = pp == 1 and tp in LOSS_TPS
        generation = (world, tp, pp) in GEN_LAYOUTS
        results[(tp, pp)] = run_parallel(_rank_work, tiny_pair, tp, losses, generation, world_size=world, tp=tp,
                                         pp=pp)
    return results


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


@pytest.mark.parametrize("tp", LOSS_TPS)
def test_losses_match_dense_transcription_at_every_tp(rank_results, tp):
    dense = dense_results()
    ranks = rank_results[(tp, 1)]
    assert ranks[0]["losses"].keys() == dense.keys()
    for name, (value, grad) in dense.items():
        for rank in range(tp):
            assert _relative(ranks[rank]["losses"][name][0], value) <= 1e-5, f"TP={tp} rank {rank}: value of {name}"
        gathered = torch.cat([ranks[r]["losses"][name][1] for r in range(tp)], dim=-1)
        assert _relative(gathered, grad) <= 1e-5, f"TP={tp}: student gradient of {name}"
        assert grad.abs().max() > 0 and not gathered[..., REAL_VOCAB:].any(), name
        if tp > 1:   # and equal to the single-device run of the same code
            single = rank_results[(1, 1)][0]["losses"][name]
            assert _relative(ranks[0]["losses"][name][0], single[0]) <= 1e-6, name
            assert _relative(gathered, single[1]) <= 1e-6, name


def test_minillm_terms_are_distinct_and_weights_matter(rank_results):
    """The cases exercise different code: the long-term term is not zero, mixing changes the weights."""
    losses = rank_results[(1, 1)][0]["losses"]
    paper, on_policy = losses["minillm paper"][0], losses["minillm on_policy"][0]
    assert paper[2].abs() > 1e-3 and paper[1].abs() > 1e-3
    assert (paper - on_policy).abs().max() > 1e-4
    assert (losses["minillm paper"][0] - losses["minillm raw_return"][0]).abs().max() > 1e-4


def test_future_mean_is_the_mean_of_later_response_rewards():
    values = torch.tensor([[0.0, 1.0, 2.0, 4.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    assert future_mean(values, mask, True).tolist() == [[7 / 3, 3.0, 4.0, 0.0, 0.0]]
    assert future_mean(values, mask, False).tolist() == [[7.0, 6.0, 4.0, 0.0, 0.0]]


@pytest.mark.parametrize("layout", [(tp, pp) for _, tp, pp in GEN_LAYOUTS], ids=lambda lp: f"tp{lp[0]}pp{lp[1]}")
def test_co_generation_limits(rank_results, layout):
    ranks = rank_results[layout]

    def responses(result):   # the teacher-token counts are the last pipeline stage's only
        return {k: (v[0] if k.startswith("skd_top") or k == "skd_full_vocab" else v)
                for k, v in result["generation"].items()}
    for rank, result in enumerate(ranks):
        assert responses(result) == responses(ranks[0]), f"rank {rank} generated differently from rank 0"
    g = ranks[-1]["generation"]   # the last pipeline stage counts the teacher's tokens
    assert g["skd_full_vocab"][0] == g["student_sampled"], "SKD with K = vocabulary is not plain student sampling"
    assert g["skd_full_vocab"][1] == [0, 0, 0], "the teacher replaced a token although every token is in its top-V"
    assert g["skd_top1"][0] == g["teacher_greedy"], "SKD with K = 1 is not the teacher's greedy decoding"
    assert sum(g["skd_top1"][1]) > 0, "K = 1 never replaced a student token: the student happens to be the teacher"
    assert g["mix_0"] == g["student_sampled"], "the mixture with a = 0 is not plain student sampling"
    assert g["mix_1_greedy"] == g["teacher_greedy"], "the greedy mixture with a = 1 is not the teacher's greedy"
    assert g["mix_half"] != g["student_sampled"], "a = 0.5 did not change a single sample"
    assert 0 < sum(g["skd_top5"][1]) < sum(len(r) for r in g["skd_top5"][0]), "K = 5 replaced none or all tokens"
    reference = rank_results[(1, 1)][0]["generation"]
    for key in ("skd_top5", "mix_half"):   # layout-independent (same seed)
        assert g[key] == reference[key], f"{key} depends on the layout {layout}"


# ---------------------------------------------------------------------------------------------------------------
# a short training run of each method

TRAIN_STEPS = 6
workdir = test_train.workdir   # the tiny teacher/student pair on the demo tokenizer, and its data


def _train_both(argv):
    from megatron_tsdkd.config import load_config
    from megatron_tsdkd.engines.trainer import build_trainer

    out = {}
    for method, extra in [("minillm", []), ("skd", ["method.top_k=5"])]:
        trainer = build_trainer(load_config(None, argv + [f"method.name={method}", *extra]))
        out[method] = [h.metrics for h in trainer.train() if h.metrics]
    return out


def test_each_method_trains_on_co_generated_rollouts(workdir, tmp_path):
    """A fixed batch of 4 prompts, on-policy co-generated rollouts every step, at TP = 2: every step is logged
    with finite terms, and the distillation divergence the method minimises falls."""
    fixed = tmp_path / "fixed.jsonl"
    fixed.write_text("".join(open(workdir / "train.jsonl").readlines()[:4]))
    argv = test_train.overrides(workdir, "sft", True, [
        f"checkpoint.dir={tmp_path}/ck", f"schedule.max_steps={TRAIN_STEPS}", "parallel.tensor=2",
        f"data.train={fixed}", "data.shuffle=false", "schedule.warmup_fraction=0", "schedule.decay=constant",
        "optimizer.lr=1e-2", "rollout.greedy=false"])
    results = run_parallel(_train_both, argv, world_size=2, tp=2)[0]
    for method, key in (("minillm", "loss/reverse_kl"), ("skd", "loss/divergence")):
        metrics = results[method]
        assert len(metrics) == TRAIN_STEPS, method
        assert all(m["rollout/on_policy"] == 1.0 for m in metrics), method
        values = [m[key] for m in metrics]
        assert all(math.isfinite(m["loss/total"]) for m in metrics) and all(math.isfinite(v) for v in values)
        assert values[-1] < values[0], (method, values)
    weights = [m["loss/weight_mean"] for m in results["minillm"]]
    assert all(0.8 - 1e-6 <= w <= 1.2 + 1e-6 for w in weights), weights


def _next_token_probs(path: str) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        return model(torch.tensor([PROMPTS[0]])).logits[0, -1, :VOCAB_SIZE].double().softmax(-1)


def test_co_generation_draws_from_the_rules_law(rank_results, tiny_pair):
    """First-token frequencies of 3000 draws against the law computed from transformers' logits of both models:
    mixture a p_T + (1 - a) q_S; speculative q_S(y) [y in top-K_T] + P(reject) p_T(y | top-K_T) (chi-square)."""
    q, p = _next_token_probs(tiny_pair["student"]), _next_token_probs(tiny_pair["teacher"])
    top = torch.zeros_like(p, dtype=torch.bool)
    top[p.topk(LAW_K).indices] = True
    laws = {"mix_law": LAW_ALPHA * p + (1 - LAW_ALPHA) * q,
            "skd_law": torch.where(top, q, 0.0) + q[~top].sum() * torch.where(top, p, 0.0) / p[top].sum()}
    g = rank_results[(1, 1)][0]["generation"]
    for key, law in laws.items():
        assert abs(float(law.sum()) - 1) < 1e-9
        counts = torch.bincount(torch.tensor(g[key]), minlength=VOCAB_SIZE).double()
        assert not counts[law == 0].any(), f"{key}: drew a token the law gives probability 0"
        bins = law.topk(LAW_BINS).indices
        observed = torch.cat([counts[bins], (counts.sum() - counts[bins].sum()).reshape(1)])
        expected = LAW_SAMPLES * torch.cat([law[bins], (1 - law[bins].sum()).clamp(min=0).reshape(1)])
        keep = expected > 1e-9 * LAW_SAMPLES   # SKD's law lives on the teacher's top-K only
        observed, expected = observed[keep], expected[keep]
        chi2 = float(((observed - expected) ** 2 / expected).sum())
        limit = CHI2_P1E4[len(expected) - 1]
        assert chi2 < limit, f"{key}: chi2 {chi2:.1f}, counts {observed.tolist()} vs {expected.tolist()}"
