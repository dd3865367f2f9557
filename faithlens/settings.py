"""The core's settings: which model, on which device, where the cache and the data live, logging and
threads. Every knob comes from an environment variable (prefix ``FAITHLENS_``).

Each layer has its own settings object: this one (``faithlens``), :mod:`service.settings` (bind, keys,
limits) and :mod:`jobs.settings` (Redis, queues, worker). Paths default under the user's data and cache
directories (``$XDG_DATA_HOME/faithlens``, ``$XDG_CACHE_HOME/faithlens``), never relative to the source
tree, so that an installed package works; a checkout's Makefile points ``FAITHLENS_DATA_DIR`` at
``../shared/data``.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def _xdg(variable: str, fallback: str) -> Path:
    return Path(os.environ.get(variable) or Path.home() / fallback) / "faithlens"


class CoreSettings(BaseSettings):
    """The model and the machine, read once from the environment."""

    model_config = SettingsConfigDict(env_prefix="FAITHLENS_", extra="ignore")

    model: str | None = Field(
        default=None,
        description="HF model directory or GGUF file; unset means the embedded SmolLM2-135M-Instruct.",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    cache_dir: Path = Field(
        default_factory=lambda: _xdg("XDG_CACHE_HOME", ".cache"),
        description="Converted GGUF checkpoints (safetensors, for fast reloads); adapters default under it.",
    )
    data_dir: Path = Field(
        default_factory=lambda: _xdg("XDG_DATA_HOME", ".local/share"),
        description="Holds gsm8k/train.jsonl and gsm8k/dev.jsonl (`make` sets it to ../shared/data).",
    )
    adapter_store: Path | None = Field(
        default=None,
        description="The only directory adapters load from and jobs write to; unset: <cache_dir>/adapters.",
    )
    max_lora_rank: int = Field(
        default=64,
        ge=1,
        description="The largest LoRA rank an adapter may declare; a larger one is refused before any "
        "memory is taken for it (400 adapter_rank_too_large).",
    )
    cuda_graphs: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="Capture each decode step shape as a CUDA graph: auto (on CUDA, yes; on a CPU, no), "
        "on (refused without CUDA) or off. A step whose rows mix LoRA adapters always runs eagerly.",
    )
    kv_memory_fraction: float = Field(
        default=0.8,
        gt=0,
        le=0.95,
        description="On CUDA, the share of the GPU memory free after loading the model that the static KV "
        "cache may take; the slots shrink to fit (docs/operations.md).",
    )
    log_level: str = "INFO"
    log_json: bool = Field(default=False, description="Emit one JSON object per log line.")
    torch_threads: int | None = Field(
        default=None,
        ge=1,
        description="Intra-op threads for torch; unset: torch's default (one per core). On a machine whose "
        "cores other work shares, fewer threads than cores avoid stalls at the thread team's barriers.",
    )
    plugins: str = Field(
        default="",
        description="Comma-separated modules to import at start-up; they may register saliency methods "
        "and credit strategies (faithlens.registry).",
    )

    @model_validator(mode="after")
    def _adapters_under_cache(self) -> CoreSettings:
        if self.adapter_store is None:
            self.adapter_store = self.cache_dir / "adapters"
        return self

    @property
    def adapters(self) -> Path:
        assert self.adapter_store is not None
        return self.adapter_store


@lru_cache(maxsize=1)
def get_core_settings() -> CoreSettings:
    return CoreSettings()
