"""KPOD: steps keep numbers whole; the token-weighting module finds the keypoint tokens; the schedule keeps its
budget, only moves down and spreads over clusters; float weights survive batching and the vocab-parallel loss;
TP=2 reproduces TP=1; preparation and training resume exactly."""
import json
import math
import os
import random

import pytest
import torch

from harness import run_parallel, run_serial

DEMO = os.path.join(os.path.dirname(__file__), "..", "megatron_tsdkd", "assets", "demo")
STEPS = 3

GSM8K_RATIONALE = ("Natalia sold 48/2 = 24 clips in May. A pen costs $3.50, so 4 pens cost 4 * $3.50 = $14.00. "
                   "She walked 2.5 miles and then 1.25 more. The total was $1,234.56 in the end. The answer is 72.")


def test_step_splitting_keeps_decimals_and_money_whole():
    from megatron_tsdkd.kpod.steps import split_steps, step_texts

    steps = step_texts(GSM8K_RATIONALE)
    assert steps == ["Natalia sold 48/2 = 24 clips in May.", "A pen costs $3.50, so 4 pens cost 4 * $3.50 = $14.00.",
                     "She walked 2.5 miles and then 1.25 more.", "The total was $1,234.56 in the end.",
                     "The answer is 72."]
    spans = split_steps(GSM8K_RATIONALE)
    assert spans[0][0] == 0 and spans[-1][1] == len(GSM8K_RATIONALE)
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))   # they tile the text
    assert step_texts("No final period") == ["No final period"]


def test_token_steps_align_with_student_tokens():
    from transformers import AutoTokenizer

    from megatron_tsdkd.data.chat_tokenization import ChatTemplateTokenizer
    from megatron_tsdkd.kpod.steps import ANSWER, token_steps

    chat = ChatTemplateTokenizer(AutoTokenizer.from_pretrained(os.path.join(DEMO, "student")))
    messages = ({"role": "user", "content": "Compute 4+9-6."},)
    response = "4+9=13. 13-6=7. The answer is 7."
    ids = chat.response_ids(messages, response)
    steps, n = token_steps(chat, messages, response, ids)
    assert n == 2 and len(steps) == len(ids)
    decoded = {k: chat.tokenizer.decode([t for t, s in zip(ids, steps) if s == k]) for k in (0, 1, ANSWER)}
    assert decoded[0].strip() == "4+9=13." and decoded[1].strip() == "13-6=7."
    assert decoded[ANSWER].startswith(" The answer is 7.") and steps[-1] == ANSWER   # the end-of-turn token too


def test_token_weighting_finds_the_marked_tokens():
    """The answer is the one 'key' token (ids 2..9) hidden among filler (10..39): the module must keep it."""
    from megatron_tsdkd.kpod.token_weighting import WeightingConfig, token_weights, train_token_weighting

    g = torch.Generator().manual_seed(0)
    embedding = torch.randn(40, 32, generator=g)
    examples = []
    for _ in range(160):
        r = torch.randint(10, 40, (10,), generator=g).tolist()
        key = int(torch.randint(2, 10, (1,), generator=g))
        r[int(torch.randint(0, 10, (1,), generator=g))] = key
        examples.append(([1], r, [key]))
    module = train_token_weighting(embedding, examples, WeightingConfig(
        warmup_steps=60, steps=60, hidden=64, batch_size=16, alpha_m=0.05, lr=5e-3, prefixes=1))
    weights = token_weights(module, [r for _, r, _ in examples])
    key_w = [w for (_, r, _), ws in zip(examples, weights) for t, w in zip(r, ws) if t < 10]
    filler_w = [w for (_, r, _), ws in zip(examples, weights) for t, w in zip(r, ws) if t >= 10]
    key_mean, filler_mean = sum(key_w) / len(key_w), sum(filler_w) / len(filler_w)
    # measured (seed 0): key 0.16, filler 0.008 (a module that ignores the keys gives equal means)
    assert key_mean > 5 * filler_mean and key_mean - filler_mean > 0.1, (key_mean, filler_mean)


def _toy_schedule_inputs(seed=0, n=40):
    rng = random.Random(seed)
    difficulties = [[rng.uniform(0.5, 3.0) for _ in range(rng.randint(2, 6))] for _ in range(n)]
    clusters = [0 if i < n * 3 // 4 else 1 + i % 3 for i in range(n)]   # one big cluster, three small ones
    return difficulties, clusters


def test_schedule_budget_monotone_and_complete():
    from megatron_tsdkd.kpod.schedule import budget_fraction, progressive_schedule

    difficulties, clusters = _toy_schedule_inputs()
    epochs = 8
    s = progressive_schedule(difficulties, clusters, epochs, beta_div=12.0)
    T, total = s["T"], s["total"]
    assert s["given"][0] == [len(d) - 1 for d in difficulties]
    for t in range(epochs):
        assert abs(s["budget"][t] - total * budget_fraction(t, T)) < 1e-9
        assert s["learned"][t] <= max(s["budget"][t], s["learned"][0]) + 1e-9, t   # D(t) respected
        if 0 < t < T:   # one step down at most per stage; at T all remaining steps go (c_i = 0)
            assert all(0 <= b <= a and a - b <= 1 for a, b in zip(s["given"][t - 1], s["given"][t])), t
    assert all(c == 0 for c in s["given"][int(T)]) and all(c == 0 for c in s["given"][-1])
    assert any(s["given"][1][i] < s["given"][0][i] for i in range(len(difficulties)))   # it progresses before T
    flat = progressive_schedule(difficulties, clusters, epochs, use_progression=False)
    assert all(c == 0 for stage in flat["given"] for c in stage)


def test_diversity_term_spreads_selections_across_clusters():
    from megatron_tsdkd.kpod.schedule import select

    costs = {i: 1.0 + 0.01 * (i % 4) for i in range(40)}
    costs.update({i: 1.05 for i in range(30, 40)})      # the small clusters are slightly dearer
    clusters = [0] * 30 + [1 + i % 3 for i in range(10)]
    spread = lambda chosen: len({clusters[i] for i in chosen})  # noqa: E731
    plain, diverse = select(costs, clusters, 8.0, beta=0.0), select(costs, clusters, 8.0, beta=12.0)
    assert sum(costs[i] for i in diverse) <= 8.0 and sum(costs[i] for i in plain) <= 8.0
    assert spread(plain) == 1 and spread(diverse) == 4, (plain, diverse)


def test_float_weights_survive_padding_and_weight_the_loss():
    """micro_batches keeps the float weights through padding and cutting; the loss is the weighted NLL (a
    binarised mask gives another value)."""
    from megatron_tsdkd.data.collate import micro_batches
    from megatron_tsdkd.losses import cross_entropy_loss

    pairs = [([1, 2], [3, 4, 5]), ([1], [6, 7, 8, 9, 10])]
    weights = [[0.0, 0.25, 1.0], [0.5, 0.0, 0.75, 0.125, 1.0]]
    batches, length = micro_batches(pairs, 2, 0, max_length=5, weights=weights)
    mask = batches[0].loss_mask
    assert length == 5 and mask.shape == (2, 5)
    assert mask[0].tolist() == [0.0, 0.0, 0.25, 1.0, 0.0]           # padded after
    assert mask[1].tolist() == [0.5, 0.0, 0.75, 0.125, 0.0]          # cut to max_length with its tokens
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 16)
    nll = -logits.log_softmax(-1).gather(2, batches[0].labels.unsqueeze(-1)).squeeze(-1)
    expected = (nll * mask).sum() / (mask != 0).sum()
    loss = cross_entropy_loss(logits, batches[0].labels, mask)
    assert torch.allclose(loss, expected, atol=1e-6)
    binary = cross_entropy_loss(logits, batches[0].labels, (mask != 0).float())
    assert abs(loss.item() - binary.item()) > 1e-2


# ----------------------------------------------------------------------------------------------------------------
# training with the demo models

@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A small rationale set (demo arithmetic chains, as generate_teacher_data.py would write) and KPOD's
    artefacts prepared from it with the demo student."""
    from megatron_tsdkd.data.arithmetic_chains import make_problems

    root = tmp_path_factory.mktemp("kpod")
    with open(root / "train.jsonl", "w") as f:
        for p in make_problems(seed=7, count=16):
            f.write(json.dumps({"prompt": p.prompt, "response": p.solution, "answer": p.answer}) + "\n")
    run_serial(_prepare, str(root / "train.jsonl"), str(root / "prepared"))
    return root


def _prepare(data, out):
    from megatron_tsdkd.kpod.prepare import PrepareSettings, prepare
    from megatron_tsdkd.kpod.token_weighting import WeightingConfig

    prepare(PrepareSettings(data, os.path.join(DEMO, "student"), out, epochs=4, num_clusters=3,
                            weighting=WeightingConfig(warmup_steps=5, steps=5, hidden=32, batch_size=8)), log=lambda *_: None)


def _contents(folder):
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


def test_prepare_writes_readable_artefacts_and_resumes(workdir, tmp_path):
    from megatron_tsdkd.kpod import artefacts

    prepared = workdir / "prepared"
    assert set(artefacts.ALL) <= set(os.listdir(prepared))
    steps = artefacts.read_jsonl(prepared / artefacts.STEPS)
    weights = artefacts.read_jsonl(prepared / artefacts.WEIGHTS)
    difficulty = artefacts.read_jsonl(prepared / artefacts.DIFFICULTY)
    schedule = artefacts.read_json(prepared / artefacts.SCHEDULE)
    assert len(steps) == len(weights) == len(difficulty) == 16
    assert all(len(s["token_steps"]) == len(w["weights"]) == len(s["response_ids"]) for s, w in zip(steps, weights))
    assert all(len(d["difficulty"]) == s["n_steps"] and all(x > 0 for x in d["difficulty"])
               for s, d in zip(steps, difficulty))
    assert len(schedule["given"]) == 4 and len(artefacts.read_json(prepared / artefacts.CLUSTERS)["labels"]) == 16
    assert set(torch.load(prepared / artefacts.MODULE)) >= {"mlp.0.weight", "attention.in_proj_weight"}
    full = _contents(prepared)
    # "killed" after the weights: difficulty, clusters and schedule missing, then rerun
    cut = tmp_path / "cut"
    cut.mkdir()
    for name in (artefacts.STEPS, artefacts.MODULE, artefacts.WEIGHTS):
        (cut / name).write_bytes(full[name])
    stamp = os.stat(cut / artefacts.WEIGHTS).st_mtime_ns
    run_serial(_prepare, str(workdir / "train.jsonl"), str(cut))
    assert os.stat(cut / artefacts.WEIGHTS).st_mtime_ns == stamp   # finished artefacts are not recomputed
    assert _contents(cut) == full


def overrides(root, extra=()):
    return [
        f"models.student.path={DEMO}/student", f"data.train={root}/train.jsonl", "method.name=kpod",
        f"method.prepared_dir={root}/prepared", "method.num_clusters=3", "data.max_length=64",
        "data.max_prompt_length=32", "precision.dtype=fp32", "batch.global_size=8", "batch.micro_size=2",
        f"schedule.max_steps={STEPS}", "optimizer.lr=1e-3", "optimizer.clip_grad=1.0", "rollout.on_policy_prob=0",
        "method.chunk_size=16", "logging.progress_bar=false", f"logging.dir={root}/tb", "checkpoint.interval=0",
        "checkpoint.resume=none", *extra,
    ]


def _train(argv, stop_after=None):
    from megatron_tsdkd.config import load_config
    from megatron_tsdkd.engines.trainer import build_trainer

    trainer = build_trainer(load_config(None, argv))
    history = trainer.train(stop_after=stop_after)
    return [h.metrics["loss/total"] for h in history if h.metrics is not None], \
        [trainer.sampler.epoch, trainer.inputs.train.stage(trainer.sampler.epoch)]


def test_kpod_tp2_reproduces_tp1(workdir, tmp_path):
    argv = overrides(workdir, [f"checkpoint.dir={tmp_path}/ck"])
    serial, _ = run_serial(_train, argv + ["parallel.tensor=1"])
    parallel, _ = run_parallel(_train, argv + ["parallel.tensor=2", f"checkpoint.dir={tmp_path}/ck2"],
                               world_size=2, tp=2)[0]
    assert len(serial) == len(parallel) == STEPS and all(math.isfinite(x) for x in serial)
    for s, p in zip(serial, parallel):
        assert abs(s - p) <= 1e-4 * max(1.0, abs(s)), (serial, parallel)


def test_two_stages_train_and_resume_exactly(workdir, tmp_path):
    """16 examples / 8 per batch = 2 steps per epoch: 4 steps cover stages 0 and 1; killed after step 3 (last
    checkpoint at step 2, in stage 1), the resumed run repeats the uninterrupted losses."""
    base = overrides(workdir, ["schedule.max_steps=4", "checkpoint.interval=2"])
    full, (epoch, stage) = run_serial(_train, base + [f"checkpoint.dir={tmp_path}/full"])
    assert len(full) == 4 and epoch == 1 and stage == 1
    first, _ = run_serial(_train, base + [f"checkpoint.dir={tmp_path}/cut"], stop_after=3)
    assert len(first) == 3
    resumed, _ = run_serial(_train, base + [f"checkpoint.dir={tmp_path}/cut", "checkpoint.resume=auto"])
    assert len(resumed) == 2
    for a, b in zip(full[2:], resumed):
        assert abs(a - b) <= 1e-6 * max(1.0, abs(a)), (full, resumed)


def test_epoch_samples_carry_stage_weights_into_batches(workdir):
    """The trainer's data path (for_epoch -> response_weights -> micro_batches) on the prepared artefacts: stage 0
    gives every step but the last as input (weight 0), later rationale tokens get their float w_j, the answer 1."""
    from transformers import AutoTokenizer

    from megatron_tsdkd.data import load_chat_dataset
    from megatron_tsdkd.data.collate import micro_batches, response_weights
    from megatron_tsdkd.kpod import artefacts
    from megatron_tsdkd.kpod.samples import load_kpod_dataset

    base = load_chat_dataset(str(workdir / "train.jsonl"), AutoTokenizer.from_pretrained(f"{DEMO}/student"),
                             max_length=64, max_prompt_length=32)
    data = load_kpod_dataset(base, str(workdir / "prepared"))
    steps = artefacts.read_jsonl(workdir / "prepared" / artefacts.STEPS)
    w = artefacts.read_jsonl(workdir / "prepared" / artefacts.WEIGHTS)
    given = artefacts.read_json(workdir / "prepared" / artefacts.SCHEDULE)["given"]
    for epoch in (0, 1, 9):
        examples = [data.for_epoch(epoch)[i] for i in range(4)]
        batch = micro_batches([(e.prompt_ids, e.response_ids) for e in examples], 4, 0, 64,
                              weights=response_weights(examples))[0][0]
        for row, (e, s, ws) in enumerate(zip(examples, steps, w)):
            c = given[min(epoch, len(given) - 1)][row]
            expected = [1.0 if k == -1 else 0.0 if k < c else x for k, x in zip(s["token_steps"], ws["weights"])]
            start = len(e.prompt_ids) - 1
            got = batch.loss_mask[row, start:start + len(e.response_ids)].tolist()
            assert got == pytest.approx(expected[:len(e.response_ids)], abs=1e-7), (epoch, row)
            if epoch == 0:
                assert c == s["n_steps"] - 1 and 0.0 in got
            assert any(0 < x < 1 for x in got) or c == s["n_steps"]   # float weights, not binarised
