"""Finding the final answer in a response (spec §9) and the GSM8K exact-match check."""

from __future__ import annotations

import re
from dataclasses import dataclass

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?|-?\.\d+")


@dataclass(frozen=True)
class CharSpan:
    """A character span ``[start, end)`` of a response and its text."""

    start: int
    end: int
    text: str


def _strip(text: str, start: int, end: int) -> CharSpan | None:
    """Trim whitespace (and a final full stop) from ``text[start:end]``; None if nothing remains."""
    while start < end and text[start].isspace():
        start += 1
    while end > start and (text[end - 1].isspace() or text[end - 1] == "."):
        end -= 1
    return CharSpan(start, end, text[start:end]) if end > start else None


def _after_marker(text: str, marker: str, to_line_end: bool) -> CharSpan | None:
    at = text.rfind(marker)
    if at < 0:
        return None
    start = at + len(marker)
    end = len(text)
    if to_line_end:
        newline = text.find("\n", start)
        end = newline if newline >= 0 else end
    return _strip(text, start, end)


def _last_boxed(text: str) -> CharSpan | None:
    at = text.rfind("\\boxed{")
    if at < 0:
        return None
    start = at + len("\\boxed{")
    depth = 1
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return _strip(text, start, i)
    return None


def find_answer_span(text: str) -> CharSpan | None:
    """The answer: after the last ``####``, else the last ``\\boxed{}``, else after the last
    "answer is", else the last number (spec §9, in that order)."""
    for found in (
        lambda: _after_marker(text, "####", to_line_end=False),
        lambda: _last_boxed(text),
        lambda: _after_marker(text, "answer is", to_line_end=True),
    ):
        span = found()
        if span is not None:
            return span
    numbers = list(_NUMBER.finditer(text))
    if not numbers:
        return None
    last = numbers[-1]
    return CharSpan(last.start(), last.end(), last.group())


def parse_number(text: str) -> float | None:
    """The first number in an answer span (``12`` in "12 dollars"), with commas and ``$`` removed."""
    found = _NUMBER.search(text)
    if found is None:
        return None
    try:
        return float(found.group().replace(",", "").replace("$", ""))
    except ValueError:
        return None


def reference_answer(gsm8k_answer: str) -> float | None:
    """The number after ``####`` in a GSM8K ``answer`` field."""
    return parse_number(gsm8k_answer.rsplit("####", 1)[-1])


def gsm8k_correct(response: str, gsm8k_answer: str) -> bool:
    """Exact numeric match of the response's answer span with the reference (spec §9)."""
    span = find_answer_span(response)
    got = parse_number(span.text) if span else None
    want = reference_answer(gsm8k_answer)
    return got is not None and want is not None and got == want


def char_span_to_tokens(token_texts: list[str], span: CharSpan) -> tuple[int, int] | None:
    """Response-relative token range ``[first, last+1)`` covering a character span."""
    first = last = None
    offset = 0
    for i, piece in enumerate(token_texts):
        begin, offset = offset, offset + len(piece)
        if offset > span.start and begin < span.end:
            first = i if first is None else first
            last = i
    return None if first is None else (first, last + 1)
