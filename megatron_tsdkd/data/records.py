"""JSONL training records in three formats, parsed into one shape, with errors that name ``file:line``.

Accepted lines (one JSON object each):
- chat:          ``{"messages": [{"role": ..., "content": ...}, ...]}``; the last message, if it is the assistant's,
                 is the response, everything before it is the prompt;
- prompt pairs:  ``{"prompt": str, "response": str}``;
- UltraInteract: ``{"instruction": str, "response": str}``.
Any line may carry ``"answer"`` (a reference final answer, used by evaluation). In ``on_policy`` mode the response is
optional and ignored (the student writes its own); in ``off_policy`` mode it is required and must be non-empty.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterator, Literal, Optional

Mode = Literal["off_policy", "on_policy"]
MODES = ("off_policy", "on_policy")
ROLES = ("system", "user", "assistant", "tool")


class DataFormatError(ValueError):
    """A malformed training line; the message starts with ``file:line:``."""


@dataclass(frozen=True)
class ChatRecord:
    prompt_messages: tuple[dict, ...]       # [{"role", "content"}], never ending with the assistant's response
    response: Optional[str]                 # None in on_policy mode
    answer: Optional[str]                   # reference final answer, if the line has one
    source: str                             # "file:line", for later error messages


def _need_str(obj: dict, key: str, where: str, allow_empty: bool = False) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise DataFormatError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataFormatError(f"{where}: {key!r} is empty")
    return value


def _parse_messages(obj: dict, where: str, mode: Mode) -> tuple[tuple[dict, ...], Optional[str]]:
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataFormatError(f"{where}: 'messages' must be a non-empty list")
    clean = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataFormatError(f"{where}: messages[{i}] must be an object with 'role' and 'content'")
        if message["role"] not in ROLES:
            raise DataFormatError(f"{where}: messages[{i}] has unknown role {message['role']!r}; use one of {ROLES}")
        if not isinstance(message["content"], str):
            raise DataFormatError(f"{where}: messages[{i}].content must be a string, "
                                  f"got {type(message['content']).__name__}")
        clean.append({"role": message["role"], "content": message["content"]})
    response = None
    if clean[-1]["role"] == "assistant":
        response = clean.pop()["content"]
        if mode == "off_policy" and not response.strip():
            raise DataFormatError(f"{where}: the last assistant message (the response) is empty")
    elif mode == "off_policy":
        raise DataFormatError(f"{where}: the last message must be the assistant's response in off_policy mode, "
                              f"got role {clean[-1]['role']!r}")
    if not clean or all(m["role"] == "system" for m in clean):
        raise DataFormatError(f"{where}: no prompt before the response (need a user message)")
    return tuple(clean), response


def parse_record(obj, where: str, mode: Mode) -> ChatRecord:
    """One decoded JSON value -> ``ChatRecord``; ``where`` is ``file:line`` for the error message."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not isinstance(obj, dict):
        raise DataFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        prompt_messages, response = _parse_messages(obj, where, mode)
    else:
        prompt_key = "prompt" if "prompt" in obj else "instruction" if "instruction" in obj else None
        if prompt_key is None:
            raise DataFormatError(f"{where}: expected key 'messages', 'prompt' or 'instruction'; "
                                  f"got keys {sorted(obj)}")
        prompt_messages = ({"role": "user", "content": _need_str(obj, prompt_key, where)},)
        if "response" in obj:
            response = _need_str(obj, "response", where, allow_empty=(mode == "on_policy"))
        elif mode == "off_policy":
            raise DataFormatError(f"{where}: missing key 'response' (required in off_policy mode)")
        else:
            response = None
    answer = obj.get("answer")
    if answer is not None:
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            raise DataFormatError(f"{where}: 'answer' must be a string or a number, got {type(answer).__name__}")
        answer = str(answer)
    return ChatRecord(prompt_messages, response if mode == "off_policy" else None, answer, where)


def json_lines(path: str) -> Iterator[tuple[object, str]]:
    """(parsed object, "path:line") per non-blank line; invalid JSON stops with ``path:line: reason``."""
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                yield json.loads(line), where
            except json.JSONDecodeError as err:
                raise DataFormatError(f"{where}: invalid JSON ({err.msg} at column {err.colno})") from None


def read_jsonl(path: str, mode: Mode = "off_policy") -> Iterator[ChatRecord]:
    """Yield one ``ChatRecord`` per non-blank line; stop at the first malformed line with ``path:line: reason``."""
    for obj, where in json_lines(path):
        yield parse_record(obj, where, mode)
