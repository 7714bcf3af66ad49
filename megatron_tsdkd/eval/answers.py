"""Final-answer extraction and exact-match scoring for the demo task and GSM8K-style outputs.

Recognised answer forms, most explicit first (the last occurrence of a form wins, as models restate and correct):
``\\boxed{N}``, ``#### N``, ``The answer is N`` (also "the final answer is"). Numbers compare by value after removing
thousands separators, ``$`` and a trailing period, so ``1,234.0`` matches ``1234``.
"""
from __future__ import annotations

import re
from fractions import Fraction
from typing import Optional, Sequence, Union

_HASHES = re.compile(r"####[ \t]*")
_ANSWER_IS = re.compile(r"answer\s+is\s*:?[ \t]*", re.IGNORECASE)
_NUMBER = re.compile(r"^-?\d+(?:\.\d+)?(?:/\d+)?$")
_LEADING_NUMBER = re.compile(r"^\$?\s*(-?[\d,]*\.?\d+(?:/\d+)?)")


def _last_boxed(text: str) -> Optional[str]:
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for i in range(begin, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            if depth == 0:
                return text[begin:i]
            depth -= 1
    return None


def _clip_to_number(candidate: str) -> str:
    """``17. Done`` -> ``17``; a non-numeric candidate is kept (minus trailing punctuation)."""
    match = _LEADING_NUMBER.match(candidate.strip())
    return match.group(1) if match else candidate.strip().rstrip(".")


def extract_answer(text: str) -> Optional[str]:
    """The final answer in ``text``, or None if it states none in a recognised form."""
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    for pattern in (_HASHES, _ANSWER_IS):
        matches = list(pattern.finditer(text))
        if matches:
            rest = text[matches[-1].end():].split("\n", 1)[0]
            return _clip_to_number(rest) if rest.strip() else None
    return None


def normalize_answer(answer: Union[str, int, float]) -> str:
    """Canonical text of an answer: numbers by value (``"1,234.50"`` -> ``"2469/2"``), other text stripped, lower-case."""
    text = str(answer).strip().replace("$", "").replace(",", "").rstrip(".").strip()
    if _NUMBER.match(text):
        return str(Fraction(text))
    return text.lower()


def is_correct(prediction: str, reference: Union[str, int, float]) -> bool:
    """Does ``prediction`` state ``reference``? Either may be a full text (its final answer is extracted) or a bare
    answer (compared whole), so ``is_correct("... The answer is 17.", 17)`` and ``is_correct("17", "#### 17")`` hold,
    while a text that never states its answer (``"9+8=17."``) does not match."""
    predicted = extract_answer(prediction)
    gold = extract_answer(reference) if isinstance(reference, str) else None
    return normalize_answer(prediction if predicted is None else predicted) == \
        normalize_answer(reference if gold is None else gold)


def score(predictions: Sequence[str], references: Sequence[Union[str, int, float]]) -> float:
    """Accuracy of generated texts against reference answers (exact match of the extracted final answer)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("cannot score an empty list of predictions")
    return sum(is_correct(p, r) for p, r in zip(predictions, references)) / len(predictions)


# ---------------------------------------------------------------------------------------------- named extractors
_ANSWER_COLON = re.compile(r"answer\s*:[ \t]*", re.IGNORECASE)
_ANY_NUMBER = re.compile(r"-?[\d,]*\.?\d+(?:/\d+)?")


def _after_last(pattern, text: str) -> Optional[str]:
    matches = list(pattern.finditer(text))
    if not matches:
        return None
    rest = text[matches[-1].end():].split("\n", 1)[0]
    return _clip_to_number(rest) if rest.strip() else None


def _final_number(text: str) -> Optional[str]:
    numbers = _ANY_NUMBER.findall(text)
    return numbers[-1].rstrip(".") if numbers else None


# ``--answer-pattern NAME``: "default" is extract_answer's three forms; "answer-colon" reads ``Answer: N``;
# "final-number" takes the last number in the text (a fallback for terse models).
EXTRACTORS = {
    "default": extract_answer,
    "answer-colon": lambda text: _after_last(_ANSWER_COLON, text),
    "final-number": _final_number,
}


def make_extractor(pattern: Optional[str]):
    """``None`` or a name from EXTRACTORS, or a regular expression whose first group (else whole match) is the
    answer (the last match wins). ValueError names a bad pattern."""
    if pattern is None:
        return extract_answer
    if pattern in EXTRACTORS:
        return EXTRACTORS[pattern]
    try:
        compiled = re.compile(pattern)
    except re.error as error:
        raise ValueError(f"--answer-pattern {pattern!r} is neither an extractor ({', '.join(EXTRACTORS)}) nor a "
                         f"regular expression: {error}") from None

    def extract(text: str) -> Optional[str]:
        matches = list(compiled.finditer(text))
        if not matches:
            return None
        found = matches[-1].group(1) if compiled.groups else matches[-1].group(0)
        return found.strip() if found is not None else None
    return extract
