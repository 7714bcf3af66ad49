"""Chat records -> prompt ids and response ids through the tokenizer's own chat template.

The prompt is rendered with the generation prompt (``add_generation_prompt=True``): exactly what the student sees before
it writes on-policy. The response is the rest of the rendering of prompt + assistant turn, cut right after the
end-of-turn token (by default the tokenizer's EOS, e.g. ``<|im_end|>`` for Qwen2.5-Instruct), so the end-of-turn token is
the response's last token and a training target: the student learns when to stop. Whatever the template adds after it
(a newline) is not part of the response.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

from .records import ChatRecord


@dataclass
class TokenizedExample:
    prompt_ids: list[int]
    response_ids: list[int]                 # empty for on_policy examples
    answer: Optional[str] = None
    source: str = ""

    @property
    def input_ids(self) -> list[int]:
        return self.prompt_ids + self.response_ids


class ChatTemplateTokenizer:
    """Wraps a transformers tokenizer that has a chat template; raises early if it has none or lacks the tokens."""

    def __init__(self, tokenizer, end_of_turn_token: Optional[str] = None):
        name = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"tokenizer {name!r} has no chat template; use an instruct tokenizer or set one")
        self.tokenizer = tokenizer
        self.end_of_turn_token = end_of_turn_token or tokenizer.eos_token
        if self.end_of_turn_token is None:
            raise ValueError(f"tokenizer {name!r} has no EOS token; pass end_of_turn_token")
        self.end_of_turn_id = tokenizer.convert_tokens_to_ids(self.end_of_turn_token)
        if self.end_of_turn_id is None or self.end_of_turn_id == tokenizer.unk_token_id:
            raise ValueError(f"end-of-turn token {self.end_of_turn_token!r} is not in the vocabulary of {name!r}")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def _render(self, messages: Sequence[dict], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(list(messages), tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt_ids(self, messages: Sequence[dict]) -> list[int]:
        return self._encode(self._render(messages, add_generation_prompt=True))

    def _response_text(self, prompt_text: str, messages: Sequence[dict], response: str) -> str:
        full_text = self._render(list(messages) + [{"role": "assistant", "content": response}],
                                 add_generation_prompt=False)
        if not full_text.startswith(prompt_text):
            raise ValueError("the chat template renders the prompt differently with and without the assistant turn; "
                             "cannot split prompt from response")
        response_text = full_text[len(prompt_text):]
        end = response_text.rfind(self.end_of_turn_token)
        if end >= 0:
            response_text = response_text[:end + len(self.end_of_turn_token)]
        return response_text

    def _end_turn(self, ids: list[int]) -> list[int]:
        if not ids or ids[-1] != self.end_of_turn_id:
            ids.append(self.end_of_turn_id)
        return ids

    def response_ids(self, messages: Sequence[dict], response: str) -> list[int]:
        """Token ids of the assistant turn after the generation prompt, ending with the end-of-turn token."""
        prompt_text = self._render(messages, add_generation_prompt=True)
        return self._end_turn(self._encode(self._response_text(prompt_text, messages, response)))

    def encode_record(self, record: ChatRecord) -> TokenizedExample:
        prompt = self.prompt_ids(record.prompt_messages)
        response = [] if record.response is None else self.response_ids(record.prompt_messages, record.response)
        return TokenizedExample(prompt, response, record.answer, record.source)

    def encode_records(self, records: Sequence[ChatRecord]) -> list[TokenizedExample]:
        """``encode_record`` of each, the same ids, with each prompt rendered once and one tokenizer call for all
        texts (a fast tokenizer encodes a batch on all cores): the bulk path of data/token_cache.py."""
        prompts = [self._render(r.prompt_messages, add_generation_prompt=True) for r in records]
        responses = [self._response_text(p, r.prompt_messages, r.response)
                     for p, r in zip(prompts, records) if r.response is not None]
        ids = self.tokenizer(prompts + responses, add_special_tokens=False)["input_ids"] if records else []
        out, next_response = [], len(prompts)
        for i, record in enumerate(records):
            response = []
            if record.response is not None:
                response, next_response = self._end_turn(list(ids[next_response])), next_response + 1
            out.append(TokenizedExample(list(ids[i]), response, record.answer, record.source))
        return out


@dataclass
class TruncationStats:
    """What tokenisation did to the data set, so nothing is lost silently."""
    read: int = 0
    kept: int = 0
    dropped_long_prompt: int = 0            # prompt alone longer than max_prompt_length: example dropped
    truncated_response: int = 0             # response cut to fit max_length (its end-of-turn token is lost)
    response_tokens_removed: int = 0
    dropped_sources: list[str] = field(default_factory=list)   # "file:line" of the first few drops

    def summary(self) -> str:
        return (f"{self.kept}/{self.read} examples kept; {self.dropped_long_prompt} dropped (prompt too long), "
                f"{self.truncated_response} responses truncated ({self.response_tokens_removed} tokens removed)")


def fit_to_length(example: TokenizedExample, max_length: int, max_prompt_length: int,
                  stats: TruncationStats) -> Optional[TokenizedExample]:
    """Keep the prompt whole and cut the response to ``max_length`` total tokens; None (counted) if the prompt is too long."""
    stats.read += 1
    prompt_limit = min(max_prompt_length, max_length - 1)
    if len(example.prompt_ids) > prompt_limit:
        stats.dropped_long_prompt += 1
        if len(stats.dropped_sources) < 10:
            stats.dropped_sources.append(example.source)
        return None
    room = max_length - len(example.prompt_ids)
    if len(example.response_ids) > room:
        stats.truncated_response += 1
        stats.response_tokens_removed += len(example.response_ids) - room
        example = TokenizedExample(example.prompt_ids, example.response_ids[:room], example.answer, example.source)
    stats.kept += 1
    return example
