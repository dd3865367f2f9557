"""The one registry of served adapters: public name → current version, plus leases so a request finishes
on the version it started with. A swap attaches the new version first, flips the name, and detaches the
old one only when its last lease is released, so no request fails or changes weights mid-flight."""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from faithlens import lora
from faithlens.engine import EngineClient
from service.errors import APIError, model_not_found
from service.telemetry import Telemetry

log = logging.getLogger("faithlens.adapters")


@dataclass
class AdapterVersion:
    name: str
    version: str
    path: Path
    internal: str
    loaded_at: int
    leases: int = 0


class AdapterRegistry:
    def __init__(self, engine: EngineClient, store: Path, metrics: Telemetry) -> None:
        self.engine = engine
        self.store = store
        self.metrics = metrics
        self._current: dict[str, AdapterVersion] = {}
        self._retired: list[AdapterVersion] = []
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

    def resolve_path(self, path: str) -> Path:
        """A path inside the store (relative to it, or absolute); anything that escapes is refused."""
        root = self.store.resolve()
        candidate = Path(path)
        resolved = (candidate if candidate.is_absolute() else root / candidate).resolve()
        if not resolved.is_relative_to(root):
            raise APIError(400, "adapter_path_invalid", f"{path!r} is outside the adapter store", "path")
        return resolved

    # -- mutations (async: the model work runs on the engine thread) -----------------------------------------
    async def load(
        self, name: str, path: str, version: str | None = None, source: str = "api"
    ) -> AdapterVersion:
        resolved = self.resolve_path(path)
        try:
            lora.check_adapter_dir(resolved)
        except lora.AdapterFormatError as exc:
            self.metrics.adapter_loads.labels(source, "invalid").inc()
            raise APIError(400, "adapter_invalid", str(exc), "path") from exc
        with self._lock:
            current = self._current.get(name)
            if current is not None and version is not None and current.version == str(version):
                return current  # a repeated announcement of the version we serve
        internal = f"adapter{next(self._internal_ids)}"
        try:
            await self.engine.add_adapter(internal, resolved)
        except lora.AdapterFormatError as exc:
            self.metrics.adapter_loads.labels(source, "invalid").inc()
            raise APIError(400, "adapter_invalid", str(exc), "path") from exc
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
            if old is not None:
                self._retired.append(old)
        self.metrics.adapter_loads.labels(source, "ok").inc()
        log.info(
            "adapter loaded",
            extra={"adapter": name, "version": new.version, "path": str(resolved), "source": source},
        )
        await self.collect()
        return new

    async def unload(self, name: str) -> AdapterVersion:
        with self._lock:
            old = self._current.pop(name, None)
            if old is None:
                raise model_not_found(name, "name")
            self._retired.append(old)
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
