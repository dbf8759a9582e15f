"""Building a snapshot exactly once across nodes: take its lease or wait for its holder,
build in staging, publish by one rename, record a failure where every node sees it."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import random
import time
from pathlib import Path

from envfs.build import builder, interpreters, spec, uv
from envfs.core import crashpoints
from envfs.core.errors import BuildFailed, Busy, EnvfsError, EnvironmentProblem
from envfs.service.base import ServiceBase
from envfs.service.reports import State
from envfs.store.formats import FailureInfo
from envfs.store.leases import Lease

BUILD_WAIT = 3600.0  # how long a waiter waits for another node's build


class LeaseLost(EnvfsError):
    """This builder's lease was broken (it was stopped too long); another one builds."""


class Building(ServiceBase):
    """Builds, and waits for other nodes' builds (`Service` is one)."""

    def state(self, snapshot_id: str) -> tuple[State, str | None]:
        if self.index.is_ready(snapshot_id) or self.store.snapshot_ready(snapshot_id):
            return "ready", None
        lease = self.store.read_lease(snapshot_id)
        if lease is not None and not self.store.lease_is_stale(lease[0], lease[1], self.host):
            return "building", f"on {lease[0].host} (pid {lease[0].pid})"
        failure = self.store.failure(snapshot_id)
        if failure is not None:
            return "failed", failure.reason
        return "bound", None

    def _build_indexes(self) -> spec.Indexes:
        """The indexes (and credentials) a build uses, with the store's build policy: a
        lazy build in a daemon, or one the API runs, keeps ``wheels-only`` too."""
        if self._indexes.no_build or self.store.config().build_policy != "wheels-only":
            return self._indexes
        return dataclasses.replace(self._indexes, no_build=True)

    def ensure_built(self, snapshot_id: str, timeout: float = BUILD_WAIT) -> Path:
        """Build a snapshot, or wait for whoever builds it; exactly one build across nodes."""
        path = self.store.snapshot_dir(snapshot_id)
        deadline = time.monotonic() + timeout
        started = self.store.store_now()  # failures are stamped with the store clock too
        delay = 0.05
        announced = False
        while True:
            if self.store.snapshot_ready(snapshot_id):
                self.index.mark_ready(snapshot_id)
                return path
            lease = self.store.try_lease(snapshot_id, self.host)
            if lease is not None:
                with lease:
                    if self.store.snapshot_ready(snapshot_id):  # published while we raced
                        continue
                    self._build_locked(snapshot_id, lease)
                continue
            held = self.store.read_lease(snapshot_id)
            if held is not None and self.store.lease_is_stale(held[0], held[1], self.host):
                if self.store.break_lease(snapshot_id, held[0]):
                    self.store.audit("lease_broken", self.host, snapshot_id, holder=held[0].host)
                continue
            failure = self.store.failure(snapshot_id)
            if held is None and failure is not None and failure.time >= started:
                raise BuildFailed(f"the build on {failure.host} failed: {failure.reason}")
            if not announced and held is not None:
                self._say(f"waiting for the build on {held[0].host} (pid {held[0].pid})")
                announced = True
            if time.monotonic() > deadline:
                raise Busy(f"gave up waiting {timeout:.0f}s for the build of {snapshot_id[:12]}")
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 1.5, 2.0)

    def _build_locked(self, snapshot_id: str, lease: Lease) -> None:
        """Build while holding the lease (and the gc fence, shared)."""
        with self.store.gc_fence():
            self._build_and_publish(snapshot_id, lease)

    def _lost_lease(self, snapshot_id: str) -> None:
        """Our build lease was taken over: say so; the caller waits for the holder's build."""
        self._say("lost the build lease to another builder; waiting for its build")
        self.store.audit("lease_lost", self.host, snapshot_id)

    def _build_and_publish(self, snapshot_id: str, lease: Lease) -> None:
        """Stage, build, publish, audit.

        A builder stopped past the lease's staleness and resumed finds its lease taken over
        (and maybe its staging dir cleaned by the new holder): it abandons its build without
        a failure record, touches nothing of the new holder's, and the caller waits for it.
        """
        crashpoints.reached("leased")
        if not lease.held():  # stopped past its staleness before it began: not ours now
            self._lost_lease(snapshot_id)
            return
        info = self.store.read_spec(snapshot_id)
        self.store.clean_staging(held_id=snapshot_id)  # while held: a dead build's, if any
        interp = info.interpreter
        if interp.digest is None:  # layout 1: built over this node's own interpreter
            interp = interpreters.find_exact(interp)
        pyproject, lock = self.store.spec_files(snapshot_id)
        files = spec.ProjectFiles(pyproject=pyproject, lock=lock)
        self.store.audit("build_started", self.host, snapshot_id, pid=os.getpid())
        log = uv.BuildLog(self.progress, self.store.root)
        t0 = time.monotonic()
        room = self.store.reserve_failure_record(snapshot_id, self.host)
        staged = self.store.new_staging(snapshot_id, self.host)
        pooled: list[Path] = []  # pool objects this build made: dropped if it fails
        try:
            with self.store.objects_created_under(staged) as pooled:
                manifest = builder.build_into(
                    self.store,
                    staged,
                    files,
                    interp,
                    snapshot_id,
                    self.host,
                    log,
                    cache=self.index,
                    selection=info.selection,
                    indexes=self._build_indexes(),
                )
            if not lease.held():
                raise LeaseLost(snapshot_id)
            self._say("publishing the snapshot")
            published = self.store.publish(staged, snapshot_id)
            crashpoints.reached("rename")
        except (EnvfsError, OSError) as exc:
            builder.remove_staged(staged)
            self.store.drop_objects(pooled)
            if not lease.held():  # whatever failed, it was no longer our build
                self._lost_lease(snapshot_id)
                return
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                exc = EnvironmentProblem(f"the store is full ({exc.strerror}) while building")
            if not isinstance(exc, EnvfsError):
                raise
            log.step(f"FAILED: {exc.message}")
            failure = FailureInfo(
                snapshot_id=snapshot_id,
                host=self.host,
                time=self.store.store_now(),
                reason=exc.message,
                log=log.text()[-20000:],
            )
            with contextlib.suppress(OSError):  # a full store may refuse the log line
                self.store.record_failure(failure, room)
                self.store.audit("build_failed", self.host, snapshot_id, reason=exc.message)
            raise exc from None
        except BaseException:
            builder.remove_staged(staged)
            self.store.drop_objects(pooled)
            raise
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(room)
        self.store.clear_failure(snapshot_id)
        if published:
            self.store.audit(
                "built",
                self.host,
                snapshot_id,
                seconds=round(time.monotonic() - t0, 3),
                files=manifest.file_count,
                bytes=manifest.total_bytes,
            )
        self.index.mark_ready(snapshot_id)
