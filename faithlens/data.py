"""The data sets jobs, audits and evaluations name: GSM8K's splits, read from the shared data folder (never
copied into the repo), and the synthetic arithmetic tasks' splits (faithlens/arith.py), generated.

A data set's name is ``gsm8k-train`` or ``gsm8k-dev``, or ``<task>/train`` or ``<task>/heldout`` for a
task such as ``arith-add:1-50`` (``arith-add:1-50/heldout``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from faithlens.arith import SPLITS as TASK_SPLITS
from faithlens.arith import parse_task, task_splits
from faithlens.settings import get_core_settings

SPLITS = ("train", "dev")
# The GSM8K data sets by name, each a split read from FAITHLENS_DATA_DIR.
DATASETS = {"gsm8k-dev": "dev", "gsm8k-train": "train"}
DATASET_NAME_MAX = 64


@dataclass(frozen=True)
class Problem:
    question: str
    answer: str


def gsm8k_location(split: str, data_dir: Path | None = None) -> Path:
    """Where GSM8K's ``split`` is looked for (``<data_dir>/gsm8k/<split>.jsonl``), there or not."""
    if split not in SPLITS:
        raise ValueError(f"unknown GSM8K split {split!r}; expected one of {SPLITS}")
    return Path(data_dir or get_core_settings().data_dir) / "gsm8k" / f"{split}.jsonl"


def gsm8k_path(split: str, data_dir: Path | None = None) -> Path:
    path = gsm8k_location(split, data_dir)
    if not path.is_file():
        raise FileNotFoundError(f"GSM8K {split} not found at {path}; set FAITHLENS_DATA_DIR")
    return path


class UnknownDataset(ValueError):
    """A name that is neither a GSM8K split nor a task's split; the message lists what is known."""


def check_dataset(name: str) -> str:
    """``name`` if it names a data set; :class:`UnknownDataset` saying why not otherwise."""
    if name in DATASETS:
        return name
    task, slash, split = name.rpartition("/")
    if len(name) > DATASET_NAME_MAX or not slash or split not in TASK_SPLITS:
        raise UnknownDataset(
            f"no data set {name[:100]!r}; known: {', '.join(DATASETS)}, or <task>/train and "
            "<task>/heldout for a task such as arith-add:1-50 (GET /v1/capabilities lists the families)"
        )
    try:
        parse_task(task)
    except ValueError as exc:
        raise UnknownDataset(str(exc)) from None
    return name


def dataset_unavailable(name: str, data_dir: Path | None = None) -> str | None:
    """None when the data set ``name`` can be read here; otherwise why not: where its file was looked for
    and which variable to set. Checked where a job or an audit is created, so that a missing file is
    refused up front rather than failing on a worker later. Any other name (a task's split, generated, so
    always available) is None: ``check_dataset`` says whether it names a data set."""
    if name not in DATASETS:
        return None
    split = DATASETS[name]
    path = gsm8k_location(split, data_dir)
    if path.is_file():
        return None
    return (
        f"data set {name} is not available on this server: no file at {path}. Set FAITHLENS_DATA_DIR "
        f"(for the server and the workers) to the folder that holds gsm8k/{split}.jsonl"
    )


def load_dataset(name: str, limit: int | None = None, data_dir: Path | None = None) -> list[Problem]:
    """The problems of the data set ``name``, its first ``limit`` of them."""
    if name in DATASETS:
        return load_gsm8k(DATASETS[name], limit=limit, data_dir=data_dir)
    check_dataset(name)
    task, _, split = name.rpartition("/")
    rows = task_splits(task)[split][:limit]
    return [Problem(p.question, p.answer) for p in rows]


def datasets_available(data_dir: Path | None = None) -> dict[str, bool]:
    """Whether each data set of DATASETS can be read here, by name (``/readyz`` reports it)."""
    return {name: dataset_unavailable(name, data_dir) is None for name in DATASETS}


def load_gsm8k(split: str, limit: int | None = None, data_dir: Path | None = None) -> list[Problem]:
    return load_problems(gsm8k_path(split, data_dir), limit=limit)


def load_problems(path: Path, offset: int = 0, limit: int | None = None) -> list[Problem]:
    """``{question, answer}`` rows of a JSON-lines file (the GSM8K format), from row ``offset`` on
    (blank lines are not rows), at most ``limit`` of them."""
    if offset < 0 or (limit is not None and limit < 0):
        raise ValueError("offset and limit must not be negative")
    problems: list[Problem] = []
    with Path(path).open() as fh:
        rows = (line for line in fh if line.strip())
        for number, line in enumerate(rows):
            if limit is not None and len(problems) >= limit:
                break
            if number < offset:
                continue
            row = json.loads(line)
            try:
                problems.append(Problem(str(row["question"]), str(row["answer"])))
            except (KeyError, TypeError) as exc:
                raise ValueError(f"{path}: row {number} is not a {{question, answer}} object") from exc
    return problems
