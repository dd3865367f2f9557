"""Rewards: GSM8K exact match on the §9 answer, a format reward, AtManRL's outcome term, and toy rewards
for tests. A reward maps (completion text, completion ids, reference answer) to a float."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from faithlens.answer import find_answer_span, gsm8k_correct

RewardFn = Callable[["Sample"], float]


@dataclass
class Sample:
    prompt_ids: list[int]
    completion_ids: list[int]
    text: str
    reference: str  # the dataset's answer (GSM8K: "... #### 42")


def correctness(sample: Sample) -> float:
    """1 when the §9 answer's number equals the reference after ####, else 0."""
    return 1.0 if gsm8k_correct(sample.text, sample.reference) else 0.0


def format_reward(sample: Sample) -> float:
    """1 when the response ends with an explicit `#### <answer>` line, the format GSM8K teaches."""
    span = find_answer_span(sample.text)
    return 1.0 if "####" in sample.text and span is not None else 0.0


def outcome_atmanrl(sample: Sample) -> float:
    """AtManRL's R_outcome: 0 if correct, else −1 (spec §8)."""
    return correctness(sample) - 1.0


def starts_with(token_id: int) -> RewardFn:
    """Toy: 1 when the first completion token is ``token_id``."""
    return lambda s: 1.0 if s.completion_ids[:1] == [token_id] else 0.0


# The reward names a job may give (``rewards``), with what each pays; ``starts_with:<id>`` is a toy for tests.
REWARDS = {
    "gsm8k": "1 when the answer's number equals the reference after ####, else 0.",
    "format": "1 when the response ends with a `#### <answer>` line, else 0.",
    "starts_with:<token id>": "1 when the first completion token is that id (a toy for learning tests).",
}
MAX_TOKEN_ID = 10**7  # starts_with's id: far beyond any vocabulary, short of a number that means nothing


def build(spec: str) -> RewardFn:
    """``gsm8k``, ``format``, or ``starts_with:<token id>`` (a toy reward for learning tests). An unknown
    name raises ValueError naming the known ones."""
    if spec == "gsm8k":
        return correctness
    if spec == "format":
        return format_reward
    name, _, arg = spec.partition(":")
    if name == "starts_with" and arg.isascii() and arg.isdigit() and int(arg) <= MAX_TOKEN_ID:
        return starts_with(int(arg))
    raise ValueError(f"unknown reward {spec!r}; expected one of {', '.join(REWARDS)}")


def check(spec: str) -> str:
    """``spec`` if :func:`build` knows it, else ValueError (for validating a config before a run)."""
    build(spec)
    return spec
