"""Hot-load: follow the Redis channel ``faithlens:adapters`` and load each announced adapter version.

Anyone who can publish on the channel can send anything, so no message can stop the follower: a message
that is not a valid announcement is logged and dropped, a refused adapter is logged, and even a bug in
handling one message only costs that message. One subscription is held at a time; after a Redis error it
is closed before the next is opened, and on each (re)subscription the store is scanned for versions
announced while nobody listened.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from faithlens.engine import EngineError
from service.adapters import AdapterRegistry
from service.errors import APIError
from service.schemas import AdapterName

log = logging.getLogger("faithlens.hotload")

MAX_MESSAGE_BYTES = 64 << 10
RECONNECT_DELAY_S = 1.0
Version = (
    Annotated[int, Field(ge=0, lt=1 << 53, strict=True)]
    | Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
)


class AdapterAnnouncement(BaseModel):
    """What a job (or an operator) publishes: ``{"name", "path", "version"}``."""

    model_config = ConfigDict(extra="ignore")

    name: AdapterName
    path: str = Field(min_length=1, max_length=4096)
    version: Annotated[Version, Field(union_mode="left_to_right")]


def parse(data: object) -> AdapterAnnouncement | None:
    """The announcement in a message, or None (logged) when it is not one."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    if not isinstance(data, bytes | bytearray) or len(data) > MAX_MESSAGE_BYTES:
        log.warning("ignored an adapter announcement that is not a short JSON message")
        return None
    try:
        message = AdapterAnnouncement.model_validate_json(data)
    except ValidationError as exc:
        log.warning("ignored a malformed adapter announcement", extra={"error": str(exc)[:200]})
        return None
    return message


async def handle(registry: AdapterRegistry, data: object) -> None:
    """Load the announced version; never raises (but for cancellation)."""
    try:
        message = parse(data)
        if message is None:
            return
        await registry.load(message.name, message.path, str(message.version), source="redis")
    except asyncio.CancelledError:
        raise
    except (APIError, EngineError) as exc:
        log.warning(
            "announced adapter not loaded",
            extra={"code": getattr(exc, "code", type(exc).__name__), "reason": str(exc)[:300]},
        )
    except Exception:
        log.exception("an adapter announcement failed; following on")


async def catch_up(registry: AdapterRegistry) -> None:
    """Serve the store's latest versions (what was announced while nobody listened); never raises."""
    try:
        await registry.load_store()
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("loading the adapter store failed")


async def follow(redis, channel: str, registry: AdapterRegistry, subscribed: asyncio.Event) -> None:
    """Subscribe, serve the store's latest versions, and handle announcements until cancelled; after a
    Redis error, close the subscription and open a new one."""
    caught_up = False
    while True:
        pubsub = redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(channel)
            log.info("following adapter announcements", extra={"channel": channel})
            # subscribed first, then the scan: a version published during the scan is heard, not lost
            await catch_up(registry)
            caught_up = True
            subscribed.set()
            async for message in pubsub.listen():
                if message.get("type") == "message":
                    await handle(registry, message.get("data"))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("adapter channel lost; reconnecting", extra={"error": str(exc)[:200]})
            if not caught_up:  # no Redis at start-up: the store is served all the same
                await catch_up(registry)
                caught_up = True
        finally:
            with contextlib.suppress(Exception):
                await asyncio.shield(pubsub.aclose())
        await asyncio.sleep(RECONNECT_DELAY_S)
