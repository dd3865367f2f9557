"""GSM8K from the shared data folder (never copied into the repo)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from faithlens.settings import get_core_settings

SPLITS = ("train", "dev")


@dataclass(frozen=True)
class Problem:
    question: str
    answer: str


def gsm8k_path(split: str, data_dir: Path | None = None) -> Path:
    if split not in SPLITS:
        raise ValueError(f"unknown GSM8K split {split!r}; expected one of {SPLITS}")
    root = data_dir or get_core_settings().data_dir
    path = Path(root) / "gsm8k" / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"GSM8K {split} not found at {path}; set FAITHLENS_DATA_DIR")
    return path


def load_gsm8k(split: str, limit: int | None = None, data_dir: Path | None = None) -> list[Problem]:
    problems: list[Problem] = []
    with gsm8k_path(split, data_dir).open() as fh:
        for line in fh:
            if line.strip():
                row = json.loads(line)
                problems.append(Problem(row["question"], row["answer"]))
            if limit is not None and len(problems) >= limit:
                break
    return problems
