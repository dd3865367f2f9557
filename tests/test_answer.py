"""Answer span (spec §9) and the GSM8K exact-match check."""

from __future__ import annotations

import pytest

from faithlens.answer import char_span_to_tokens, find_answer_span, gsm8k_correct, parse_number
from faithlens.data import load_gsm8k


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so 3+4 = 7\n#### 7", "7"),
        ("#### 5 then #### 1,000 ", "1,000"),
        ("We get \\boxed{42} and later \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
        ("#### 9 beats \\boxed{3}", "9 beats \\boxed{3}"),  # #### wins, and takes the rest
        ("The answer is 18.\nThanks", "18"),
        ("the answer is $1,234.50. Then the answer is 12 dollars", "12 dollars"),
        ("She has 3 apples and 4 pears, 7 in all", "7"),
        ("no digits here", None),
    ],
)
def test_find_answer_span(text, expected):
    span = find_answer_span(text)
    assert (span.text if span else None) == expected
    if span:
        assert text[span.start : span.end] == span.text


def test_gsm8k_correct():
    assert gsm8k_correct("... so she makes $1,080.", "blah #### 1080")
    assert gsm8k_correct("The answer is 18 dollars.", "#### 18")
    assert not gsm8k_correct("The answer is 17.", "#### 18")
    assert not gsm8k_correct("I do not know", "#### 18")
    assert parse_number("-3.5 and $2,000") == -3.5
    assert parse_number("$2,000 total") == 2000.0
    assert gsm8k_correct("#### 9 beats \\boxed{3}", "#### 9")


def test_gsm8k_references_parse():
    problems = load_gsm8k("dev")
    assert len(problems) == 300
    assert all(gsm8k_correct(f"#### {p.answer.rsplit('####', 1)[-1]}", p.answer) for p in problems)


def test_char_span_to_tokens():
    texts = ["The", " answer", " is", " 1", "8", "."]
    span = find_answer_span("".join(texts))
    assert span.text == "18"
    assert char_span_to_tokens(texts, span) == (3, 5)
