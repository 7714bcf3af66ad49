"""Rationale steps, and which step each student response token belongs to.

A step ends at a '.' followed by whitespace or the end of the text (METHOD.md KPOD 3), so "2.5", "$3.50" and
"1,000.25" never split (the '.' there is followed by a digit). The last step of a response is the answer
("The answer is y."): weight 1 always, never given as input. Tokens outside the response text (the chat
template's end-of-turn) count as answer tokens.

    token_steps[j] = k   for response token j whose first character lies in step k (0-based)
    token_steps[j] = -1  for tokens of the answer step and tokens outside the text
"""
from __future__ import annotations

import re

ANSWER = -1
_STEP_END = re.compile(r"\.(?=\s|$)")


def split_steps(text: str) -> list[tuple[int, int]]:
    """Character spans [start, end) of the steps of ``text``; they tile the text (whitespace after a '.' opens
    the next step), so every character, hence every token, has one step."""
    spans, start = [], 0
    for match in _STEP_END.finditer(text):
        end = match.end()
        if text[start:end].strip():
            spans.append((start, end))
            start = end
    if text[start:].strip():
        spans.append((start, len(text)))
    elif spans:
        spans[-1] = (spans[-1][0], len(text))
    return spans


def step_texts(text: str) -> list[str]:
    return [text[a:b].strip() for a, b in split_steps(text)]


def _char_offsets(tokenizer, text: str, ids: list[int]) -> list[int]:
    """Start character of each token of ``ids`` (the tokenisation of ``text``), by incremental decoding, which
    works for every tokenizer (fast or not) and checks the ids decode back to ``text``."""
    starts, previous = [], 0
    for j in range(len(ids)):
        starts.append(previous)
        previous = len(tokenizer.decode(ids[:j + 1], skip_special_tokens=False))
    return starts


def token_steps(chat, prompt_messages, response: str, response_ids: list[int]) -> tuple[list[int], int]:
    """(token_steps for ``response_ids`` as built by ``chat.response_ids``, number of rationale steps).

    The rendered assistant turn is tokenised exactly as data/chat_tokenization.py does, so the spans are over the
    very ids the student trains on."""
    prompt_text = chat._render(prompt_messages, add_generation_prompt=True)
    full_text = chat._render(list(prompt_messages) + [{"role": "assistant", "content": response}],
                             add_generation_prompt=False)
    turn = full_text[len(prompt_text):]
    base = turn.find(response)
    if base < 0:
        raise ValueError("the chat template changes the response text; cannot align steps with tokens")
    spans = split_steps(response)
    rationale = spans[:-1]                                   # the last step is the answer
    starts = _char_offsets(chat.tokenizer, turn, response_ids)
    out = []
    for start in starts:
        local = start - base
        step = next((k for k, (a, b) in enumerate(rationale) if a <= local < b), ANSWER)
        out.append(step)
    return out, len(rationale)
