"""The one registry of served adapters: public name → current version, plus leases so a request finishes
on the version it started with. A swap attaches the new version first, flips the name, and detaches the
old one only when its last lease is released, so no request fails or changes weights mid-flight.

The adapter store (``<store>/<name>/<version>/``, integer versions, as the workers write it) is the
durable registry: :meth:`AdapterRegistry.load_store` serves the latest version of every adapter in it, at
start-up and whenever the hot-load channel is (re)joined, so nothing announced while the server was down
or deaf is missed."""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from faithlens import adapter_check
from faithlens.engine import EngineClient, EngineError
from faithlens.engine.errors import AdapterRefused
from faithlens.settings import get_core_settings
from service.errors import APIError, from_engine, model_not_found
from service.telemetry import Telemetry

log = logging.getLogger("faithlens.adapters")

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # service.schemas.AdapterName's rule
CONTROL = re.compile(r"[\x00-\x1f\x7f]")
MAX_PATH_CHARS = 4096


@dataclass
class AdapterVersion:
    name: str
    version: str
    path: Path
    internal: str
    loaded_at: int
    leases: int = 0


def _number(version: str) -> int | None:
    return int(version) if version.isascii() and version.isdecimal() else None


class AdapterRegistry:
    def __init__(
        self,
        engine: EngineClient,
        store: Path,
        metrics: Telemetry,
        served_name: str | None = None,
        max_rank: int | None = None,
    ) -> None:
        self.engine = engine
        self.store = store
        self.metrics = metrics
        self.max_rank = max_rank if max_rank is not None else get_core_settings().max_lora_rank
        if served_name is None:
            from service.settings import get_service_settings

            served_name = get_service_settings().served_model_name
        # adapters may not shadow the base model, under its served name nor its own
        self.reserved = {n for n in (served_name, getattr(engine, "model_name", None)) if n}
        self._current: dict[str, AdapterVersion] = {}
        self._retired: list[AdapterVersion] = []
        self._withdrawn: dict[str, str] = {}  # name → the version an operator unloaded
        self._lock = threading.Lock()
        self._internal_ids = itertools.count(1)
        self._versions = itertools.count(1)
        self._collecting: set[asyncio.Task] = set()

    # -- reads -------------------------------------------------------------------------------------------
    def list(self) -> list[AdapterVersion]:
        with self._lock:
            return sorted(self._current.values(), key=lambda v: v.name)

    def acquire(self, name: str, param: str = "adapter") -> tuple[str, Callable[[], None]]:
        """Lease the current version of ``name``: (peft name, release callback)."""
        with self._lock:
            version = self._current.get(name)
            if version is None:
                raise model_not_found(name, param)
            version.leases += 1

        def release() -> None:
            with self._lock:
                version.leases -= 1
                retired_and_free = version.leases == 0 and version in self._retired
            if retired_and_free:  # the last request on a swapped-out version ended: detach it now
                task = asyncio.get_running_loop().create_task(self.collect())
                self._collecting.add(task)
                task.add_done_callback(self._collecting.discard)

        return version.internal, release

    def relative(self, path: Path) -> str:
        """``path`` as the API shows it: relative to the store (never the server's absolute path)."""
        try:
            return path.relative_to(self.store.resolve()).as_posix()
        except ValueError:
            return path.name

    def resolve_path(self, path: str) -> Path:
        """A path inside the store (relative to it, or absolute); anything that escapes is refused."""
        if not isinstance(path, str) or not path or len(path) > MAX_PATH_CHARS or CONTROL.search(path):
            raise APIError(
                400, "adapter_path_invalid", "the path is empty, too long or holds control characters", "path"
            )
        root = self.store.resolve()
        candidate = Path(path)
        try:
            resolved = (candidate if candidate.is_absolute() else root / candidate).resolve()
        except (OSError, ValueError, RuntimeError) as exc:  # a symlink loop, ...
            raise APIError(400, "adapter_path_invalid", f"{path!r} cannot be resolved", "path") from exc
        if not resolved.is_relative_to(root):
            raise APIError(400, "adapter_path_invalid", f"{path!r} is outside the adapter store", "path")
        return resolved

    def check_name(self, name: str) -> None:
        if not isinstance(name, str) or not NAME.match(name):
            raise APIError(
                400, "invalid_request", "an adapter name is 1-128 letters, digits, '.', '_' or '-'", "name"
            )
        if name in self.reserved:
            raise APIError(
                400, "adapter_name_reserved", f"{name!r} is the base model's name; pick another", "name"
            )

    # -- mutations (async: the model work runs on the engine thread) -----------------------------------------
    async def load(
        self, name: str, path: str, version: str | None = None, source: str = "api"
    ) -> AdapterVersion:
        self.check_name(name)
        resolved = self.resolve_path(path)
        with self._lock:
            current = self._current.get(name)
            if current is not None and version is not None and current.version == str(version):
                return current  # a repeated announcement of the version we serve
        internal = f"adapter{next(self._internal_ids)}"
        try:
            # the checks that need no model, off the event loop and before the engine queues anything;
            # the engine runs them again with the model's own (and attaches only what passed)
            await asyncio.to_thread(adapter_check.check_files, resolved, self.max_rank)
            await self.engine.add_adapter(internal, resolved)
        except AdapterRefused as exc:
            self.metrics.adapter_loads.labels(source, "invalid").inc()
            log.warning(
                "adapter refused",
                extra={"adapter": name, "path": self.relative(resolved), "reason": exc.message},
            )
            raise from_engine(exc) from exc
        new = AdapterVersion(
            name,
            str(version) if version is not None else f"v{next(self._versions)}",
            resolved,
            internal,
            int(time.time()),
        )
        with self._lock:
            old = self._current.get(name)
            self._current[name] = new
            self._withdrawn.pop(name, None)
            if old is not None:
                self._retired.append(old)
        self.metrics.adapter_loads.labels(source, "ok").inc()
        log.info(
            "adapter loaded",
            extra={
                "adapter": name,
                "version": new.version,
                "path": self.relative(resolved),
                "source": source,
            },
        )
        await self.collect()
        return new

    async def unload(self, name: str) -> AdapterVersion:
        with self._lock:
            old = self._current.pop(name, None)
            if old is None:
                raise model_not_found(name, "name")
            self._retired.append(old)
            self._withdrawn[name] = old.version
        log.info("adapter unloaded", extra={"adapter": name, "version": old.version})
        await self.collect()
        return old

    async def collect(self) -> None:
        """Detach retired versions nobody holds any more."""
        with self._lock:
            done = [v for v in self._retired if v.leases == 0]
            self._retired = [v for v in self._retired if v.leases > 0]
        for version in done:
            await self.engine.remove_adapter(version.internal)

    # -- the store -------------------------------------------------------------------------------------------
    def store_versions(self) -> dict[str, list[int]]:
        """Every adapter in the store: name → its integer versions, newest first (other entries, such as
        ``checkpoints/`` or a half-written ``.3.partial/``, are not versions)."""
        found: dict[str, list[int]] = {}
        try:
            names = sorted(self.store.iterdir())
        except OSError:
            return found
        for directory in names:
            if not NAME.match(directory.name) or directory.name in self.reserved or not directory.is_dir():
                continue
            try:
                versions = [
                    number
                    for entry in directory.iterdir()
                    if (number := _number(entry.name)) is not None and entry.is_dir()
                ]
            except OSError:
                continue
            if versions:
                found[directory.name] = sorted(versions, reverse=True)
        return found

    async def load_store(self) -> list[AdapterVersion]:
        """Serve the latest version of every adapter in the store that is newer than what is served: the
        newest one that loads (a refused version is logged and the one before it tried). A name served at
        a version an operator chose (loaded over the API), or unloaded at that version, is left as it is."""
        found = await asyncio.to_thread(self.store_versions)
        loaded = []
        for name, versions in found.items():
            with self._lock:
                current = self._current.get(name)
                floor = self._withdrawn.get(name) if current is None else current.version
            if floor is not None:
                number = _number(floor)
                if number is None:
                    continue  # an operator's choice
                versions = [v for v in versions if v > number]
            for version in versions:
                try:
                    loaded.append(await self.load(name, f"{name}/{version}", str(version), source="store"))
                    break
                except (APIError, EngineError) as exc:
                    log.warning(
                        "stored adapter version not loaded",
                        extra={"adapter": name, "version": version, "reason": getattr(exc, "message", "")},
                    )
        if loaded:
            log.info("adapters loaded from the store", extra={"adapters": [v.name for v in loaded]})
        return loaded
