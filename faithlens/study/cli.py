"""``python -m faithlens study rhythm``: the rhythm study over a JSON-lines file of problems, printed as
a table next to [PA]'s figures or as JSON."""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from faithlens.data import load_problems
from faithlens.model import LoadedModel
from faithlens.study.rhythm import (
    PA_FIGURES,
    ResponseRhythm,
    RhythmConfig,
    RhythmReport,
    pool_rhythm,
    study_problems,
)

log = logging.getLogger("faithlens.study")
_DEFAULTS = RhythmConfig()


def add_study_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``study rhythm`` and its flags (defaults from :class:`RhythmConfig`)."""
    p_study = sub.add_parser("study", help="studies over many problems (spec §11)")
    studies = p_study.add_subparsers(dest="study", required=True)
    p = studies.add_parser("rhythm", help="[PA]'s Tables 1–2 (statistics A, B, C) on the model")
    p.add_argument(
        "--input", required=True, type=Path, help="JSON lines of {question, answer} (GSM8K format)"
    )
    p.add_argument("--offset", type=int, default=0, help="skip this many rows (default: 0)")
    p.add_argument("--n", type=int, default=None, help="study this many rows (default: all)")
    p.add_argument(
        "--max-new-tokens", type=int, default=_DEFAULTS.max_new_tokens, help="response length bound"
    )
    p.add_argument("--temperature", type=float, default=_DEFAULTS.temperature, help="0 (default): greedy")
    p.add_argument("--seed", type=int, default=_DEFAULTS.seed, help="permutations, bootstrap, sampling")
    p.add_argument("--model", help="HF model directory or .gguf file (default: FAITHLENS_MODEL or SmolLM2)")
    p.add_argument("--json", action="store_true", help="print the study as JSON")
    return p


def run_study(args: argparse.Namespace, load: Callable[[], LoadedModel]) -> int:
    """Check the input, load the model (``load``), generate, study and pool; print the table or the JSON.
    Progress goes to the log (stderr). Bad flags and a bad input file fail before the model loads."""
    if args.offset < 0 or (args.n is not None and args.n < 1) or args.max_new_tokens < 1:
        raise SystemExit("error: --offset must be ≥ 0, --n and --max-new-tokens ≥ 1")
    config = RhythmConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
    try:
        config.sampling()  # the sampling parameters' own bounds
        problems = load_problems(args.input, args.offset, args.n)
    except ValidationError as exc:
        raise SystemExit(f"error: {exc}") from None
    except (OSError, ValueError) as exc:  # a missing file, a row that is not JSON or not a problem
        raise SystemExit(f"error: {exc}") from None
    if not problems:
        raise SystemExit(f"error: {args.input} has no rows after offset {args.offset}")
    lm = load()
    started = time.perf_counter()

    def progress(row: ResponseRhythm) -> None:
        log.info("problem studied", extra={"index": row.index, "tokens": row.tokens, "seconds": row.seconds})

    rows = study_problems(lm, enumerate(problems, start=args.offset), config, progress)
    report = pool_rhythm(rows, config)
    seconds = time.perf_counter() - started
    if args.json:
        print(json.dumps({**report.to_json(), "model": lm.name, "seconds": round(seconds, 2)}, indent=2))
    else:
        console = Console() if Console().is_terminal else Console(width=120)  # no clipped figures in a file
        render_rhythm(report, console, f"{lm.name}, {report.n} problems, {seconds:.0f} s")
    return 0


def _f(value: float | None, percent: bool = False) -> str:
    if value is None:
        return "—"
    return f"{100 * value:+.1f}%" if percent else f"{value:.4f}"


def _ci(bounds: list[float | None], percent: bool = False) -> str:
    return f"[{_f(bounds[0], percent)}, {_f(bounds[1], percent)}]"


def render_rhythm(report: RhythmReport, console: Console, title: str) -> None:
    """A and B (observed, baseline, lift), C (the two Jaccard means, the share), each with its 95%
    interval and [PA]'s figure; then B's sensitivity grid."""
    table = Table(title=f"Rhythm study: {title}")
    for column in ("statistic", "figure", "ours", "95% interval", "[PA]"):
        table.add_column(column, justify="left" if column in {"statistic", "figure"} else "right")
    names = {"A": "A: entropy at WAAD peaks", "B": "B: FAI peak follows a WAAD peak"}
    for stat in ("A", "B"):
        figures: dict[str, Any] = getattr(report, stat)
        for name in ("observed", "baseline", "lift"):
            lift = name == "lift"
            table.add_row(
                names[stat] if name == "observed" else "",
                name,
                _f(figures[name], lift),
                _ci(figures["ci95"][name], lift),
                _f(PA_FIGURES[stat][name], lift),
            )
    c = report.C
    for i, name in enumerate(("jaccard_high", "jaccard_low", "share_high_diverges_more")):
        table.add_row(
            f"C: perturbation ({c['trials']} trials)" if i == 0 else "",
            name,
            _f(c[name]),
            _ci(c["ci95"][name]),
            _f(PA_FIGURES["C"][name]),
        )
    console.print(table)
    grid = Table(title="B's sensitivity grid (observed / shuffled baseline / lift)")
    for column in ("q_peak", "k", "observed", "baseline", "lift"):
        grid.add_column(column, justify="right")
    for row in report.B_grid:
        grid.add_row(
            str(row["q_peak"]), str(row["k"]), _f(row["observed"]), _f(row["baseline"]), _f(row["lift"], True)
        )
    console.print(grid)
