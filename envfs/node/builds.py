"""Build-on-first-access for the daemon: one build per snapshot id, awaited by every caller.

`BuildQueue.wait_for_build` runs ``Builder.build`` (the catalog's) in a worker thread (so
the FUSE event loop keeps answering other requests), dedupes concurrent callers in-process
(the store's lease dedupes across processes and nodes), and remembers failures for a short
back-off so that a broken spec is not rebuilt on every ``stat``; after the back-off the
next access tries again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import trio

from envfs.core.errors import BuildFailed, EnvfsError

log = logging.getLogger(__name__)

#: Seconds a failed build is remembered (callers get its errno at once) before a retry.
RETRY_AFTER = 10.0


@dataclass(slots=True)
class _Running:
    started: float  # wall clock, for status
    done: trio.Event = field(default_factory=trio.Event)
    path: Path | None = None
    error: EnvfsError | None = None


@dataclass(frozen=True, slots=True)
class BuildFailure:
    snapshot_id: str
    error: EnvfsError
    at: float  # wall clock
    retry_at: float  # monotonic


class Builder(Protocol):
    """What builds a snapshot (the namespace's catalog): blocking, run in a worker thread."""

    def build(self, snapshot_id: str) -> Path:
        """Build ``snapshot_id`` (or wait for another node's build); its directory."""
        ...


class BuildQueue:
    """In-process build coordinator.  Use from the trio event loop only."""

    def __init__(
        self,
        catalog: Builder,
        *,
        retry_after: float = RETRY_AFTER,
        max_parallel: int = 64,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self._catalog = catalog
        self._retry_after = retry_after
        self._limiter = trio.CapacityLimiter(max_parallel)
        self._clock = clock
        self._on_change = on_change
        self._running: dict[str, _Running] = {}
        self._failed: dict[str, BuildFailure] = {}
        self.completed = 0

    async def wait_for_build(self, snapshot_id: str) -> Path:
        """Build ``snapshot_id`` (or join the build already running) and return its directory.

        Raises the build's `EnvfsError` (its ``errno`` is what the FUSE caller sees).
        """
        running = self._running.get(snapshot_id)
        if running is None:
            failure = self._failed.get(snapshot_id)
            if failure is not None and self._clock() < failure.retry_at:
                raise failure.error.with_traceback(None)
            running = _Running(time.time())
            self._running[snapshot_id] = running
            self._changed()
            try:
                await self._build(snapshot_id, running)
            finally:
                del self._running[snapshot_id]
                running.done.set()
                self._changed()
        else:
            await running.done.wait()
        if running.error is not None:
            raise running.error
        assert running.path is not None
        return running.path

    async def _build(self, snapshot_id: str, running: _Running) -> None:
        log.info("building snapshot %s on first access", snapshot_id)
        try:
            running.path = await trio.to_thread.run_sync(
                self._catalog.build, snapshot_id, limiter=self._limiter, abandon_on_cancel=True
            )
        except EnvfsError as e:
            running.error = e
        except Exception as e:  # a bug in the builder: report it, keep serving
            log.exception("build of snapshot %s crashed", snapshot_id)
            running.error = BuildFailed(f"build crashed: {type(e).__name__}: {e}")
        if running.error is not None:
            reason = running.error.message
            log.error(
                "build of snapshot %s failed (errno %d, retry in %.0fs): %s",
                snapshot_id,
                running.error.errno,
                self._retry_after,
                reason,
            )
            self._failed[snapshot_id] = BuildFailure(
                snapshot_id,
                running.error,
                time.time(),
                self._clock() + self._retry_after,
            )
        else:
            self._failed.pop(snapshot_id, None)
            self.completed += 1
            log.info("snapshot %s is built at %s", snapshot_id, running.path)

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change()

    def state(self, snapshot_id: str) -> str:
        """``building``, ``failed`` (within the back-off) or ``bound`` (not built, not asked
        for yet: the word `envfs show` uses)."""
        if snapshot_id in self._running:
            return "building"
        if snapshot_id in self._failed:
            return "failed"
        return "bound"

    def statistics(self) -> dict[str, object]:
        """Running and failed builds, for ``envfs status``."""
        return {
            "running": [
                {"snapshot_id": sid, "since": r.started} for sid, r in self._running.items()
            ],
            "failed": [
                {
                    "snapshot_id": f.snapshot_id,
                    "errno": f.error.errno,
                    "reason": f.error.message,
                    "at": f.at,
                }
                for f in self._failed.values()
            ],
            "completed": self.completed,
        }
