"""Hot-load: follow the Redis channel ``faithlens:adapters`` and load each announced adapter version."""

from __future__ import annotations

import asyncio
import json
import logging

from pydantic import BaseModel, ValidationError

from service.adapters import AdapterRegistry
from service.errors import APIError
from service.schemas import AdapterName

log = logging.getLogger("faithlens.hotload")


class AdapterAnnouncement(BaseModel):
    """What a job (or an operator) publishes: ``{"name", "path", "version"}``."""

    name: AdapterName
    path: str
    version: str | int


async def handle(registry: AdapterRegistry, data: bytes | str) -> None:
    try:
        message = AdapterAnnouncement.model_validate(json.loads(data))
    except (ValueError, ValidationError) as exc:
        log.warning("ignored a malformed adapter announcement", extra={"error": str(exc)[:200]})
        return
    try:
        await registry.load(message.name, message.path, str(message.version), source="redis")
    except APIError as exc:
        log.warning(
            "announced adapter not loaded",
            extra={"adapter": message.name, "code": exc.code, "reason": exc.message},
        )


async def follow(redis, channel: str, registry: AdapterRegistry, subscribed: asyncio.Event) -> None:
    """Subscribe and handle announcements until cancelled; reconnects after Redis errors."""
    while True:
        try:
            pubsub = redis.pubsub()
            await pubsub.subscribe(channel)
            subscribed.set()
            log.info("following adapter announcements", extra={"channel": channel})
            async for message in pubsub.listen():
                if message.get("type") == "message":
                    await handle(registry, message["data"])
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("adapter channel lost; reconnecting", extra={"error": str(exc)[:200]})
            await asyncio.sleep(1.0)
