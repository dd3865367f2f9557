"""The one settings object: every knob comes from an environment variable (prefix ``FAITHLENS_``)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    """Process-wide configuration, read once from the environment."""

    model_config = SettingsConfigDict(env_prefix="FAITHLENS_", extra="ignore")

    model: str | None = Field(
        default=None,
        description="HF model directory or GGUF file; unset means the embedded SmolLM2-135M-Instruct.",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    cache_dir: Path = Field(
        default=Path.home() / ".cache" / "faithlens",
        description="Where converted GGUF checkpoints are cached as safetensors for fast reloads.",
    )
    data_dir: Path = Field(
        default=REPO_ROOT.parent / "shared" / "data",
        description="Holds gsm8k/train.jsonl and gsm8k/dev.jsonl.",
    )
    log_level: str = "INFO"
    log_json: bool = Field(default=False, description="Emit one JSON object per log line.")
    torch_threads: int | None = Field(
        default=None,
        ge=1,
        description="Intra-op threads for torch; unset: torch's default (one per core). On a machine whose "
        "cores other work shares, fewer threads than cores avoid stalls at the thread team's barriers.",
    )
    redis_url: str | None = Field(
        default=None, validation_alias=AliasChoices("REDIS_URL", "FAITHLENS_REDIS_URL")
    )

    # -- serving (service/) ---------------------------------------------------------------------------
    host: str = Field(default="127.0.0.1", description="Bind address of `python -m service`.")
    port: int = Field(default=8000, ge=0, le=65535)
    served_model_name: str | None = Field(
        default=None, description="The base model's name in the API; unset means the model's own name."
    )
    api_keys: str = Field(
        default="",
        description="Comma-separated `key:scope` pairs, scope `infer` or `admin` (admin implies infer). "
        "Empty: no auth, and the server binds to loopback only.",
    )
    adapter_store: Path = Field(
        default=Path.home() / ".cache" / "faithlens" / "adapters",
        description="The only directory adapters load from (and jobs write to).",
    )
    adapter_channel: str = Field(default="faithlens:adapters", description="Redis channel for hot-load.")
    max_batch_size: int = Field(default=8, ge=1, description="Sequences decoded together in one pass.")
    max_queue: int = Field(default=64, ge=0, description="Requests waiting beyond the batch; then 503.")
    max_prompt_tokens: int = Field(default=4096, ge=1)
    max_prompt_chars: int = Field(
        default=65536,
        ge=1,
        description="Characters a prompt or completion may have; checked before tokenisation.",
    )
    max_analysis_cost: float = Field(
        default=30000,
        gt=0,
        description="Largest analysis cost estimate, in forward-token units (faithlens/cost.py); "
        "the default keeps one analysis under about a minute on SmolLM2 on two CPU cores.",
    )
    analysis_timeout_s: float = Field(
        default=120, gt=0, description="An analysis not done this long after it was queued fails (504)."
    )
    analysis_share: float = Field(
        default=2.0,
        gt=0,
        description="While requests decode, an analysis slice lasts this many times the decode step.",
    )
    analysis_idle_slice_s: float = Field(
        default=0.1,
        gt=0,
        description="With nothing to decode, an analysis slice lasts this long (new requests wait at most that).",
    )
    tokenizer_threads: int = Field(default=2, ge=1, description="Threads that tokenise requests.")
    max_new_tokens: int = Field(default=1024, ge=1, description="Upper bound a request may ask for.")
    max_body_bytes: int = Field(default=1 << 20, ge=1024, description="Request body size limit.")
    retry_after_s: int = Field(default=1, ge=1, description="Retry-After sent with 503 overloaded.")

    ui_dir: Path = Field(
        default=REPO_ROOT / "clients" / "python" / "faithlens_client" / "static",
        description="The audit view's files (the client package's renderer), served at /ui.",
    )

    # -- jobs (training/, workers/) ---------------------------------------------------------------------------
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

    def parsed_api_keys(self) -> dict[str, str]:
        """``{key: scope}``; raises ValueError on a malformed entry so a typo fails at start-up."""
        keys: dict[str, str] = {}
        for item in filter(None, (part.strip() for part in self.api_keys.split(","))):
            key, _, scope = item.partition(":")
            scope = scope or "infer"
            if not key or scope not in {"infer", "admin"}:
                raise ValueError(f"FAITHLENS_API_KEYS entry {item!r}: expected key:infer or key:admin")
            keys[key] = scope
        return keys


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
