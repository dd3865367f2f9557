"""Synthetic arithmetic tasks (spec §12): problems a small model can learn, with a difficulty in the name.

A task's name is ``<family>:<lo>-<hi>`` with an optional ``@<seed>`` (default 0), for example
``arith-add:1-15``, ``arith-add:1-50@3`` or ``arith-two-step:1-20``. Every problem of the task's space
(each operand in ``[lo, hi]``) is enumerated, shuffled by a generator seeded with the canonical name, and
split: the first quarter (at most :data:`MAX_HELD_OUT`) is held out, the rest is for training. So both
splits are the same on every machine and Python version, and they never share a problem.

Answers are in GSM8K's form (the working, then ``#### <number>``), so the ``gsm8k`` reward and the §9
answer rule score them unchanged.
"""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache

from faithlens.registry import Registry

MAX_HELD_OUT = 1000
MAX_SPACE = 250_000  # problems enumerated per task: bounds the memory and time a name can cost
MIN_SPACE = 8  # enough for a held-out quarter of at least one problem
SPLITS = ("train", "heldout")
NAME = re.compile(r"(?P<family>[a-z][a-z0-9-]*):(?P<lo>\d{1,4})-(?P<hi>\d{1,4})(?:@(?P<seed>\d{1,9}))?")


@dataclass(frozen=True)
class ArithProblem:
    question: str
    answer: str


@dataclass(frozen=True)
class ArithFamily:
    """One kind of problem: how many operands it draws and how it words one."""

    name: str
    description: str
    operands: int
    make: Callable[[tuple[int, ...]], ArithProblem | None]  # None: the operands make no problem
    example: str


ARITH_FAMILIES: Registry[ArithFamily] = Registry("arithmetic task family")


def _add(ops: tuple[int, ...]) -> ArithProblem:
    a, b = ops
    return ArithProblem(f"What is {a} + {b}?", f"{a} + {b} = {a + b}\n#### {a + b}")


def _mul(ops: tuple[int, ...]) -> ArithProblem:
    a, b = ops
    return ArithProblem(f"What is {a} * {b}?", f"{a} * {b} = {a * b}\n#### {a * b}")


def _two_step(ops: tuple[int, ...]) -> ArithProblem | None:
    a, b, c = ops
    if c > a + b:  # answers stay non-negative
        return None
    s, t = a + b, a + b - c
    return ArithProblem(f"What is {a} + {b} - {c}?", f"{a} + {b} = {s}\n{s} - {c} = {t}\n#### {t}")


for _family in (
    ArithFamily("arith-add", "What is a + b?", 2, _add, "arith-add:1-15"),
    ArithFamily("arith-mul", "What is a * b?", 2, _mul, "arith-mul:2-12"),
    ArithFamily("arith-two-step", "What is a + b - c? (c ≤ a + b)", 3, _two_step, "arith-two-step:1-20"),
):
    ARITH_FAMILIES.register(_family)


@dataclass(frozen=True)
class ArithTask:
    family: ArithFamily
    lo: int
    hi: int
    seed: int

    @property
    def name(self) -> str:
        return f"{self.family.name}:{self.lo}-{self.hi}" + (f"@{self.seed}" if self.seed else "")


def parse_task(name: str) -> ArithTask:
    """The task a name describes; ValueError saying what is wrong otherwise."""
    match = NAME.fullmatch(name)
    if match is None:
        raise ValueError(f"{name[:100]!r} is not a task name <family>:<lo>-<hi>[@<seed>]")
    if match["family"] not in ARITH_FAMILIES:
        raise ValueError(f"no task family {match['family']!r}; known: {', '.join(ARITH_FAMILIES.names())}")
    family = ARITH_FAMILIES.get(match["family"])
    lo, hi = int(match["lo"]), int(match["hi"])
    if not 0 <= lo <= hi:
        raise ValueError(f"{name!r}: the range {lo}-{hi} is empty")
    space = (hi - lo + 1) ** family.operands
    if not MIN_SPACE <= space <= MAX_SPACE:
        raise ValueError(f"{name!r} spans {space} operand tuples; from {MIN_SPACE} to {MAX_SPACE}")
    return ArithTask(family, lo, hi, int(match["seed"] or 0))


def _space(task: ArithTask) -> Iterator[ArithProblem]:
    values = range(task.lo, task.hi + 1)
    for ops in itertools.product(values, repeat=task.family.operands):
        problem = task.family.make(ops)
        if problem is not None:
            yield problem


@lru_cache(maxsize=16)
def task_splits(name: str) -> dict[str, tuple[ArithProblem, ...]]:
    """``{"train": ..., "heldout": ...}`` for the task ``name``: disjoint, and fixed by the name."""
    task = parse_task(name)
    problems = list(_space(task))
    random.Random(task.name).shuffle(problems)  # a str seed is hashed with SHA-512: stable everywhere
    held = min(MAX_HELD_OUT, len(problems) // 4)
    if held == 0:
        raise ValueError(f"{name!r} has {len(problems)} problems; too few to hold any out")
    return {"heldout": problems[:held], "train": problems[held:]}
