"""Build the CPU demo's assets: a character-level chat tokenizer, a tiny Qwen2 teacher that solves arithmetic chains,
a smaller, weaker student sharing its tokenizer, and train/eval JSONL files.

    .venv/bin/python tools/build_demo_models.py [--out megatron_tsdkd/assets/demo]

Deterministic (seeded, one CPU thread); what it writes is what ships. The teacher is trained to convergence on
2-4 step chains; the student (own config, same tokenizer) is stopped half way through its learning-rate schedule:
it has learnt the format but gets most answers wrong, clearly weaker yet able to learn (the same run reaches 50%
after 400 of its 600 scheduled steps), so distillation has something to teach. The off-policy training file holds
the teacher's own greedy responses (sequence-level KD data); the eval file holds held-out problems that no training
file contains.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_tsdkd.data.arithmetic_chains import ChainProblem, make_problems  # noqa: E402
from megatron_tsdkd.data.chat_tokenization import ChatTemplateTokenizer  # noqa: E402
from megatron_tsdkd.data.collate import collate_training  # noqa: E402
from megatron_tsdkd.eval.answers import score  # noqa: E402
from megatron_tsdkd.eval.hf_generation import greedy_texts  # noqa: E402

SPECIAL_TOKENS = ["<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>", "<|unk|>"]
CHARACTERS = ["\n"] + [chr(c) for c in range(32, 127)]
CHAT_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if m['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{ raise_exception('the demo chat template has no role ' + m['role']) }}{%- endif -%}"
    "{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' + '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>' }}{%- endif -%}"
)
MODEL_VOCAB = 128            # tokenizer has 102 entries; padded so that TP=2 (and 4, 8) divide it
MAX_NEW_TOKENS = 64
EVAL_SEED, TRAIN_SEED, DATA_SEED = 1, 2, 3


def build_tokenizer():
    """A byte-level BPE without merges over printable ASCII and newline: one token per character, plus chat tokens.

    Byte-level like Qwen2's own tokenizer, so ``AutoTokenizer`` (which loads a ``qwen2`` folder as ``Qwen2Tokenizer``
    and rebuilds its pre-tokenizer) reads it identically.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_to_char = {ord(c): c for c in pre_tokenizers.ByteLevel.alphabet()}
    byte_to_char.update(_byte_level_names())
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for character in CHARACTERS:
        vocab[byte_to_char[ord(character)]] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|end|>", pad_token="<|pad|>",
                                        unk_token="<|unk|>",
                                        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"])
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.model_max_length = 256
    return tokenizer


def _byte_level_names() -> dict[int, str]:
    """GPT-2's byte -> printable character table (space -> 'Ġ', newline -> 'Ċ'), as byte-level tokenizers name bytes."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    names, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            names[byte] = chr(byte)
        else:
            names[byte] = chr(256 + extra)
            extra += 1
    return names


def model_config(tokenizer, hidden: int, layers: int, heads: int, intermediate: int, tie: bool):
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=MODEL_VOCAB, hidden_size=hidden, intermediate_size=intermediate,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=2,
                       max_position_embeddings=256, rope_theta=10000.0, rms_norm_eps=1e-6,
                       tie_word_embeddings=tie, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, use_cache=True)


def new_model(config, seed: int):
    from transformers import GenerationConfig, Qwen2ForCausalLM

    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
                                               bos_token_id=None, do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
    return model


def encode(chat: ChatTemplateTokenizer, problems: list[ChainProblem]) -> list[tuple[list[int], list[int]]]:
    pairs = []
    for p in problems:
        messages = [{"role": "user", "content": p.prompt}]
        pairs.append((chat.prompt_ids(messages), chat.response_ids(messages, p.solution)))
    return pairs


def train(model, pairs, pad_id: int, steps: int, batch_size: int, lr: float, seed: int, label: str,
          schedule_steps: int = 0) -> None:
    """Response-only cross-entropy with AdamW, linear warm-up and cosine decay over ``schedule_steps`` (default
    ``steps``); stopping before the schedule ends leaves a model that is only partly trained."""
    schedule_steps = schedule_steps or steps
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, schedule_steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(s, schedule_steps) / schedule_steps)))
    rng = random.Random(seed)
    order: list[int] = []
    model.train()
    start = time.time()
    for step in range(steps):
        if len(order) < batch_size:
            order = list(range(len(pairs)))
            rng.shuffle(order)
        batch = collate_training([pairs[order.pop()] for _ in range(batch_size)], pad_id)
        logits = model(input_ids=batch.input_ids).logits.float()
        per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch.labels, reduction="none")
        loss = (per_token * batch.loss_mask).sum() / batch.loss_mask.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"  {label} step {step:5d}/{steps} loss {loss.item():.4f} ({time.time() - start:.0f}s)", flush=True)


def accuracy(model, tokenizer, chat, problems: list[ChainProblem]) -> tuple[float, list[str]]:
    prompts = [chat.prompt_ids([{"role": "user", "content": p.prompt}]) for p in problems]
    texts = greedy_texts(model, tokenizer, prompts, max_new_tokens=MAX_NEW_TOKENS)
    return score(texts, [p.answer for p in problems]), texts


def write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def save(model, tokenizer, folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join("megatron_tsdkd", "assets", "demo"))
    parser.add_argument("--teacher-steps", type=int, default=800)
    parser.add_argument("--student-steps", type=int, default=300)
    parser.add_argument("--student-schedule-steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--eval-problems", type=int, default=200)
    parser.add_argument("--train-prompts", type=int, default=2000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    begin = time.time()

    tokenizer = build_tokenizer()
    chat = ChatTemplateTokenizer(tokenizer)
    eval_problems = make_problems(EVAL_SEED, args.eval_problems)
    held_out = {p.prompt for p in eval_problems}
    pool = make_problems(TRAIN_SEED, 30000, exclude=held_out)
    pairs = encode(chat, pool)
    print(f"tokenizer: {len(tokenizer)} tokens (model vocab {MODEL_VOCAB}); {len(pairs)} training problems; "
          f"longest sequence {max(len(p) + len(r) for p, r in pairs)} tokens", flush=True)

    teacher = new_model(model_config(tokenizer, hidden=128, layers=4, heads=4, intermediate=384, tie=False), seed=0)
    print(f"teacher: {sum(p.numel() for p in teacher.parameters()) / 1e6:.2f}M parameters", flush=True)
    train(teacher, pairs, tokenizer.pad_token_id, args.teacher_steps, args.batch_size, 3e-3, seed=10, label="teacher")
    teacher_acc, _ = accuracy(teacher, tokenizer, chat, eval_problems)
    print(f"teacher held-out accuracy: {teacher_acc:.1%}", flush=True)

    student = new_model(model_config(tokenizer, hidden=64, layers=2, heads=4, intermediate=192, tie=True), seed=1)
    print(f"student: {sum(p.numel() for p in student.parameters()) / 1e6:.2f}M parameters", flush=True)
    train(student, pairs, tokenizer.pad_token_id, args.student_steps, args.batch_size, 3e-3, seed=11, label="student",
          schedule_steps=args.student_schedule_steps)
    student_acc, _ = accuracy(student, tokenizer, chat, eval_problems)
    print(f"student held-out accuracy: {student_acc:.1%}", flush=True)

    train_problems = make_problems(DATA_SEED, args.train_prompts, exclude=held_out)
    _, teacher_texts = accuracy(teacher, tokenizer, chat, train_problems)
    data_dir = os.path.join(args.out, "data")
    os.makedirs(data_dir, exist_ok=True)
    write_jsonl(os.path.join(data_dir, "train.jsonl"), [
        {"prompt": p.prompt, "response": text, "answer": str(p.answer)}
        for p, text in zip(train_problems, teacher_texts)])
    write_jsonl(os.path.join(data_dir, "eval.jsonl"), [
        {"prompt": p.prompt, "response": p.solution, "answer": str(p.answer)} for p in eval_problems])
    save(teacher, tokenizer, os.path.join(args.out, "teacher"))
    save(student, tokenizer, os.path.join(args.out, "student"))
    print(f"teacher {teacher_acc:.1%} vs student {student_acc:.1%} on {len(eval_problems)} held-out problems; "
          f"teacher responses correct on {score(teacher_texts, [p.answer for p in train_problems]):.1%} of "
          f"{len(train_problems)} training prompts; built in {time.time() - begin:.0f}s", flush=True)


if __name__ == "__main__":
    main()
