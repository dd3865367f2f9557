"""Run one fine-tuning job: lease it, load data and model, train (resuming from the latest checkpoint),
write the adapter version with its manifest, and announce it for hot-load. Knows nothing of Celery."""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import redis
import torch

from faithlens.answer import reference_answer
from faithlens.data import Problem, UnknownDataset, load_dataset
from faithlens.model import load_model
from faithlens.settings import CoreSettings, get_core_settings
from jobs.journal import Journal, UnsafePath, check_adapter_name, check_job_id, inside
from jobs.models import TERMINAL, Checkpoint, Job, JobError
from jobs.settings import QueueSettings, get_queue_settings
from jobs.store import JobStore
from training.config import TrainConfig, backend_unavailable
from training.trainer import Cancelled, Hooks, Trainer

log = logging.getLogger("faithlens.worker")


class LeaseBusy(Exception):
    def __init__(self, retry_in: int) -> None:
        super().__init__(f"job leased by another worker; retry in {retry_in}s")
        self.retry_in = retry_in


class JobFailure(Exception):
    """A failure with a stable code that the job's ``error`` reports."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


@dataclass(frozen=True)
class WorkerSettings:
    """A worker reads two layers' settings: the core's (model, paths) and the queue's (Redis, leases)."""

    core: CoreSettings
    queue: QueueSettings

    @classmethod
    def from_env(cls) -> WorkerSettings:
        return cls(get_core_settings(), get_queue_settings())


def named_dataset(name: str, settings: CoreSettings, param: str) -> list[Problem]:
    """A data set the job names (read from Redis: checked again, never a path)."""
    try:
        return load_dataset(name, data_dir=settings.data_dir)
    except (UnknownDataset, FileNotFoundError) as exc:
        code = "unknown_dataset" if isinstance(exc, UnknownDataset) else "dataset_unavailable"
        raise JobFailure(code, f"{param}: {exc}") from None


def load_problems(job: Job, store: JobStore, settings: CoreSettings) -> list[Problem]:
    if job.training_data != "upload":
        return named_dataset(job.training_data, settings, "training_data")
    rows = store.rows(job.id)
    if not rows:
        raise JobFailure("invalid_training_data", "the uploaded training data is missing or empty")
    problems = []
    for i, row in enumerate(rows, start=1):
        if reference_answer(row["answer"]) is None:
            raise JobFailure(
                "invalid_training_data",
                f"row {i}: answer has no '#### <number>' reference the reward can check",
            )
        problems.append(Problem(row["question"], row["answer"]))
    return problems


class LeaseLost(Exception):
    """Another worker holds this job's lease now: this one stops without touching the job."""


class Heartbeat:
    """Renews a lease in the background while blocking work runs (a job's training loop, an audit
    shard's rows). A lease that vanished (Redis restarted without it) is taken again; one that another
    worker holds now means this worker must stop (``lost``), so that the work never runs twice at once.
    ``renew`` and ``take`` are the store's calls for this lease; ``context`` names it in the logs."""

    def __init__(
        self, renew: Callable[[], bool], take: Callable[[], bool], ttl_s: int, context: dict[str, Any]
    ) -> None:
        self.renew, self.take, self.ttl_s, self.context = renew, take, ttl_s, context
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                if self.renew():
                    continue
                if not self.take():
                    self.lost = True
                    log.error("lease taken by another worker; stopping", extra=self.context)
                    return
                log.warning("lease was gone (Redis restarted?); taken again", extra=self.context)
            except redis.RedisError:
                log.warning("lease renewal failed", extra=self.context)


def run_job(job_id: str, worker_id: str, settings: WorkerSettings | None = None) -> str:
    settings = settings or WorkerSettings.from_env()
    journal = Journal(settings.core.adapters)
    store = JobStore(settings.queue.redis, journal=journal, patient=True)
    try:
        check_job_id(job_id)
        job = store.get(job_id)
        if job is not None:
            check_adapter_name(job.adapter_name)  # read from Redis: re-checked before it names a path
    except UnsafePath as exc:
        log.error("refused a job record", extra={"job": str(job_id)[:64], "reason": str(exc)})
        return "refused"
    if job is None:
        log.warning("unknown job", extra={"job": job_id})
        return "missing"
    if job.status in TERMINAL:
        return job.status  # a redelivered copy of a finished job
    if not store.take_lease(job_id, worker_id, settings.queue.job_lease_ttl_s):
        raise LeaseBusy(settings.queue.job_lease_ttl_s)
    try:
        ttl = settings.queue.job_lease_ttl_s
        renew, take = (partial(f, job_id, worker_id, ttl) for f in (store.renew_lease, store.take_lease))
        with Heartbeat(renew, take, ttl, {"job": job_id}) as heartbeat:
            return _run_leased(store, journal, job, settings, heartbeat)
    except LeaseLost:
        return "lease_lost"
    finally:
        store.release_lease(job_id, worker_id)


def _run_leased(
    store: JobStore, journal: Journal, job: Job, settings: WorkerSettings, heartbeat: Heartbeat
) -> str:
    if store.cancel_requested(job.id):
        return _finish(store, job.id, "cancelled", "cancelled before it started")
    job = store.update(
        job.id, status="running", started_at=job.started_at or int(time.time()), attempts=job.attempts + 1
    )
    store.event(job.id, f"attempt {job.attempts} started")
    try:
        _train(store, journal, job, settings, heartbeat)
    except Cancelled:
        if heartbeat.lost:
            raise LeaseLost() from None
        return _finish(store, job.id, "cancelled", "cancelled between steps")
    except JobFailure as failure:
        return _finish(
            store, job.id, "failed", failure.message, JobError(code=failure.code, message=failure.message)
        )
    except Exception as exc:  # the job says why; the worker lives on
        log.exception("job crashed", extra={"job": job.id})
        message = f"{type(exc).__name__}: {exc}"[:2000]
        return _finish(store, job.id, "failed", message, JobError(code="training_error", message=message))
    return "succeeded"


def _finish(store: JobStore, job_id: str, status: str, message: str, error: JobError | None = None) -> str:
    store.update(job_id, status=status, finished_at=int(time.time()), error=error)
    store.event(job_id, message, level="error" if status == "failed" else "info")
    return status


def _train(
    store: JobStore, journal: Journal, job: Job, settings: WorkerSettings, heartbeat: Heartbeat
) -> None:
    try:
        config = TrainConfig(**job.hyperparameters)
    except (TypeError, ValueError) as exc:
        raise JobFailure("invalid_hyperparameters", str(exc)) from exc
    trainer_class = _trainer_class(config)  # before the data and the model: a missing backend fails fast
    core = settings.core
    if core.torch_threads is not None:
        torch.set_num_threads(core.torch_threads)
    problems = load_problems(job, store, core)
    eval_problems = None
    if job.validation_data is not None:
        eval_problems = named_dataset(job.validation_data, core, "validation_data")
    lm = load_model(core.model, core.device, core.dtype, core.cache_dir)
    adapter_root = inside(core.adapters, check_adapter_name(job.adapter_name))
    checkpoint_dir = journal.checkpoint_dir(job)

    def on_metrics(step: int, metrics: dict) -> None:
        # "running" again if the reaper re-queued it while Redis was away: this worker holds the lease
        store.update(job.id, step=step, status="running")
        store.event(job.id, f"step {step}/{config.max_steps}", type="metrics", data=metrics)

    def on_checkpoint(step: int, path: Path, metrics: dict) -> None:
        store.add_checkpoint(
            job.id, Checkpoint(step_number=step, path=str(path), metrics=metrics, created_at=int(time.time()))
        )
        store.event(job.id, f"checkpoint at step {step}")

    def on_eval(step: int, results: dict) -> None:
        message = (
            f"eval at step {step}: accuracy {results['eval_accuracy']:.3f} on {results['eval_problems']}"
        )
        store.event(job.id, message, type="metrics", data=results)

    def should_stop() -> bool:
        return heartbeat.lost or store.cancel_requested(job.id)

    hooks = Hooks(on_metrics, should_stop, on_checkpoint, on_eval)
    trainer = trainer_class(lm, config, problems, hooks, eval_problems)
    checkpoints = journal.checkpoints(job)  # the disk is the truth: Redis may have lost its list
    if checkpoints:
        trainer.load_checkpoint(inside(core.adapters, checkpoints[-1].path))
        store.event(job.id, f"resumed from the checkpoint at step {trainer.step}")
    final = trainer.train(checkpoint_dir)
    _publish(store, job, settings, trainer, final, adapter_root)


def _trainer_class(config: TrainConfig) -> type[Trainer]:
    """The job's backend. ``trl`` is imported only here, for a job that asks for it: TRL is an optional
    extra, and nothing else imports it."""
    if config.backend == "native":
        return Trainer
    why = backend_unavailable(config.backend)
    if why is not None:
        raise JobFailure("backend_unavailable", why)
    from training.trl_backend import TrlTrainer

    return TrlTrainer  # type: ignore[return-value]  # the same interface (train, checkpoints, adapter)


def _publish(
    store: JobStore, job: Job, settings: WorkerSettings, trainer: Trainer, metrics: dict, root: Path
) -> None:
    """Write ``<store>/<name>/<version>/`` (adapter + manifest), mark the job done, announce it."""
    job = store.update(job.id, status="running")  # (back) to running: this worker holds its lease
    version = job.result_version
    if version is None:  # taken once: a retried job rewrites the same version, never a second one
        version = store.next_adapter_version(job.adapter_name)
        while (root / str(version)).exists():
            version = store.next_adapter_version(job.adapter_name)
        job = store.update(job.id, result_version=version)
    target = root / str(version)
    staging = root / f".{version}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    trainer.save_adapter(staging)
    manifest = {
        "job_id": job.id,
        "base_model": job.model,
        "method": job.method["type"],
        "hyperparameters": job.hyperparameters,
        "final_metrics": metrics,
        "version": version,
        "adapter_name": job.adapter_name,
        "created_at": int(time.time()),
    }
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2))
    shutil.rmtree(target, ignore_errors=True)
    staging.replace(target)
    name = f"{job.adapter_name}/{version}"
    store.update(job.id, status="succeeded", finished_at=int(time.time()), result_adapter=name, error=None)
    store.event(job.id, f"succeeded: adapter {name}", data={"final_metrics": metrics})
    announcement = json.dumps({"name": job.adapter_name, "path": str(target), "version": version})
    store.redis.publish(settings.queue.adapter_channel, announcement)
