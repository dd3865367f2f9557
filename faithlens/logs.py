"""Structured logging: key=value pairs on a console, or one JSON object per line."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_RESERVED = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class _Formatter(logging.Formatter):
    def __init__(self, as_json: bool) -> None:
        super().__init__()
        self.as_json = as_json

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {k: v for k, v in record.__dict__.items() if k not in _RESERVED}
        base = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        if record.exc_info:
            fields["exc"] = self.formatException(record.exc_info)
        if self.as_json:
            return json.dumps({**base, **fields}, default=str)
        extra = " ".join(f"{k}={v}" for k, v in fields.items())
        return f"{base['ts']} {base['level']:<7} {base['logger']}: {base['event']}" + (
            f" {extra}" if extra else ""
        )


def configure_logging(level: str = "INFO", as_json: bool = False) -> None:
    """Install the structured formatter on the root logger (idempotent)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(as_json))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
