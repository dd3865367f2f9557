"""The queue's settings: Redis, the job queue, and the workers. Shared by the service (which enqueues and
reads jobs) and the workers (which run them). Environment variables, prefix ``FAITHLENS_`` (``REDIS_URL``
for Redis)."""

from __future__ import annotations

from functools import lru_cache

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


class QueueSettings(BaseSettings):
    """Redis, queues and workers."""

    model_config = SettingsConfigDict(env_prefix="FAITHLENS_", extra="ignore")

    redis_url: str | None = Field(
        default=None, validation_alias=AliasChoices("REDIS_URL", "FAITHLENS_REDIS_URL")
    )
    adapter_channel: str = Field(default="faithlens:adapters", description="Redis channel for hot-load.")
    job_visibility_timeout_s: int = Field(
        default=6 * 3600,
        ge=1,
        description="Seconds before an unacknowledged job is redelivered; must exceed the longest job.",
    )
    job_lease_ttl_s: int = Field(
        default=60,
        ge=2,
        description="A running job's heartbeat lease; a dead worker's lease expires after it.",
    )
    job_queue: str = Field(default="faithlens-jobs", description="The Celery queue jobs are sent to.")
    worker_concurrency: int = Field(default=1, ge=1, description="Jobs one worker runs at once.")
    max_upload_rows: int = Field(default=20000, ge=1, description="Rows an uploaded training set may hold.")
    reaper_interval_s: float = Field(
        default=15,
        gt=0,
        description="How often each worker's reaper re-queues orphaned jobs and rebuilds lost ones.",
    )
    reaper_grace_s: float = Field(
        default=10,
        ge=0,
        description="A job younger than this is never re-sent (its message may still be on its way).",
    )

    audit_queue: str = Field(
        default="faithlens-audits", description="The Celery queue audit shards are sent to."
    )
    audit_shard_size: int = Field(
        default=8, ge=1, le=10000, description="Rows per audit shard (one task each)."
    )
    max_audit_rows: int = Field(default=10000, ge=1, description="Rows one audit may hold.")
    max_audit_row_cost: float = Field(
        default=300000.0,
        gt=0,
        description="An audit row's analysis cost limit, in forward-token units (faithlens/cost.py); higher "
        "than the interactive FAITHLENS_MAX_ANALYSIS_COST since audits run on the workers.",
    )

    @property
    def redis(self) -> str:
        """The Redis URL, or the local default when REDIS_URL is unset."""
        return self.redis_url or DEFAULT_REDIS_URL


@lru_cache(maxsize=1)
def get_queue_settings() -> QueueSettings:
    return QueueSettings()
