"""Training records in three shapes, parsed into one, with errors that name ``file:row`` and the column.

Accepted rows (a JSON line, or a row of a parquet / Arrow / ``save_to_disk`` data set; data/sources.py reads them):
- chat:          ``{"messages": [{"role": ..., "content": ...}, ...]}``; the last message, if it is the assistant's,
                 is the response, everything before it is the prompt;
- prompt pairs:  ``{"prompt": str, "response": str}``;
- UltraInteract: ``{"instruction": str, "response": str}``.
Any row may carry ``"answer"`` (a reference final answer, used by evaluation). In ``on_policy`` mode the response is
optional and ignored (the student writes its own); in ``off_policy`` mode it is required and must be non-empty.
``Fields`` (config ``data.fields.*``) renames the columns, so a data set's own columns need no rewrite; a column that
holds None (parquet's missing value) counts as absent.
"""
from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from typing import Iterator, Literal, Optional

from megatron_tsdkd.checks import require

Mode = Literal["off_policy", "on_policy"]
MODES = ("off_policy", "on_policy")
ROLES = ("system", "user", "assistant", "tool")


class DataFormatError(ValueError):
    """A malformed training row; the message starts with ``file:row:`` (``file:`` for a file that cannot be read)."""


@dataclass(frozen=True)
class Fields:
    """Which column holds what (config ``data.fields``); the defaults read the three known shapes."""
    prompt: str = ""                    # "" = 'prompt', else 'instruction'
    response: str = "response"
    answer: str = "answer"
    messages: str = "messages"          # a chat: [{"role", "content"}, ...], the last assistant turn the response

    def __post_init__(self):
        for name in ("response", "answer", "messages"):
            require(bool(str(getattr(self, name)).strip()), name, getattr(self, name), "must name a column")
        named = [v for v in (self.prompt, self.response, self.answer, self.messages) if v]
        require(len(set(named)) == len(named), "prompt", named, "the columns must differ from each other")


DEFAULT_FIELDS = Fields()


@dataclass(frozen=True)
class ChatRecord:
    prompt_messages: tuple[dict, ...]       # [{"role", "content"}], never ending with the assistant's response
    response: Optional[str]                 # None in on_policy mode
    answer: Optional[str]                   # reference final answer, if the row has one
    source: str                             # "file:row", for later error messages


def _present(obj: dict, column: str) -> bool:
    return obj.get(column) is not None


def _need_str(obj: dict, column: str, where: str, role: str, allow_empty: bool = False) -> str:
    value = obj[column]
    if not isinstance(value, str):
        raise DataFormatError(f"{where}: column {column!r} (data.fields.{role}) must be a string, "
                              f"got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataFormatError(f"{where}: column {column!r} (data.fields.{role}) is empty")
    return value


def _parse_messages(obj: dict, column: str, where: str, mode: Mode) -> tuple[tuple[dict, ...], Optional[str]]:
    messages = obj[column]
    if not isinstance(messages, (list, tuple)) or not messages:
        raise DataFormatError(f"{where}: column {column!r} (data.fields.messages) must be a non-empty list")
    clean = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataFormatError(f"{where}: {column}[{i}] must be an object with 'role' and 'content'")
        if message["role"] not in ROLES:
            raise DataFormatError(f"{where}: {column}[{i}] has unknown role {message['role']!r}; use one of {ROLES}")
        if not isinstance(message["content"], str):
            raise DataFormatError(f"{where}: {column}[{i}].content must be a string, "
                                  f"got {type(message['content']).__name__}")
        clean.append({"role": message["role"], "content": message["content"]})
    response = None
    if clean[-1]["role"] == "assistant":
        response = clean.pop()["content"]
        if mode == "off_policy" and not response.strip():
            raise DataFormatError(f"{where}: the last assistant message of {column!r} (the response) is empty")
    elif mode == "off_policy":
        raise DataFormatError(f"{where}: the last message of {column!r} must be the assistant's response in "
                              f"off_policy mode, got role {clean[-1]['role']!r}")
    if not clean or all(m["role"] == "system" for m in clean):
        raise DataFormatError(f"{where}: no prompt before the response in {column!r} (need a user message)")
    return tuple(clean), response


def _prompt_column(obj: dict, fields: Fields, where: str) -> str:
    if fields.prompt:
        if not _present(obj, fields.prompt):
            raise DataFormatError(f"{where}: missing column {fields.prompt!r} (data.fields.prompt); "
                                  f"the row has columns {sorted(obj)}")
        return fields.prompt
    for column in ("prompt", "instruction"):
        if _present(obj, column):
            return column
    raise DataFormatError(f"{where}: expected column {fields.messages!r}, 'prompt' or 'instruction' (or map yours "
                          f"with data.fields.prompt / data.fields.messages); the row has columns {sorted(obj)}")


def parse_record(obj, where: str, mode: Mode, fields: Fields = DEFAULT_FIELDS) -> ChatRecord:
    """One row (a dict) -> ``ChatRecord``; ``where`` is ``file:row`` for the error message."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not isinstance(obj, dict):
        raise DataFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if _present(obj, fields.messages) and not (fields.prompt and _present(obj, fields.prompt)):
        prompt_messages, response = _parse_messages(obj, fields.messages, where, mode)
    else:
        prompt_column = _prompt_column(obj, fields, where)
        prompt_messages = ({"role": "user", "content": _need_str(obj, prompt_column, where, "prompt")},)
        if _present(obj, fields.response):
            response = _need_str(obj, fields.response, where, "response", allow_empty=(mode == "on_policy"))
        elif mode == "off_policy":
            raise DataFormatError(f"{where}: missing column {fields.response!r} (data.fields.response), required "
                                  f"in off_policy mode; the row has columns {sorted(obj)}")
        else:
            response = None
    answer = obj.get(fields.answer)
    if answer is not None:
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            raise DataFormatError(f"{where}: column {fields.answer!r} (data.fields.answer) must be a string or a "
                                  f"number, got {type(answer).__name__}")
        answer = str(answer)
    return ChatRecord(prompt_messages, response if mode == "off_policy" else None, answer, where)


def open_text(path: str):
    """A text handle on ``path``, gunzipped when it ends in ``.gz``."""
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def json_lines(path: str) -> Iterator[tuple[object, str]]:
    """(parsed object, "path:line") per non-blank line (``.gz`` read through gzip); invalid JSON stops with
    ``path:line: reason``, a file that cannot be read (a broken gzip stream) with ``path:line: cannot read ...``."""
    with open_text(path) as handle:
        number = 0
        while True:
            try:
                line = handle.readline()
            except (OSError, EOFError, UnicodeDecodeError) as err:
                raise DataFormatError(f"{path}:{number + 1}: cannot read the file ({err})") from None
            if not line:
                return
            number += 1
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataFormatError(f"{where}: invalid JSON ({err.msg} at column {err.colno})") from None
            yield obj, where


def read_jsonl(path: str, mode: Mode = "off_policy", fields: Fields = DEFAULT_FIELDS) -> Iterator[ChatRecord]:
    """Yield one ``ChatRecord`` per non-blank line; stop at the first malformed line with ``path:line: reason``."""
    for obj, where in json_lines(path):
        yield parse_record(obj, where, mode, fields)
