"""The service's settings: where it binds, who may call it, and the limits that keep one request from
stalling the others. Environment variables, prefix ``FAITHLENS_`` (see also :mod:`faithlens.settings`
and :mod:`jobs.settings`)."""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

_HOST_PATTERN = re.compile(r"(\*\.)?[a-z0-9_-]+(\.[a-z0-9_-]+)*\.?|\[[0-9a-f:.]+\]")


class ServiceSettings(BaseSettings):
    """Bind, keys and limits of ``python -m service``."""

    model_config = SettingsConfigDict(env_prefix="FAITHLENS_", extra="ignore")

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
    allowed_hosts: str = Field(
        default="",
        description="Comma-separated names the `Host:` header may carry besides loopback ones (`*.example.com` "
        "matches subdomains). Empty: any name with API keys, loopback names only without (DNS rebinding).",
    )
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
    ui_dir: Path | None = Field(
        default=None,
        description="The audit view's files, served at /ui and inlined in HTML reports; unset: the ones "
        "installed with the server (service/view.py).",
    )

    def parsed_allowed_hosts(self) -> list[str]:
        """The allowed ``Host:`` names; raises ValueError on a malformed entry so a typo fails at start-up."""
        hosts = [part.strip().lower() for part in self.allowed_hosts.split(",") if part.strip()]
        for host in hosts:
            if not _HOST_PATTERN.fullmatch(host):
                raise ValueError(
                    f"FAITHLENS_ALLOWED_HOSTS entry {host!r}: expected a name, `*.domain`, an IPv4 address or "
                    "a bracketed IPv6 one, without a port"
                )
        return hosts

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
def get_service_settings() -> ServiceSettings:
    return ServiceSettings()
