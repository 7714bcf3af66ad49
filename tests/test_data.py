"""The data pipeline: JSONL formats, chat-template masks, truncation, collation and the resumable DP sampler."""
import json
import os

import pytest
import torch

from megatron_tsdkd.data import (ChatTemplateTokenizer, DataFormatError, DistributedBatchSampler,
                                 batch_from_generations, collate_prompts, collate_training, load_chat_dataset,
                                 read_jsonl)
from megatron_tsdkd.data.arithmetic_chains import make_problems

DEMO = os.path.join(os.path.dirname(__file__), "..", "megatron_tsdkd", "assets", "demo")


def write_lines(path, lines):
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def chatml_tokenizer(tmp_path_factory):
    """Byte-level tokenizer with a ChatML template that puts a newline after every <|im_end|>."""
    from tiny_models import make_tokenizer
    return make_tokenizer(str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def demo_tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(os.path.join(DEMO, "teacher"))


def test_three_formats_parse_to_one_shape(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello"}], "answer": 5},
        {"prompt": "2+2?", "response": "4"},
        "",
        {"instruction": "Say yes", "response": "yes"},
    ])
    chat, pair, ultra = list(read_jsonl(path))
    assert chat.prompt_messages == ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"})
    assert (chat.response, chat.answer, chat.source) == ("Hello", "5", f"{path}:1")
    assert pair.prompt_messages == ({"role": "user", "content": "2+2?"},) and pair.response == "4"
    assert ultra.prompt_messages == ({"role": "user", "content": "Say yes"},) and ultra.source == f"{path}:4"
    on_policy = list(read_jsonl(path, mode="on_policy"))
    assert [r.response for r in on_policy] == [None, None, None]
    assert on_policy[0].prompt_messages == chat.prompt_messages


def test_on_policy_accepts_prompt_only_lines(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [{"prompt": "q"}, {"messages": [{"role": "user", "content": "q"}]}])
    assert len(list(read_jsonl(path, mode="on_policy"))) == 2
    with pytest.raises(DataFormatError, match=r"d\.jsonl:1: missing column 'response' \(data\.fields\.response\)"):
        list(read_jsonl(path, mode="off_policy"))


@pytest.mark.parametrize("bad_line, reason", [
    ('{"prompt": "q", "response": ', "invalid JSON"),
    ({"question": "q", "response": "a"}, "expected column 'messages', 'prompt' or 'instruction'"),
    ({"prompt": "q", "response": "  "}, "column 'response' (data.fields.response) is empty"),
    ({"prompt": 3, "response": "a"}, "column 'prompt' (data.fields.prompt) must be a string, got int"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}, "is empty"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 7}]}, "content must be a string"),
    ({"messages": [{"role": "user", "content": "q"}]}, "last message of 'messages' must be the assistant's"),
    ({"messages": [{"role": "bot", "content": "q"}]}, "unknown role 'bot'"),
    ({"messages": [{"role": "assistant", "content": "a"}]}, "no prompt before the response"),
    ({"prompt": "q", "response": "a", "answer": [1]}, "column 'answer' (data.fields.answer) must be a string or a number"),
    ([1, 2], "expected a JSON object"),
])
def test_malformed_line_names_file_and_line(tmp_path, bad_line, reason):
    path = write_lines(tmp_path / "bad.jsonl", [{"prompt": "fine", "response": "ok"}, "", bad_line])
    with pytest.raises(DataFormatError) as err:
        list(read_jsonl(path))
    assert str(err.value).startswith(f"{path}:3: ")
    assert reason in str(err.value)


def test_response_ends_with_end_of_turn_and_template_tail_is_dropped(chatml_tokenizer):
    chat = ChatTemplateTokenizer(chatml_tokenizer)
    messages = [{"role": "user", "content": "What is 2+2?"}]
    prompt = chat.prompt_ids(messages)
    response = chat.response_ids(messages, "It is 4.")
    assert chatml_tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")
    assert chatml_tokenizer.decode(response) == "It is 4.<|im_end|>"          # the template's "\n" is not a target
    assert response[-1] == chatml_tokenizer.eos_token_id == chat.end_of_turn_id


def test_masks_cover_exactly_the_response_tokens(chatml_tokenizer, tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [{"prompt": "Hi", "response": "Hello there"},
                                              {"prompt": "A longer question here", "response": "No"}])
    data = load_chat_dataset(path, chatml_tokenizer, max_length=128, max_prompt_length=64)
    pad = chatml_tokenizer.pad_token_id
    batch = collate_training(data.examples, pad_id=pad, pad_to=60)
    assert batch.input_ids.shape == batch.labels.shape == batch.loss_mask.shape == (2, 60)
    for row, example in enumerate(data.examples):
        prompt_len, total = len(example.prompt_ids), len(example.input_ids)
        assert batch.input_ids[row, :total].tolist() == example.input_ids
        assert (batch.input_ids[row, total:] == pad).all()
        assert batch.labels[row, :-1].tolist() == batch.input_ids[row, 1:].tolist()
        targets = batch.labels[row][batch.loss_mask[row] == 1].tolist()
        assert targets == example.response_ids                                   # end-of-turn included, nothing else
        assert targets[-1] == chatml_tokenizer.eos_token_id
        assert torch.nonzero(batch.loss_mask[row]).view(-1).tolist() == list(range(prompt_len - 1, total - 1))
    assert batch.num_targets == sum(len(e.response_ids) for e in data.examples)
    assert collate_training(data.examples, pad, pad_to_multiple_of=16).input_ids.shape[1] % 16 == 0
    with pytest.raises(ValueError, match="shorter than the longest"):
        collate_training(data.examples, pad, pad_to=5)


def test_truncation_is_counted(chatml_tokenizer, tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [
        {"prompt": "q", "response": "short"},
        {"prompt": "q", "response": "a response far too long to fit " * 3},
        {"prompt": "a prompt that alone is much longer than the prompt limit " * 2, "response": "x"},
    ])
    data = load_chat_dataset(path, chatml_tokenizer, max_length=48, max_prompt_length=40)
    stats = data.stats
    assert (stats.read, stats.kept, stats.dropped_long_prompt, stats.truncated_response) == (3, 2, 1, 1)
    assert stats.dropped_sources == [f"{path}:3"]
    assert max(len(e.input_ids) for e in data.examples) == 48
    full = len(ChatTemplateTokenizer(chatml_tokenizer).response_ids([{"role": "user", "content": "q"}],
                                                                    "a response far too long to fit " * 3))
    assert stats.response_tokens_removed == full - len(data.examples[1].response_ids)
    assert "2/3 examples kept" in stats.summary()


def test_on_policy_dataset_keeps_prompts_only(chatml_tokenizer, tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [{"prompt": "Hi", "response": "Hello"}, {"prompt": "Yo"}])
    data = load_chat_dataset(path, chatml_tokenizer, mode="on_policy", max_length=64, max_prompt_length=32)
    assert [e.response_ids for e in data.examples] == [[], []]
    assert data.examples[0].prompt_ids == ChatTemplateTokenizer(chatml_tokenizer).prompt_ids(
        [{"role": "user", "content": "Hi"}])


def test_prompt_batches_and_generations_back_to_training_batches():
    eos, pad = 2, 0
    prompts = [[5, 6, 7], [8]]
    batch = collate_prompts(prompts, pad)
    assert batch.input_ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch.prompts() == prompts
    assert collate_prompts(prompts, pad, padding_side="right").input_ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    generated = torch.tensor([[9, 2, 0, 0], [3, 4, 9, 9]])      # row 0 stopped at EOS; row 1 hit the token limit
    train = batch_from_generations(batch, generated, eos_id=eos, pad_id=pad)
    expected = collate_training([([5, 6, 7], [9, 2]), ([8], [3, 4, 9, 9])], pad)
    for name in ("input_ids", "labels", "loss_mask", "prompt_lengths", "lengths"):
        assert torch.equal(getattr(train, name), getattr(expected, name)), name
    assert train.loss_mask.tolist() == [[0, 0, 1, 1, 0], [1, 1, 1, 1, 0]]
    with pytest.raises(ValueError, match="2 prompts but 1 generated"):
        batch_from_generations(prompts, [[1]], eos_id=eos, pad_id=pad)


def run_batches(sampler, count):
    return [sampler.next_batch() for _ in range(count)]


def test_sampler_shards_are_disjoint_and_cover_each_global_batch():
    ranks = [DistributedBatchSampler(50, 12, dp_rank=r, dp_size=3, seed=7) for r in range(3)]
    assert ranks[0].batches_per_epoch == 4
    for _ in range(9):                                             # crosses two epoch boundaries
        epoch, position = ranks[0].epoch, ranks[0].position
        shards = [s.next_batch() for s in ranks]
        assert all(len(shard) == 4 for shard in shards)
        union = sorted(i for shard in shards for i in shard)
        assert len(set(union)) == 12
        expected_epoch, expected_pos = (epoch + 1, 0) if position == 4 else (epoch, position)
        assert union == sorted(ranks[0].global_batch(expected_epoch, expected_pos))
    epoch0 = [i for p in range(4) for i in ranks[0].global_batch(0, p)]
    assert len(set(epoch0)) == 48                                  # no example twice within an epoch


def test_sampler_is_deterministic_and_resumes_exactly():
    first = run_batches(DistributedBatchSampler(40, 8, dp_rank=1, dp_size=2, seed=3), 12)
    assert first == run_batches(DistributedBatchSampler(40, 8, dp_rank=1, dp_size=2, seed=3), 12)
    assert first != run_batches(DistributedBatchSampler(40, 8, dp_rank=1, dp_size=2, seed=4), 12)
    assert first[:5] != first[5:10]                                # epochs are shuffled differently
    interrupted = DistributedBatchSampler(40, 8, dp_rank=1, dp_size=2, seed=3)
    run_batches(interrupted, 7)
    state = json.loads(json.dumps(interrupted.state_dict()))      # survives a round trip through a checkpoint
    resumed = DistributedBatchSampler(40, 8, dp_rank=1, dp_size=2, seed=3)
    resumed.load_state_dict(state)
    assert run_batches(resumed, 5) == first[7:12]
    assert list(DistributedBatchSampler(40, 8, shuffle=False)) == [list(range(i, i + 8)) for i in range(0, 40, 8)]
    with pytest.raises(ValueError, match="checkpoint has seed=3, this run has 5"):
        DistributedBatchSampler(40, 8, seed=5).load_state_dict(state)
    with pytest.raises(ValueError, match="multiple of the data-parallel size 3"):
        DistributedBatchSampler(40, 8, dp_size=3)


def test_demo_tokenizer_round_trips_and_has_a_chat_template(demo_tokenizer):
    text = "Compute 7+5-3+8.\n7+5=12. 12-3=9. 9+8=17. The answer is 17."
    ids = demo_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and demo_tokenizer.decode(ids) == text
    assert demo_tokenizer.unk_token_id not in ids
    from transformers import PreTrainedTokenizerFast             # AutoTokenizer picks Qwen2Tokenizer: same ids?
    plain = PreTrainedTokenizerFast.from_pretrained(os.path.join(DEMO, "student"))
    assert plain(text, add_special_tokens=False)["input_ids"] == ids
    assert 30 <= len(demo_tokenizer) <= 256 and demo_tokenizer.pad_token_id != demo_tokenizer.eos_token_id
    chat = ChatTemplateTokenizer(demo_tokenizer)
    messages = [{"role": "user", "content": "Compute 1+2."}]
    assert demo_tokenizer.decode(chat.prompt_ids(messages)) == "<|user|>Compute 1+2.<|end|>\n<|assistant|>"
    assert demo_tokenizer.decode(chat.response_ids(messages, "1+2=3. The answer is 3.")) == \
        "1+2=3. The answer is 3.<|end|>"


def test_arithmetic_chains_are_consistent_and_held_out():
    problems = make_problems(seed=0, count=300, min_steps=2, max_steps=4)
    for p in problems:
        assert eval(p.prompt[len("Compute "):-1]) == p.answer >= 0          # the prompt is plain arithmetic
        assert p.solution.endswith(f"The answer is {p.answer}.") and p.solution.count("=") == len(p.steps)
    held_out = {p.prompt for p in problems}
    assert not held_out & {p.prompt for p in make_problems(seed=1, count=300, exclude=held_out)}
    shipped_train = [json.loads(line)["prompt"] for line in open(os.path.join(DEMO, "data", "train.jsonl"))]
    shipped_eval = [json.loads(line)["prompt"] for line in open(os.path.join(DEMO, "data", "eval.jsonl"))]
    assert shipped_train and shipped_eval and not set(shipped_train) & set(shipped_eval)
