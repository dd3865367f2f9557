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
    redis_url: str | None = Field(
        default=None, validation_alias=AliasChoices("REDIS_URL", "FAITHLENS_REDIS_URL")
    )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
