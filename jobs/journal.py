"""The on-disk copy of every job, beside its checkpoints in the adapter store, so that a Redis which lost
its data (a restart without persistence, a flushed instance) loses no job a user submitted.

Layout, under the adapter store:

* ``.jobs/<job_id>/job.json``: the job record, rewritten (atomically) on every change the store makes;
* ``.jobs/<job_id>/rows.jsonl``: the rows uploaded with it;
* ``<adapter_name>/checkpoints/<job_id>/step-NNNNNN/``: the trainer's checkpoints (``trainer_state.pt``,
  ``metrics.json``, ``adapter/``), which a rebuilt job resumes from.

Nothing read from here is trusted more than a request: ids and names are checked against their patterns
and every path must stay inside the store.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from pydantic import ValidationError

from jobs.models import Checkpoint, Job

JOB_ID = re.compile(r"^ftjob-[0-9a-f]{24}$")
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
STEP_DIR = re.compile(r"^step-(\d{6,})$")


class UnsafePath(ValueError):
    """A job id, adapter name or path read from Redis or disk that would leave the store."""


def check_job_id(job_id: str) -> str:
    if not isinstance(job_id, str) or not JOB_ID.match(job_id):
        raise UnsafePath(f"not a job id: {str(job_id)[:64]!r}")
    return job_id


def check_adapter_name(name: str) -> str:
    if not isinstance(name, str) or not ADAPTER_NAME.match(name) or name in {".", ".."}:
        raise UnsafePath(f"not an adapter name: {str(name)[:64]!r}")
    return name


def inside(root: Path, path: Path | str) -> Path:
    """``path`` resolved, if it lies inside ``root``; else :class:`UnsafePath`."""
    text = str(path)
    if "\x00" in text:
        raise UnsafePath("a path with a NUL byte")
    resolved = (root / path).resolve() if not Path(text).is_absolute() else Path(text).resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise UnsafePath(f"{text[:120]!r} is outside the adapter store")
    return resolved


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


class Journal:
    """Job records and uploads on disk, under ``<store>/.jobs``."""

    def __init__(self, store: Path) -> None:
        self.store = store
        self.root = store / ".jobs"

    def _dir(self, job_id: str) -> Path:
        return self.root / check_job_id(job_id)

    def write(self, job: Job, rows: list[dict] | None = None) -> None:
        folder = self._dir(job.id)
        folder.mkdir(parents=True, exist_ok=True)
        if rows is not None:
            _write_atomically(folder / "rows.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        _write_atomically(folder / "job.json", job.model_dump_json())

    def read(self, job_id: str) -> Job | None:
        try:
            job = Job.model_validate_json((self._dir(job_id) / "job.json").read_text())
        except (OSError, ValidationError, UnsafePath):
            return None
        return job if job.id == job_id else None

    def rows(self, job_id: str) -> list[dict] | None:
        try:
            text = (self._dir(job_id) / "rows.jsonl").read_text()
        except OSError:
            return None
        return [json.loads(line) for line in text.splitlines() if line]

    def ids(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            p.name for p in self.root.iterdir() if JOB_ID.match(p.name) and (p / "job.json").exists()
        )

    def checkpoint_dir(self, job: Job) -> Path:
        """Where the trainer writes this job's checkpoints (checked to stay inside the store)."""
        name = check_adapter_name(job.adapter_name)
        return inside(self.store, Path(name) / "checkpoints" / check_job_id(job.id))

    def checkpoints(self, job: Job) -> list[Checkpoint]:
        """The complete checkpoints on disk, oldest first. The trainer writes a checkpoint into
        ``step-N.partial`` and renames it, so a ``step-N`` directory is whole; one without its trainer
        state (written by an older version) does not count."""
        folder = self.checkpoint_dir(job)
        if not folder.is_dir():
            return []
        found = []
        for step_dir in sorted(folder.iterdir()):
            match = STEP_DIR.match(step_dir.name)
            if not match or not (step_dir / "trainer_state.pt").exists():
                continue
            try:
                metrics = json.loads((step_dir / "metrics.json").read_text())
            except (OSError, ValueError):
                metrics = {}
            found.append(
                Checkpoint(
                    step_number=int(match.group(1)),
                    path=str(step_dir),
                    metrics=metrics,
                    created_at=int(step_dir.stat().st_mtime),
                )
            )
        return found

    def versions(self, name: str) -> list[int]:
        """The adapter versions already published under ``name``."""
        folder = inside(self.store, check_adapter_name(name))
        if not folder.is_dir():
            return []
        return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())
