"""KV-cached generation under TP/PP reproduces transformers' greedy decoding, samples from the right distribution,
and the teacher-data command resumes without duplicates.

One rank function per layout (TP1, TP2, PP2, TP2xPP2) runs every model-level check on a tiny random Qwen2 and Llama 3
(batched prompts of different lengths, so left padding is exercised); the test process compares the ranks'
results with each other, across layouts and with transformers run on the same safetensors, one prompt at a time.
"""
from __future__ import annotations

import json

import pytest
import torch
from harness import run_parallel, run_serial
from tiny_models import VOCAB_SIZE, make_tiny_hf_model

from megatron_tsdkd.generation import SamplingConfig
from megatron_tsdkd.generation.token_selection import filter_top_k_top_p, sample_from_logits, select_tokens

ARCHS = {"qwen2": 11, "llama": 12}          # arch -> weight seed
PROMPTS = [[5, 17, 33, 9, 100, 250, 31], [7, 8], [42, 43, 44, 45, 46]]
MAX_NEW = 10
EOS, PAD = 2, 0
LAYOUTS = [(1, 1, 1), (2, 2, 1), (2, 1, 2), (4, 2, 2)]   # world, tp, pp
STAT_SAMPLES, STAT_TEMPERATURE, STAT_TOP_K = 3000, 0.7, 5
CHI2_DF4_P1E4 = 23.51   # chi-square quantile, 4 degrees of freedom, p = 1e-4


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny_gen")
    return {arch: make_tiny_hf_model(arch, str(root / arch), seed=seed) for arch, seed in ARCHS.items()}


@pytest.fixture(scope="module")
def hf_reference(tiny_dirs):
    """Per arch: transformers' greedy continuation of each prompt alone, and the first prompt's next-token logits."""
    from transformers import AutoModelForCausalLM

    out = {}
    with torch.no_grad():
        for arch, path in tiny_dirs.items():
            model = AutoModelForCausalLM.from_pretrained(path).eval()
            greedy = []
            for prompt in PROMPTS:
                ids = torch.tensor([prompt])
                full = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                      max_new_tokens=MAX_NEW, eos_token_id=EOS, pad_token_id=PAD)
                greedy.append(full[0, len(prompt):].tolist())
            out[arch] = {"greedy": greedy, "next_logits": model(torch.tensor([PROMPTS[0]])).logits[0, -1]}
    return out


# ---------------------------------------------------------------------------------------------------------------
# Code that runs on the ranks (module level so the worker pool can import it).

def _load(path: str):
    from megatron_tsdkd.models import build_model, load_hf_weights, read_hf_config

    config = read_hf_config(path)
    model = build_model(config, perform_initialization=False)
    load_hf_weights(model, path, config)
    return model


def _layout_checks(dirs: dict[str, str]) -> dict:
    """Every generation variant the tests compare, per arch, as plain lists."""
    from megatron_tsdkd.generation import generate

    results = {}
    for arch, path in dirs.items():
        model = _load(path)

        def run(prompts=PROMPTS, eos=(EOS,), seed=0, kv=True, **sampling):
            out = generate(model, prompts, SamplingConfig(**{"max_new_tokens": MAX_NEW, **sampling}),
                           eos_token_ids=eos, pad_token_id=PAD, vocab_size=VOCAB_SIZE, generator_seed=seed,
                           use_kv_cache=kv)
            return {"responses": out.responses, "prompt_index": out.prompt_index, "finished": out.finished}

        greedy = run(greedy=True)
        stop_token = greedy["responses"][0][3]
        sampled = dict(temperature=1.3, top_p=0.95, num_samples=2)
        results[arch] = {
            "greedy": greedy,
            "greedy_no_cache": run(greedy=True, kv=False),
            "top_k_1": run(temperature=0.8, top_k=1),
            "sampled": run(seed=11, **sampled),
            "sampled_again": run(seed=11, **sampled),
            "sampled_no_cache": run(seed=11, kv=False, **sampled),
            "sampled_other_seed": run(seed=12, **sampled),
            "stop_token": stop_token,
            "eos_stop": run(greedy=True, eos=(stop_token,)),
            "first_tokens": run(prompts=[PROMPTS[0]], max_new_tokens=1, temperature=STAT_TEMPERATURE,
                                top_k=STAT_TOP_K, num_samples=STAT_SAMPLES, seed=3)["responses"],
        }
    return results


def _teacher_main(argv: list[str]) -> None:
    from megatron_tsdkd.commands.teacher_data import main

    main(argv)


# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def layout_results(tiny_dirs) -> dict[tuple[int, int], list[dict]]:
    """(tp, pp) -> per-rank results; the four launches every model-level test reads."""
    return {(tp, pp): run_parallel(_layout_checks, tiny_dirs, world_size=world, tp=tp, pp=pp)
            for world, tp, pp in LAYOUTS}


def _truncate_at(tokens: list[int], stop: int) -> list[int]:
    return tokens[:tokens.index(stop) + 1] if stop in tokens else tokens


@pytest.mark.parametrize("layout", [(tp, pp) for _, tp, pp in LAYOUTS], ids=lambda lp: f"tp{lp[0]}pp{lp[1]}")
def test_greedy_matches_transformers_and_no_cache(layout_results, hf_reference, layout):
    ranks = layout_results[layout]
    for rank, result in enumerate(ranks):
        assert result == ranks[0], f"rank {rank} generated differently from rank 0"
    for arch, checks in ranks[0].items():
        expected = [_truncate_at(r, EOS) for r in hf_reference[arch]["greedy"]]
        assert checks["greedy"]["responses"] == expected, f"{arch}: KV-cached greedy differs from transformers"
        assert checks["greedy_no_cache"]["responses"] == expected, f"{arch}: recomputed greedy differs"
        assert checks["top_k_1"]["responses"] == expected, f"{arch}: top_k=1 sampling is not greedy"


def test_sampling_is_seeded_and_layout_independent(layout_results):
    reference = layout_results[(1, 1)][0]
    for arch, checks in reference.items():
        assert checks["sampled_again"] == checks["sampled"], f"{arch}: same seed, different samples"
        assert checks["sampled_no_cache"] == checks["sampled"], f"{arch}: KV cache changed the samples"
        assert checks["sampled_other_seed"] != checks["sampled"], f"{arch}: the seed has no effect"
        assert checks["sampled"]["prompt_index"] == [0, 0, 1, 1, 2, 2]
        samples = checks["sampled"]["responses"]
        assert len(samples) == 2 * len(PROMPTS) and samples[0] != samples[1], f"{arch}: samples of a prompt coincide"
        assert all(0 <= t < VOCAB_SIZE for r in samples for t in r)
        for layout, ranks in layout_results.items():
            assert ranks[0][arch]["sampled"] == checks["sampled"], f"{arch}: TP/PP {layout} sampled differently"


def test_eos_stops_each_row(layout_results):
    for layout, ranks in layout_results.items():
        for arch, checks in ranks[0].items():
            stop = checks["stop_token"]
            greedy = checks["greedy"]["responses"]
            out = checks["eos_stop"]
            assert out["responses"] == [_truncate_at(r, stop) for r in greedy], f"{arch} {layout}: wrong EOS cut"
            assert out["finished"] == [stop in r for r in greedy]
            assert out["responses"][0][-1] == stop and len(out["responses"][0]) <= 4


def test_temperature_top_k_sampling_follows_softmax(layout_results, hf_reference):
    """End to end: 3000 first tokens of one prompt, at temperature 0.7 and top-k 5, against transformers' logits."""
    for arch in ARCHS:
        top = torch.topk(hf_reference[arch]["next_logits"].double(), STAT_TOP_K)
        expected = (top.values / STAT_TEMPERATURE).softmax(-1) * STAT_SAMPLES
        for layout, ranks in layout_results.items():
            tokens = [r[0] for r in ranks[0][arch]["first_tokens"]]
            assert set(tokens) <= set(top.indices.tolist()), f"{arch} {layout}: sampled outside the top-k"
            counts = torch.tensor([tokens.count(i) for i in top.indices.tolist()], dtype=torch.float64)
            chi2 = float(((counts - expected) ** 2 / expected).sum())
            assert chi2 < CHI2_DF4_P1E4, f"{arch} {layout}: chi2 {chi2:.1f}, counts {counts} vs {expected}"


# ---------------------------------------------------------------------------------------------------------------
# Token selection alone (no model): padding, top-p, the distribution on a tiny vocabulary.

def test_padded_vocabulary_is_never_chosen():
    vocab, padded, rows = 6, 8, 4000
    logits = torch.randn(rows, padded, generator=torch.Generator().manual_seed(0))
    logits[:, vocab:] = 50.0   # padding would win every time if it were not cut off
    for config in (SamplingConfig(greedy=True), SamplingConfig(temperature=2.0)):
        ids = select_tokens(logits, config, vocab, torch.Generator().manual_seed(1))
        assert int(ids.max()) < vocab
    assert torch.equal(select_tokens(logits, SamplingConfig(greedy=True), vocab, None), logits[:, :vocab].argmax(-1))


def test_sampling_distribution_on_tiny_vocabulary():
    """Temperature, top-k and top-p frequencies against the renormalised softmax (chi-square, p = 1e-4)."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    rows = 40000
    cases = [  # (config, tokens that may appear)
        (SamplingConfig(temperature=0.7), 6),
        (SamplingConfig(temperature=1.5, top_k=3), 3),
        (SamplingConfig(temperature=1.0, top_p=0.8), None),
    ]
    thresholds = {2: 18.42, 3: 21.11, 5: 25.74}   # chi-square quantiles at p = 1e-4 by degrees of freedom
    for config, keep in cases:
        target = filter_top_k_top_p(logits[None] / config.temperature, config.top_k, config.top_p)[0].softmax(-1)
        if keep is None:  # top-p 0.8 of softmax(logits): the 2 most likely tokens hold 0.77, the first 3 hold 0.89
            keep = int((target > 0).sum())
            assert keep == 3
        ids = sample_from_logits(logits.expand(rows, -1), config, torch.Generator().manual_seed(5))
        counts = torch.bincount(ids, minlength=6).double()
        assert counts[keep:].sum() == 0, f"{config}: sampled a filtered token"
        expected = target[:keep].double() * rows
        chi2 = float(((counts[:keep] - expected) ** 2 / expected).sum())
        assert chi2 < thresholds[keep - 1], f"{config}: chi2 {chi2:.1f}"


def test_exponential_race_draws_the_normalised_weights(monkeypatch):
    """token_selection.draw (argmax p / Exp(1), on the device) against p / sum(p) for unnormalised weights with
    zeros (chi-square, 3 degrees of freedom, p = 1e-4); zero weights never win; seeded; no torch.multinomial."""
    from megatron_tsdkd.generation.token_selection import draw

    def forbidden(*args, **kwargs):
        raise AssertionError("torch.multinomial validates probabilities on the host")

    monkeypatch.setattr(torch, "multinomial", forbidden)
    weights = torch.tensor([0.5, 0.0, 1.5, 3.0, 0.0, 1.0])
    rows = 40000
    ids = draw(weights.expand(rows, -1), torch.Generator().manual_seed(9))
    assert torch.equal(ids, draw(weights.expand(rows, -1), torch.Generator().manual_seed(9)))
    counts = torch.bincount(ids, minlength=6).double()
    assert counts[1] == 0 and counts[4] == 0
    keep = weights > 0
    expected = (weights / weights.sum()).double()[keep] * rows
    chi2 = float(((counts[keep] - expected) ** 2 / expected).sum())
    assert chi2 < 21.11, f"chi2 {chi2:.1f}, counts {counts.tolist()}"   # chi-square quantile: df 3, p = 1e-4


# ---------------------------------------------------------------------------------------------------------------
# generate_teacher_data

SOURCE_LINES = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
                  {"role": "assistant", "content": "old answer"}], "id": "a"},
    {"prompt": "Name a prime.", "answer": "2"},
    {"instruction": "Add 3 and 4.", "response": "old"},
    {"prompt": "Say hi."},
    {"messages": [{"role": "user", "content": "Count to three."}]},
]


def _read_lines(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_teacher_data_resumes_without_duplicates(tiny_dirs, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(x) + "\n" for x in SOURCE_LINES))
    args = ["--model", tiny_dirs["qwen2"], "--prompts", str(prompts), "--batch-size", "2", "--num-samples", "2",
            "--max-new-tokens", "6", "--seed", "4"]
    full, resumed = str(tmp_path / "full.jsonl"), str(tmp_path / "resumed.jsonl")
    run_serial(_teacher_main, args + ["--output", full])
    records = _read_lines(full)
    assert [(r["prompt_index"], r["sample_index"]) for r in records] == [(i, s) for i in range(5) for s in range(2)]

    # An interrupted run: two whole batches written, the third torn mid-line. Resume on two data-parallel replicas.
    with open(full) as f:
        lines = f.readlines()
    with open(resumed, "w") as f:
        f.writelines(lines[:8])
        f.write(lines[8][:15])
    run_parallel(_teacher_main, args + ["--output", resumed], world_size=2)
    with open(full) as f, open(resumed) as g:
        assert g.read() == f.read()

    first = records[0]
    assert first["id"] == "a" and first["prompt"] == "What is 2+2?"
    assert first["messages"][:2] == SOURCE_LINES[0]["messages"][:2]
    assert first["messages"][2] == {"role": "assistant", "content": first["response"]}
    assert records[2]["answer"] == "2" and records[4]["instruction"] == "Add 3 and 4."
    assert records[4]["response"] != "old" and records[4]["prompt"] == "Add 3 and 4."
    _check_loadable(records)


def _check_loadable(records: list[dict]) -> None:
    """The off-policy loader reads every answer back as written (it refuses empty ones: none may be written)."""
    from megatron_tsdkd.data.records import parse_record

    for number, record in enumerate(records):
        assert record["response"].strip(), f"record {number} has an empty answer, which off-policy loading refuses"
        parsed = parse_record(record, f"line {number}", "off_policy")
        assert parsed.response == record["response"], f"record {number}: the loader reads another response"


# ---------------------------------------------------------------------------------------------------------------
# Finish reasons against transformers. A tiny model whose stop token is made likely: the lm_head rows of the stop
# token and of a token that greedy decoding emits mid-answer are swapped, so some answers end by EOS, others by
# length.

TEACHER_MAX_NEW = 6


def _prompt_messages() -> list[tuple[dict, ...]]:
    from megatron_tsdkd.data.records import parse_record

    return [parse_record(line, f"line {i}", "on_policy").prompt_messages for i, line in enumerate(SOURCE_LINES)]


def _hf_greedy_answers(path: str) -> tuple[list[list[int]], set[int], object]:
    """transformers' greedy continuation of each source line's chat prompt, alone, over the tokenizer's real
    vocabulary (the rows past it are padding that generation never samples), cut after the first stop token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(path)
    configured = GenerationConfig.from_pretrained(path).eos_token_id
    stops = {tokenizer.eos_token_id, *(configured if isinstance(configured, list) else [configured])} - {None}
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    answers = []
    with torch.no_grad():
        for messages in _prompt_messages():
            text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
            ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
            full = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                  max_new_tokens=TEACHER_MAX_NEW, eos_token_id=sorted(stops), pad_token_id=PAD,
                                  suppress_tokens=list(range(len(tokenizer), model.config.vocab_size)))
            answers.append(full[0, ids.shape[1]:].tolist())
    return answers, stops, tokenizer


@pytest.fixture(scope="module")
def eos_prone_dir(tmp_path_factory) -> str:
    from safetensors.torch import load_file, save_file

    path = make_tiny_hf_model("qwen2", str(tmp_path_factory.mktemp("tiny_eos") / "qwen2"), seed=ARCHS["qwen2"])
    weights_file = f"{path}/model.safetensors"
    original = load_file(weights_file)
    answers, stops, _ = _hf_greedy_answers(path)
    (stop,) = stops
    for step in (3, 2, 4, 1):   # the first candidate that gives both finish reasons and no empty answer
        for answer in answers:
            token = answer[step] if len(answer) > step else None
            if token is None or token in stops or token in answer[:step]:
                continue
            weights = dict(original)
            head = weights["lm_head.weight"].clone()
            head[[stop, token]] = head[[token, stop]]
            save_file({**weights, "lm_head.weight": head}, weights_file, metadata={"format": "pt"})
            swapped, _, _ = _hf_greedy_answers(path)
            ends = [a[-1] in stops for a in swapped]
            if any(ends) and not all(ends) and all(len(a) > 1 for a in swapped if a[-1] in stops):
                return path
    raise AssertionError("no lm_head swap gives both finish reasons; change the tiny model's seed")


def test_teacher_data_finish_reasons_and_answers_match_transformers(eos_prone_dir, tmp_path):
    """Greedy teacher data at TP=2 (batched, left-padded): each answer is transformers' greedy continuation,
    decoded without its stop token; finish_reason is "eos" exactly when that continuation ends with a stop id."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(x) + "\n" for x in SOURCE_LINES))
    output = str(tmp_path / "greedy.jsonl")
    run_parallel(_teacher_main, ["--model", eos_prone_dir, "--prompts", str(prompts), "--output", output, "--tp", "2",
                                 "--batch-size", "2", "--max-new-tokens", str(TEACHER_MAX_NEW), "--greedy"],
                 world_size=2, tp=2)
    records = _read_lines(output)
    answers, stops, tokenizer = _hf_greedy_answers(eos_prone_dir)
    assert [r["prompt_index"] for r in records] == list(range(len(SOURCE_LINES)))
    for record, answer in zip(records, answers):
        by_eos = answer[-1] in stops
        assert by_eos or len(answer) == TEACHER_MAX_NEW
        assert record["finish_reason"] == ("eos" if by_eos else "length"), f"{record} vs ids {answer}"
        text_ids = answer[:-1] if by_eos else answer
        assert record["response"] == tokenizer.decode(text_ids, skip_special_tokens=True), f"ids {answer}"
    reasons = [r["finish_reason"] for r in records]
    print(f"\ngreedy teacher answers: {[(r['finish_reason'], r['response']) for r in records]}")
    assert "eos" in reasons and "length" in reasons, f"the fixture should give both finish reasons: {reasons}"
    _check_loadable(records)
