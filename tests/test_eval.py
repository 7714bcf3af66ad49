"""Answer extraction and scoring, and the shipped demo models: the teacher must clearly beat the student."""
import json
import os

import pytest
import torch

from megatron_tsdkd.data import ChatTemplateTokenizer
from megatron_tsdkd.eval import extract_answer, is_correct, normalize_answer, score
from megatron_tsdkd.eval.hf_generation import greedy_texts

DEMO = os.path.join(os.path.dirname(__file__), "..", "megatron_tsdkd", "assets", "demo")


@pytest.mark.parametrize("text, expected", [
    ("7+5=12. 12-3=9. 9+8=17. The answer is 17.", "17"),
    ("The answer is 3. Wait, no: the answer is 4.", "4"),                  # the last statement wins
    ("So the final answer is: -12", "-12"),
    ("Natalia sold 48/2 = 24 clips.\n#### 72", "72"),
    ("#### 1,234\n", "1,234"),
    (r"Thus $x = \boxed{\frac{1}{2}}$. The answer is 7.", r"\frac{1}{2}"),  # boxed outranks prose
    (r"\boxed{42}", "42"),
    ("The answer is $18.50.", "18.50"),
    ("The answer is blue.", "blue"),
    ("12-3=9. 9+8=17.", None),                                             # no final answer stated
    ("", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_normalize_and_is_correct():
    assert normalize_answer("1,234.0") == normalize_answer(1234) == normalize_answer("$1234.")
    assert normalize_answer("0.5") == normalize_answer("1/2")
    assert normalize_answer(" Blue") == "blue"
    assert is_correct("... #### 72", "#### 72")                             # a GSM8K reference is extracted too
    assert is_correct("The answer is 72.", 72)
    assert not is_correct("The answer is 71.", 72)
    assert is_correct("72", 72) and is_correct("1,234", "#### 1234")       # an already-extracted answer
    assert not is_correct("12-3=9. 9+8=17.", 17)                            # a rationale that states no answer


def test_score():
    assert score(["The answer is 17.", "#### 5", "The answer is 2", "nothing"], ["17", 5, "3", "4"]) == 0.5
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        score(["a", "b"], ["a"])


def test_shipped_teacher_beats_shipped_student():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(DEMO, "teacher"))
    student_tokenizer = AutoTokenizer.from_pretrained(os.path.join(DEMO, "student"))
    assert student_tokenizer.get_vocab() == tokenizer.get_vocab()
    rows = [json.loads(line) for line in open(os.path.join(DEMO, "data", "eval.jsonl"))][:48]
    chat = ChatTemplateTokenizer(tokenizer)
    prompts = [chat.prompt_ids([{"role": "user", "content": row["prompt"]}]) for row in rows]
    accuracy = {}
    for name in ("teacher", "student"):
        model = AutoModelForCausalLM.from_pretrained(os.path.join(DEMO, name), dtype=torch.float32)
        assert model.config.vocab_size % 2 == 0 and model.config.vocab_size >= len(tokenizer)
        accuracy[name] = score(greedy_texts(model, tokenizer, prompts, max_new_tokens=64),
                               [row["answer"] for row in rows])
    assert accuracy["teacher"] >= 0.85, accuracy
    assert accuracy["student"] <= accuracy["teacher"] - 0.3, accuracy


def _megatron_eval(argv):
    from megatron_tsdkd.commands.eval import main
    return main(argv)


def test_tsdkd_eval_at_tp2_matches_transformers_on_the_demo_student(tmp_path):
    """The megatron evaluation path (tsdkd-eval) and transformers' greedy decoding agree problem by problem."""
    import json
    import os

    from harness import run_parallel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_tsdkd.eval import extract_answer, is_correct
    from megatron_tsdkd.eval.hf_generation import greedy_texts

    demo = os.path.join(os.path.dirname(__file__), "..", "megatron_tsdkd", "assets", "demo")
    rows = [json.loads(line) for line in open(os.path.join(demo, "data", "eval.jsonl"))][:24]
    subset = tmp_path / "eval.jsonl"
    subset.write_text("".join(json.dumps(r) + "\n" for r in rows))
    student = os.path.join(demo, "student")
    accuracy = run_parallel(_megatron_eval, ["--model", student, "--data", str(subset), "--tp", "2",
                                             "--max-new-tokens", "64"], world_size=2, tp=2)
    tok = AutoTokenizer.from_pretrained(student)
    model = AutoModelForCausalLM.from_pretrained(student)
    prompts = [tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True)
               for r in rows]
    prompts = [p["input_ids"] if isinstance(p, dict) or hasattr(p, "keys") else p for p in prompts]
    texts = greedy_texts(model, tok, prompts, max_new_tokens=64)
    hf = sum(is_correct(extract_answer(t) or "", r["answer"]) and extract_answer(t) is not None
             for t, r in zip(texts, rows)) / len(rows)
    assert accuracy == [hf, hf], (accuracy, hf)
    assert 0 < hf < 1  # the student is neither hopeless nor perfect: the comparison means something
