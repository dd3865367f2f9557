"""The credit study (spec §12): credit strategies arm against arm, run as fine-tuning jobs on a server's
workers, evaluated on held-out problems at fixed steps, and reported with paired bootstrap intervals.

A study lives in one folder, so that a grid longer than one sitting can be finished later and its results
committed:

* ``study.json``: the grid (task, arms, seeds, hyperparameters). A rerun must ask for the same grid.
* ``runs/<arm>-seed<k>.json``: a run that ended (succeeded or not), with its job id, step metrics and
  evaluations. Written once, when the job ends; a rerun skips it.
* ``runs/<arm>-seed<k>.job``: the id of a run's submitted job. A rerun follows that job instead of
  submitting another, so a study stopped mid-grid (or a worker killed under it) loses nothing.
* ``report.json`` and ``report.html``: rewritten from the run files at the end of every invocation.

Every arm has the same hyperparameters, data order and seeds; runs differ only by ``credit``.
"""

from __future__ import annotations

import hashlib
import html
import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from faithlens_client._client import Faithlens
from faithlens_client.errors import NotFoundError
from faithlens_client.render import asset
from faithlens_client.types import Job

STUDY_FILE = "study.json"
RESAMPLES = 1000
CONFIDENCE = 0.95
# The pilot of spec §12: a task SmolLM2-135M learns, at settings where it has room to.
DEFAULT_HYPERPARAMETERS: dict[str, Any] = {
    "temperature": 0.7,
    "learning_rate": 5e-4,
    "prompts_per_step": 2,
    "num_generations": 8,
    "max_new_tokens": 48,
}
SMOKE_HYPERPARAMETERS: dict[str, Any] = {
    "prompts_per_step": 1,
    "num_generations": 2,
    "max_new_tokens": 8,
    "eval_limit": 6,
}


@dataclass
class CreditGrid:
    """What a study runs: every arm × every seed, each a job of ``max_steps`` steps on ``task``'s training
    split, evaluated on its held-out split at step 0 and every ``eval_steps`` steps."""

    task: str
    arms: list[str]
    seeds: list[int]
    max_steps: int
    eval_steps: int
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    method: str = "grpo"

    def __post_init__(self) -> None:
        if "none" not in self.arms:
            raise ValueError("the arms must include `none`: every difference is taken against it")
        if len(set(self.arms)) != len(self.arms) or len(set(self.seeds)) != len(self.seeds):
            raise ValueError("arms and seeds must not repeat")
        if "credit" in self.hyperparameters:
            raise ValueError("`credit` is what the arms set; it cannot be a shared hyperparameter")

    @property
    def study_id(self) -> str:
        """A short hash of the grid: names the study's adapters and tags its jobs."""
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:10]

    def runs(self) -> list[tuple[str, int]]:
        return [(arm, seed) for seed in self.seeds for arm in self.arms]  # seed-major: arms finish together

    def method_for(self, arm: str) -> dict[str, Any]:
        return {
            "type": self.method,
            **self.hyperparameters,
            "credit": arm,
            "max_steps": self.max_steps,
            "eval_steps": self.eval_steps,
            "eval_on_start": True,
            "checkpoint_every": max(1, min(self.eval_steps, self.max_steps)),
        }


def run_key(arm: str, seed: int) -> str:
    return f"{arm}-seed{seed}"


@dataclass
class RunResult:
    """One ended run: its job, the metrics of every step, and its evaluations by step."""

    arm: str
    seed: int
    job_id: str
    status: str
    error: str | None
    steps: list[dict[str, Any]]
    evals: dict[str, dict[str, Any]]  # str(step) -> eval_accuracy, eval_problems, eval_correct, ...
    seconds: float | None


class StudyFolder:
    """The files of one study (see the module's docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.runs_dir = self.root / "runs"

    def open(self, grid: CreditGrid) -> None:
        """Create the folder for ``grid``, or check that it holds the same grid."""
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        path = self.root / STUDY_FILE
        wanted = asdict(grid)
        if path.exists():
            held = json.loads(path.read_text())
            if held != wanted:
                raise ValueError(
                    f"{path} holds another grid; use a new --out folder (held: {json.dumps(held)}, asked: "
                    f"{json.dumps(wanted)})"
                )
        else:
            _write(path, wanted)

    def grid(self) -> CreditGrid:
        return CreditGrid(**json.loads((self.root / STUDY_FILE).read_text()))

    def result(self, arm: str, seed: int) -> RunResult | None:
        path = self.runs_dir / f"{run_key(arm, seed)}.json"
        return RunResult(**json.loads(path.read_text())) if path.exists() else None

    def save_result(self, result: RunResult) -> None:
        _write(self.runs_dir / f"{run_key(result.arm, result.seed)}.json", asdict(result))
        (self.runs_dir / f"{run_key(result.arm, result.seed)}.job").unlink(missing_ok=True)

    def job_id(self, arm: str, seed: int) -> str | None:
        path = self.runs_dir / f"{run_key(arm, seed)}.job"
        return path.read_text().strip() if path.exists() else None

    def save_job_id(self, arm: str, seed: int, job_id: str) -> None:
        _write(self.runs_dir / f"{run_key(arm, seed)}.job", job_id, raw=True)

    def results(self) -> list[RunResult]:
        grid = self.grid()
        return [r for arm, seed in grid.runs() if (r := self.result(arm, seed)) is not None]


def _write(path: Path, data: Any, raw: bool = False) -> None:
    """Write whole or not at all: a study killed mid-write leaves the old file or none."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(data if raw else json.dumps(data, indent=1))
    tmp.replace(path)


def run_grid(
    client: Faithlens,
    folder: StudyFolder,
    grid: CreditGrid,
    poll_s: float = 2.0,
    log: Callable[[str], None] = print,
    retry_failed: bool = False,
) -> list[RunResult]:
    """Submit every run that has neither a result nor a job, then follow the jobs until all have ended,
    saving each run's result as its job ends. Returns every ended run of the grid. A run that ended
    without succeeding is kept as it ended (and reported) unless ``retry_failed``; a recorded job the
    server no longer knows is submitted again."""
    folder.open(grid)
    pending: dict[tuple[str, int], str] = {}
    for arm, seed in grid.runs():
        result = folder.result(arm, seed)
        if result is not None and (result.status == "succeeded" or not retry_failed):
            log(f"{run_key(arm, seed)}: done earlier, skipped")
            continue
        job_id = None if result is not None else folder.job_id(arm, seed)
        if job_id is not None and not _known(client, job_id):
            log(f"{run_key(arm, seed)}: the server no longer knows {job_id}; submitting again")
            job_id = None
        if job_id is None:
            job = client.jobs.create(
                method=grid.method_for(arm),
                training_data=f"{grid.task}/train",
                validation_data=f"{grid.task}/heldout",
                adapter_name=f"credit-{grid.study_id}-{arm}-s{seed}",
                seed=seed,
                metadata={"study": grid.study_id, "arm": arm, "seed": str(seed)},
            )
            job_id = job.id
            folder.save_job_id(arm, seed, job_id)
            log(f"{run_key(arm, seed)}: submitted {job_id}")
        else:
            log(f"{run_key(arm, seed)}: following {job_id}")
        pending[(arm, seed)] = job_id
    while pending:
        for (arm, seed), job_id in list(pending.items()):
            job = client.jobs.get(job_id)
            if not job.finished:
                continue
            result = collect(client, job, arm, seed)
            folder.save_result(result)
            del pending[(arm, seed)]
            last = result.evals.get(str(grid.max_steps), {}).get("eval_accuracy")
            log(
                f"{run_key(arm, seed)}: {job.status}"
                + (f", held-out accuracy {last:.3f}" if last is not None else "")
            )
        if pending:
            time.sleep(poll_s)
    return folder.results()


def _known(client: Faithlens, job_id: str) -> bool:
    try:
        client.jobs.get(job_id)
    except NotFoundError:
        return False
    return True


def collect(client: Faithlens, job: Job, arm: str, seed: int) -> RunResult:
    """An ended job's run: step metrics and evaluations from its events (the last event for a step wins,
    since a resumed job may repeat the steps after its last checkpoint)."""
    events, after = [], 0
    while batch := client.jobs.events(job.id, after=after):
        events += batch
        after += len(batch)
    steps: dict[int, dict[str, Any]] = {}
    evals: dict[str, dict[str, Any]] = {}
    for event in events:
        if event.type != "metrics" or not event.data or "step" not in event.data:
            continue
        if "eval_accuracy" in event.data:
            evals[str(event.data["step"])] = event.data
        else:
            steps[int(event.data["step"])] = event.data
    seconds = job.finished_at - job.started_at if job.finished_at and job.started_at else None
    return RunResult(
        arm=arm,
        seed=seed,
        job_id=job.id,
        status=job.status,
        error=job.error.message if job.error else None,
        steps=[steps[s] for s in sorted(steps)],
        evals=evals,
        seconds=seconds,
    )


# -- the statistics --------------------------------------------------------------------------------------
def paired_bootstrap(
    diffs: Sequence[Sequence[int]], seed: int = 0, resamples: int = RESAMPLES, confidence: float = CONFIDENCE
) -> tuple[float, float, float]:
    """``(mean, low, high)`` of paired per-problem differences ``diffs[seed_index][problem]`` (arm minus
    ``none``, each −1, 0 or 1): the mean over seeds and problems, and a percentile interval from
    resampling seeds and problems with replacement (the same problems for every drawn seed, so pairs stay
    paired). Seeded: the same inputs give the same interval."""
    n_seeds, n_problems = len(diffs), len(diffs[0])
    mean = sum(map(sum, diffs)) / (n_seeds * n_problems)
    rng = random.Random(seed)
    means = []
    for _ in range(resamples):
        seeds = [rng.randrange(n_seeds) for _ in range(n_seeds)]
        problems = [rng.randrange(n_problems) for _ in range(n_problems)]
        total = sum(diffs[s][i] for s in seeds for i in problems)
        means.append(total / (n_seeds * n_problems))
    means.sort()
    alpha = (1 - confidence) / 2
    return mean, _quantile(means, alpha), _quantile(means, 1 - alpha)


def _quantile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default)."""
    pos = q * (len(sorted_values) - 1)
    low = int(pos)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (pos - low)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def report(grid: CreditGrid, results: list[RunResult], seed: int = 0) -> dict[str, Any]:
    """The study's report: per arm and evaluated step, the mean held-out accuracy over seeds and, against
    ``none``, the paired difference with its 95% interval (seeds present in both arms only); per arm and
    training step, the mean reward, flagged share and γ. Runs that did not succeed are listed, not used."""
    ok = [r for r in results if r.status == "succeeded"]
    by_arm = {arm: {r.seed: r for r in ok if r.arm == arm} for arm in grid.arms}
    eval_steps = sorted({int(s) for r in ok for s in r.evals})
    accuracy: list[dict[str, Any]] = []
    for arm in grid.arms:
        for step in eval_steps:
            runs = [r.evals[str(step)] for r in by_arm[arm].values() if str(step) in r.evals]
            row: dict[str, Any] = {
                "arm": arm,
                "step": step,
                "seeds": len(runs),
                "accuracy": _mean([e["eval_accuracy"] for e in runs]),
                "held_out": runs[0]["eval_problems"] if runs else None,
            }
            if arm != "none":
                row.update(_difference(by_arm[arm], by_arm["none"], step, seed))
            accuracy.append(row)
    curves = []
    for arm in grid.arms:
        for step in range(1, grid.max_steps + 1):
            rows = [r.steps[step - 1] for r in by_arm[arm].values() if len(r.steps) >= step]
            if rows:
                curves.append(
                    {
                        "arm": arm,
                        "step": step,
                        **{
                            key: _mean([row[key] for row in rows if key in row])
                            for key in ("reward_mean", "accuracy", "flagged_share", "gamma_mean")
                        },
                    }
                )
    return {
        "object": "study.credit",
        "study_id": grid.study_id,
        "grid": asdict(grid),
        "runs": {
            "planned": len(grid.runs()),
            "ended": len(results),
            "succeeded": len(ok),
            "not_succeeded": [
                {"arm": r.arm, "seed": r.seed, "job_id": r.job_id, "status": r.status, "error": r.error}
                for r in results
                if r.status != "succeeded"
            ],
            "seconds": {run_key(r.arm, r.seed): r.seconds for r in results},
        },
        "bootstrap": {"resamples": RESAMPLES, "confidence": CONFIDENCE, "seed": seed},
        "accuracy": accuracy,
        "curves": curves,
    }


def _difference(
    arm: dict[int, RunResult], none: dict[int, RunResult], step: int, seed: int
) -> dict[str, Any]:
    key = str(step)
    seeds = sorted(s for s in arm if s in none and key in arm[s].evals and key in none[s].evals)
    if not seeds:
        return {"diff": None, "diff_low": None, "diff_high": None, "paired_seeds": 0}
    diffs = [
        [
            int(a) - int(b)
            for a, b in zip(
                arm[s].evals[key]["eval_correct"], none[s].evals[key]["eval_correct"], strict=True
            )
        ]
        for s in seeds
    ]
    mean, low, high = paired_bootstrap(diffs, seed=seed)
    return {"diff": mean, "diff_low": low, "diff_high": high, "paired_seeds": len(seeds)}


# -- the HTML page ---------------------------------------------------------------------------------------
ARM_COLOURS = ("#333333", "#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e")


def _num(v: float | None, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _svg_curves(title: str, series: dict[str, list[tuple[float, float]]], width: int = 640) -> str:
    """One line per arm over steps, in the audit view's ``fl-curves`` frame."""
    points = [p for line in series.values() for p in line]
    if not points:
        return ""
    height, pad = 200, 34
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) or 1
    y0, y1 = min(ys), max(ys)
    if y1 - y0 < 1e-9:
        y0, y1 = y0 - 0.5, y1 + 0.5

    def at(x: float, y: float) -> str:
        px = pad + (x - x0) / max(x1 - x0, 1e-9) * (width - 2 * pad)
        py = height - pad - (y - y0) / (y1 - y0) * (height - 2 * pad)
        return f"{px:.1f},{py:.1f}"

    lines = []
    for i, (arm, line) in enumerate(series.items()):
        colour = ARM_COLOURS[i % len(ARM_COLOURS)]
        path = " ".join(at(x, y) for x, y in line)
        lines.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.6" points="{path}"/>')
        lines.append(
            f'<text class="fl-legend" x="{width - pad - 110}" y="{pad + 14 * i}" fill="{colour}">{html.escape(arm)}</text>'
        )
    return (
        f"<figure><figcaption>{html.escape(title)}</figcaption>"
        f'<svg class="fl-curves" viewBox="0 0 {width} {height}" role="img" aria-label="{html.escape(title)}">'
        f'<text class="fl-legend" x="{pad}" y="{pad - 10}">{_num(y1)}</text>'
        f'<text class="fl-legend" x="{pad}" y="{height - 8}">{_num(y0)} · step {x0:g}–{x1:g}</text>'
        + "".join(lines)
        + "</svg></figure>"
    )


def _interval(row: dict[str, Any]) -> str:
    if row.get("diff_low") is None:
        return "–"
    return f"[{_num(row['diff_low'])}, {_num(row['diff_high'])}]"


def render_report_html(rep: dict[str, Any]) -> str:
    """A self-contained page for a credit study's report, in the audit view's style."""
    grid, runs = rep["grid"], rep["runs"]
    head = (
        f"task <b>{html.escape(grid['task'])}</b> · arms {html.escape(', '.join(grid['arms']))} · seeds "
        f"{html.escape(', '.join(map(str, grid['seeds'])))} · {grid['max_steps']} steps · runs ended "
        f"{runs['ended']}/{runs['planned']}, succeeded {runs['succeeded']}"
    )
    rows = "".join(
        f"<tr><td>{html.escape(r['arm'])}</td><td>{r['step']}</td><td>{r['seeds']}</td>"
        f"<td>{r['held_out'] or '–'}</td><td>{_num(r['accuracy'])}</td><td>{_num(r.get('diff'))}</td>"
        f"<td>{_interval(r)}</td></tr>"
        for r in rep["accuracy"]
    )
    table = (
        '<table class="fl-summary"><thead><tr><th>arm</th><th>step</th><th>seeds</th><th>held-out</th>'
        "<th>accuracy</th><th>− none</th><th>95% CI (paired bootstrap)</th></tr></thead>"
        f"<tbody>{rows}</tbody></table>"
    )
    failed = "".join(
        f"<li>{html.escape(r['arm'])} seed {r['seed']}: {html.escape(r['status'])} "
        f"({html.escape(r['error'] or '')})</li>"
        for r in runs["not_succeeded"]
    )
    figures = []
    accuracy_series: dict[str, list[tuple[float, float]]] = {}
    for r in rep["accuracy"]:
        if r["accuracy"] is not None:
            accuracy_series.setdefault(r["arm"], []).append((r["step"], r["accuracy"]))
    figures.append(_svg_curves("held-out greedy accuracy", accuracy_series))
    for key, title in (
        ("reward_mean", "mean rollout reward"),
        ("flagged_share", "flagged share of completion tokens"),
        ("gamma_mean", "mean γ"),
    ):
        series: dict[str, list[tuple[float, float]]] = {}
        for c in rep["curves"]:
            if c.get(key) is not None:
                series.setdefault(c["arm"], []).append((c["step"], c[key]))
        figures.append(_svg_curves(title, series))
    data = json.dumps(rep).replace("</", "<\\/")
    title = f"faithlens credit study {rep['study_id']}"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>{asset("audit.css")}</style></head>
<body><main class="fl-page"><h1>{html.escape(title)}</h1>
<p class="fl-meta">{head}</p>
<h2>Held-out accuracy, and each arm against <code>none</code></h2>{table}
{f"<h2>Runs that did not succeed</h2><ul>{failed}</ul>" if failed else ""}
<h2>Curves (mean over seeds)</h2>{"".join(figures)}
<script type="application/json" id="fl-study">{data}</script>
</main></body></html>
"""
