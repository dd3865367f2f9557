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


def build(spec: str) -> RewardFn:
    """``gsm8k``, ``format``, or ``starts_with:<token id>`` (a toy reward for learning tests)."""
    if spec == "gsm8k":
        return correctness
    if spec == "format":
        return format_reward
    name, _, arg = spec.partition(":")
    if name == "starts_with" and arg.isdigit():
        return starts_with(int(arg))
    raise ValueError(f"unknown reward {spec!r}; expected gsm8k, format or starts_with:<id>")
