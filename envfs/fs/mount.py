"""Run the envfs daemon: mount, serve, refresh bindings, report status, unmount cleanly.

`run_daemon` (the CLI calls it) mounts and serves until SIGTERM/SIGINT or an external
unmount, then unmounts and returns (exit 0).  ``foreground=False`` forks: the call returns in
the parent once the mount is ready (or raises if it failed), the child serves in its own
session. Seen from outside a daemon (unmount, stale mounts, status files): `envfs.fs.mounted`.

If the daemon is killed (SIGKILL, OOM), the kernel answers ENOTCONN on the mountpoint (callers
never hang); the next `run_daemon` on that mountpoint removes the stale mount and serves again.

`Daemon` is one trio nursery of loops (leases, refresh, kernel views, node cache, idle
release, status) sharing its state; what each loop decides lives apart (`envfs.fs.idle`,
`envfs.fs.kernel_views`, `envfs.node.cache`, `envfs.fs.following`, `envfs.fs.detached`);
split out the next loop that grows.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from datetime import UTC, datetime
from pathlib import Path

import pydantic
import pyfuse3
import trio

from envfs.core.errors import EnvfsError, EnvironmentProblem
from envfs.fs import fuse_loop, idle
from envfs.fs.catalog import Catalog
from envfs.fs.detached import run_detached
from envfs.fs.following import Following
from envfs.fs.fuse_ops import EnvfsOperations
from envfs.fs.kernel_views import KernelViews
from envfs.fs.mounted import prepare_mountpoint
from envfs.fs.prefetch import prefetch_snapshot
from envfs.fs.status import BuildStats, DaemonStatus, ServedEnv
from envfs.fs.vfs import Namespace
from envfs.node.builds import RETRY_AFTER, BuildQueue
from envfs.node.cache import QUIET, NodeCache
from envfs.node.early import EarlyTree
from envfs.store.files import pid_start_time

log = logging.getLogger(__name__)

#: pyfuse3 worker tasks: each in-flight request (including one waiting on a build) holds one.
MAX_TASKS = 512
_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
#: Seconds between checks for newly attached snapshots to lease, and between full refreshes
#: of every lease (well inside `envfs.store.leases.SERVE_LEASE_TTL`).
LEASE_CHECK = 1.0
LEASE_REFRESH = 60.0
#: Seconds between looks at the change feed: one NAS request each at rest (the probe), so a
#: change is seen within this (plus a few ms) on every node, and a node at rest costs the NAS
#: 1/REFRESH_INTERVAL requests a second plus the sweep's (envfs.node.sweep.SWEEP_RATE).
REFRESH_INTERVAL = 1.5
#: Seconds a snapshot no process uses stays attached (and leased) before the daemon lets
#: go of it (`envfs mount --idle-release`), so that gc may take it.
IDLE_RELEASE = 600.0
#: Seconds between status-file refreshes (also written at once when a build starts or ends).
STATUS_INTERVAL = 1.0
#: Seconds the daemon waits for in-flight requests after SIGTERM before cancelling them.
SHUTDOWN_GRACE = 2.0
#: Seconds between looks for pinned views to hand to the kernel.
KERNEL_CHECK = 0.2
#: Most envs a daemon loads at start because the last one served them.
PRELOAD_MAX = 32
#: Longest a request that loaded a snapshot waits for its kernel mounts before replying.
KERNEL_WAIT = 2.0
#: Seconds between looks for attached snapshots to copy into the node cache, and the wait
#: before trying again a copy that failed (the store was unreachable, say).
CACHE_CHECK = 1.0
CACHE_RETRY = 30.0


class ServedBindings(pydantic.BaseModel):
    """``<index>/served.json``: the bindings (``wf/node``) a node's daemon served, written by
    it and read by the next one at start."""

    bindings: list[str]


def run_daemon(
    catalog: Catalog,
    mountpoint: Path,
    *,
    allow_other: bool,
    foreground: bool,
    status_path: Path | None,
    refresh_interval: float = REFRESH_INTERVAL,
    build_retry_after: float = RETRY_AFTER,
    max_tasks: int = MAX_TASKS,
    kernel_mounts: bool = True,
    cache: NodeCache | None = None,
    served_path: Path | None = None,
    store: Path | None = None,
    idle_release: float = IDLE_RELEASE,
) -> None:
    """Mount envfs at ``mountpoint`` and serve until SIGTERM/SIGINT or an external unmount.

    Cleans a stale mount first; refuses (``EnvironmentProblem``) if a live filesystem is
    already mounted there.  ``Catalog.refresh`` runs every ``refresh_interval`` seconds in a
    thread and changed bindings are invalidated in the kernel.  With ``status_path``, a JSON
    status (see `Daemon.status`) is kept there and removed on a clean exit.
    ``kernel_mounts``: hand pinned views of built snapshots to the kernel (`envfs.fs.kernel`).
    ``cache``: keep a node-local copy of every snapshot served, and serve from it.
    ``served_path``: where the daemon remembers the snapshots it served, to load them again
    before it mounts next time (a restarted node serves them at once).
    ``idle_release``: seconds after which a snapshot no process uses (and that no binding
    this daemon shows has as its current one) is let go of (`envfs.fs.idle`).
    """
    mountpoint = Path(os.path.abspath(mountpoint))
    prepare_mountpoint(mountpoint)
    daemon = Daemon(
        catalog,
        mountpoint,
        allow_other,
        status_path,
        refresh_interval,
        build_retry_after,
        kernel_mounts,
        cache,
        served_path,
        idle_release,
    )
    daemon.store = store
    if foreground:
        daemon(max_tasks, ready=None)
    else:
        run_detached(lambda ready: daemon(max_tasks, ready=ready))


class Daemon(Following):
    """One mount's lifetime: init, the trio main loop with its helper tasks, clean close."""

    def __init__(
        self,
        catalog: Catalog,
        mountpoint: Path,
        allow_other: bool,
        status_path: Path | None,
        refresh_interval: float,
        build_retry_after: float,
        kernel_mounts: bool = True,
        cache: NodeCache | None = None,
        served_path: Path | None = None,
        idle_release: float = IDLE_RELEASE,
    ) -> None:
        self.catalog = catalog
        self.idle_release = idle_release
        self._held: set[str] = set()  # snapshots this daemon leases
        self._leasing: dict[str, Future[None]] = {}  # leases written ahead (`_lease_ahead`)
        self._leasing_lock = threading.Lock()
        self._prefetched: set[str] = set()  # attached snapshots whose prefetch was started
        self.served_path = served_path
        self.store: Path | None = None  # the store served, as status shows it
        self.cache = cache
        self.cached: set[str] = set()  # snapshots served from the node cache
        self.mountpoint = mountpoint
        self.allow_other = allow_other
        self.status_path = status_path
        self.refresh_interval = refresh_interval
        self.namespace = Namespace(catalog, local_copy=cache.path if cache else None)
        self.namespace.on_loading = self._lease_ahead
        self.builds = BuildQueue(
            catalog, retry_after=build_retry_after, on_change=self._status_changed
        )
        self.ops = EnvfsOperations(
            self.namespace,
            self.builds,
            on_attach=self._attached,
            cache=cache,
            on_fetch=self._status_changed,
        )
        self.started = time.time()
        self.refresh_error: str | None = None
        self.last_refresh: float | None = None
        self._status_dirty = trio.Event()
        self.kernel = KernelViews(self.namespace, mountpoint, cache, kernel_mounts)
        self._warm_views: list[str] = []  # pinned views of the envs loaded at start
        self._stopping = False

    def __call__(self, max_tasks: int, ready: Callable[[], None] | None) -> None:
        options = {
            "fsname=envfs",
            "subtype=envfs",
            "ro",
            "nosuid",
            "nodev",
            "default_permissions",
        }
        if self.allow_other:
            options.add("allow_other")
        self._preload()
        # SIGTERM/SIGINT wait (blocked) until the signal watcher runs: one that came right
        # after the mount appeared used to kill the daemon and leave a dead mount
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            pyfuse3.init(self.ops, str(self.mountpoint), options)
        except RuntimeError as e:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
            raise EnvironmentProblem(
                f"cannot mount envfs at {self.mountpoint} ({e}): check /dev/fuse and fusermount3"
            ) from e
        log.info("envfs mounted at %s (pid %d)", self.mountpoint, os.getpid())
        if ready is not None:
            ready()
        try:
            trio.run(self._main, max_tasks)
        finally:
            pyfuse3.close(unmount=True)
            self.ops.close_all()
            self.kernel.remove_trees()
            if self.status_path is not None:
                with contextlib.suppress(FileNotFoundError):
                    self.status_path.unlink()
            log.info("envfs unmounted from %s", self.mountpoint)

    async def _main(self, max_tasks: int) -> None:
        # Everything made so far (modules, the catalog, the index) lives as long as the
        # daemon: keep it out of the collector's scans.  Without this, the generational
        # collections triggered while a snapshot's manifest is parsed cost as much as the
        # parse itself (a pandas env: 39 -> 19 ms for its first access).
        gc.collect()
        gc.freeze()
        self._status_dirty = trio.Event()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._watch_signals, nursery.cancel_scope)
            nursery.start_soon(self._refresh_loop)
            nursery.start_soon(self._lease_loop)
            nursery.start_soon(self._idle_loop)
            if self.kernel.enabled:
                nursery.start_soon(self._kernel_loop)
            if self.cache is not None:
                nursery.start_soon(self._cache_loop, self.cache)
            if self.status_path is not None:
                nursery.start_soon(self._status_loop, self.status_path)
            fuse_loop.install()
            try:
                await pyfuse3.main(min_tasks=4, max_tasks=max_tasks)
            finally:
                fuse_loop.uninstall()
            log.info("FUSE session ended")
            nursery.cancel_scope.cancel()

    def _preload(self) -> None:
        """Load the current snapshots of the bindings the last daemon here served (before
        mounting: the first process after a restart finds them loaded, kernel-served at once).
        """
        if self.served_path is None:
            return
        try:
            served = ServedBindings.model_validate_json(self.served_path.read_bytes())
        except (OSError, pydantic.ValidationError):
            return
        t0 = time.monotonic()
        loaded = 0
        for path in served.bindings[:PRELOAD_MAX]:
            wf, _, node = path.partition("/")
            try:
                binding = self.catalog.current(wf, node)
            except EnvfsError:
                continue
            if binding is not None and self.namespace.preload(binding.snapshot_id):
                loaded += 1
                self._warm_views.append(f"{wf}/{node}@{binding.revision}")
        if loaded:
            log.info("loaded %d env(s) served before in %.2fs", loaded, time.monotonic() - t0)

    def _remember_served(self) -> None:
        """Write the bindings served, for `_preload` next time."""
        if self.served_path is not None:
            paths = sorted({v.path for v in self.namespace.views() if v.kind == "current"})
            data = ServedBindings(bindings=paths[:PRELOAD_MAX]).model_dump_json()
            _write_atomically(self.served_path, data)

    async def _lease_loop(self) -> None:
        """Keep ``leases/<id>/<host>`` fresh for every snapshot this daemon has attached
        (gc keeps leased snapshots): from its first use until it is let go of
        (`_idle_loop`), or the daemon exits cleanly."""
        held = self._held
        last_full = time.monotonic()
        try:
            while True:
                await trio.sleep(LEASE_CHECK)
                attached = set(self.namespace.attached_snapshots())
                full = time.monotonic() - last_full >= LEASE_REFRESH
                todo = sorted(attached if full else attached - held)
                held &= attached  # let go of meanwhile (`_release` drops its lease)
                if not todo:
                    continue
                try:
                    await trio.to_thread.run_sync(self.catalog.hold, todo)
                except Exception as e:  # keep serving; gc may then sweep what we serve
                    log.error("cannot refresh serve leases: %s: %s", type(e).__name__, e)
                    continue
                held |= set(todo)
                with self._leasing_lock:  # written: no lease ahead to wait for
                    for sid in todo:
                        self._leasing.pop(sid, None)
                try:
                    await trio.to_thread.run_sync(self._remember_served)
                except OSError as e:
                    log.warning("cannot remember the snapshots served: %s", e)
                if full:
                    last_full = time.monotonic()
        finally:
            with contextlib.suppress(OSError):  # what this daemon served, for the next one
                self._remember_served()
            with trio.CancelScope(shield=True):
                if held:
                    with contextlib.suppress(Exception):
                        await trio.to_thread.run_sync(self.catalog.release, sorted(held))

    async def _idle_loop(self) -> None:
        """Let go of each attached snapshot that no process has used for `idle_release`
        seconds and that no binding shown here has as its current one (`envfs.fs.idle`)."""
        clock = idle.IdleClock(self.idle_release)
        while True:
            await trio.sleep(min(max(self.idle_release / 4, 0.5), 30.0))
            current = set()
            for view in self.namespace.views():
                if view.kind == "current":
                    binding = self.catalog.current(view.workflow, view.node)
                    if binding is not None:
                        current.add(binding.snapshot_id)
            candidates = {
                sid: self.namespace.view_paths(sid)
                for sid in self.namespace.attached_snapshots()
                if sid not in current
            }
            if not candidates:
                continue
            in_use = await trio.to_thread.run_sync(idle.views_in_use, self.mountpoint)
            for sid in clock.idle(candidates, in_use):
                if await self._release(sid, candidates[sid]):
                    clock.forget(sid)
                else:
                    clock.busy(sid)

    async def _release(self, snapshot_id: str, paths: list[str]) -> bool:
        """Let go of one snapshot: its kernel views unmounted (unless busy: False), its
        tables dropped, the kernel's entries of its views invalidated, its lease removed."""
        if not await self.kernel.release(snapshot_id, paths):
            return False  # a view in use after all: kept
        for parent, name in self.namespace.release(snapshot_id):
            pyfuse3.invalidate_entry_async(parent, name, ignore_enoent=True)
        self.ops.backing_moved()
        self.cached.discard(snapshot_id)
        self._prefetched.discard(snapshot_id)
        with self._leasing_lock:
            self._leasing.pop(snapshot_id, None)
        if snapshot_id in self._held:
            self._held.discard(snapshot_id)
            try:
                await trio.to_thread.run_sync(self.catalog.release, [snapshot_id])
            except Exception as e:  # its lease then lapses (SERVE_LEASE_TTL)
                log.warning("cannot remove the lease of %s: %s", snapshot_id[:12], e)
        log.info("let go of %s: unused for %.0fs", snapshot_id[:12], self.idle_release)
        self._status_changed()
        return True

    async def _watch_signals(self, cancel_scope: trio.CancelScope) -> None:
        with trio.open_signal_receiver(*_STOP_SIGNALS) as signals:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)  # pending ones arrive now
            async for signum in signals:
                log.info("received %s: unmounting", signal.Signals(signum).name)
                await self._detach_kernel_views()  # while FUSE still answers their lookups
                pyfuse3.terminate()
                break
        await trio.sleep(SHUTDOWN_GRACE)
        log.warning("requests still in flight after %.0fs: cancelling them", SHUTDOWN_GRACE)
        cancel_scope.cancel()

    async def _kernel_loop(self) -> None:
        """Hand pinned views to the kernel: every KERNEL_CHECK, and (see `_attached`) at once
        when a request loads a snapshot."""
        for path in self._warm_views:  # what the last daemon served: kernel-served at once
            with contextlib.suppress(OSError):  # a walk through our own mount makes the view
                await trio.to_thread.run_sync(os.stat, self.mountpoint / path / "bin")
        await self.kernel.place()
        while not self._stopping and self.kernel.enabled:
            await trio.sleep(KERNEL_CHECK)
            await self.kernel.place()

    async def _attached(self, request_dir: int) -> None:
        """A request in directory ``request_dir`` loaded a snapshot: bind its pinned views
        now, before the reply, so that the process it serves runs kernel-served (it is about
        to walk into ``wf/node@REV``).  Never a view whose directory is ``request_dir``: the
        mount would wait for this very request (the kernel locks a mount point's inode).
        The snapshot is leased first: gc must not take what a process is about to use."""
        new = sorted(set(self.namespace.attached_snapshots()) - self._held)
        if new:
            for sid in new:  # a fresh node's head start (under way while the lease is written)
                if self.cache is not None and sid not in self._prefetched:
                    self._prefetched.add(sid)
                    on_tree = self._early_tree if self.kernel.enabled else None
                    self._nursery.start_soon(
                        prefetch_snapshot, self.namespace, self.cache, sid, on_tree
                    )
            try:
                with trio.move_on_after(KERNEL_WAIT):
                    await trio.to_thread.run_sync(self._hold, new)
                    self._held |= set(new)
                    await trio.to_thread.run_sync(self._remember_served)
            except Exception as e:  # the lease loop tries again
                log.error("cannot lease %s: %s: %s", new, type(e).__name__, e)
        if self.kernel.enabled and not self._stopping:
            with trio.move_on_after(KERNEL_WAIT):
                await self.kernel.place(skip=request_dir)

    def _lease_ahead(self, snapshot_id: str) -> None:
        """In the thread about to load a snapshot's manifest (`Namespace.on_loading`): its
        lease is written meanwhile, not after (the reply waits for both: `_hold`; 17-19 ms
        of a fresh node's first job at 1 ms a NAS request)."""
        with self._leasing_lock:
            if snapshot_id in self._held or snapshot_id in self._leasing:
                return
            done: Future[None] = Future()
            self._leasing[snapshot_id] = done

        def lease() -> None:
            try:
                self.catalog.hold([snapshot_id])
            except BaseException as e:  # raised to the request waiting for it (`_hold`)
                done.set_exception(e)
            else:
                done.set_result(None)

        threading.Thread(target=lease, name="lease-ahead", daemon=True).start()

    def _hold(self, snapshot_ids: list[str]) -> None:
        """Blocking: lease these snapshots, waiting for those written ahead."""
        with self._leasing_lock:
            ahead = {sid: self._leasing.pop(sid) for sid in snapshot_ids if sid in self._leasing}
        rest = [sid for sid in snapshot_ids if sid not in ahead]
        if rest:
            self.catalog.hold(rest)
        for done in ahead.values():
            done.result()

    async def _early_tree(self, tree: EarlyTree) -> None:
        """A snapshot's early tree is made (`envfs.node.early`): the kernel serves what the
        node holds of it now, FUSE the rest, until its whole copy is in."""
        self.kernel.trees[tree.snapshot_id] = tree
        if self.kernel.enabled and not self._stopping:
            with trio.move_on_after(KERNEL_WAIT):
                await self.kernel.place()

    async def _cache_loop(self, cache: NodeCache) -> None:
        """Copy each attached snapshot into the node cache (in the background: FUSE serves
        from the store meanwhile), then serve it from there; evict what is not in use."""
        retry_at: dict[str, float] = {}
        while True:
            await trio.sleep(CACHE_CHECK)
            attached = self.namespace.attached_snapshots()
            for sid in attached:
                if sid in self.cached or retry_at.get(sid, 0.0) > time.monotonic():
                    continue
                if cache.fill_rate == 0 or cache.quiet_for() < QUIET:
                    break  # off, or a job is reading the env in: whole copies wait for it
                source = self.namespace.snapshot_source(sid)
                if source is None:
                    continue
                try:
                    copy = await trio.to_thread.run_sync(cache.fill, sid, Path(os.fsdecode(source)))
                except (OSError, EnvfsError) as e:
                    log.warning("cannot copy %s to the node cache (retrying later): %s", sid, e)
                    retry_at[sid] = time.monotonic() + CACHE_RETRY
                    continue
                if os.fsencode(copy) != source:
                    self.namespace.relocate(sid, copy)
                    self.ops.backing_moved()
                self.cached.add(sid)
                await trio.to_thread.run_sync(cache.touch, sid)
                try:
                    await trio.to_thread.run_sync(cache.evict, set(attached))
                except OSError as e:
                    log.warning("node cache eviction failed: %s", e)
                self._status_changed()

    async def _detach_kernel_views(self) -> None:
        self._stopping = True
        await self.kernel.detach_all()

    def _status_changed(self) -> None:
        self._status_dirty.set()

    def status(self) -> DaemonStatus:
        """What ``envfs status`` shows: mount, envs served, builds, cache statistics."""
        return DaemonStatus(
            mountpoint=str(self.mountpoint),
            pid=os.getpid(),
            pid_start=pid_start_time(os.getpid()),
            store=str(self.store) if self.store is not None else None,
            started=datetime.fromtimestamp(self.started, UTC).isoformat(),
            envs=[
                ServedEnv(
                    path=v.path,
                    snapshot_id=v.snapshot_id,
                    kernel=v.path in self.kernel.served,
                    early=self.kernel.is_early(v.path),
                )
                for v in self.namespace.views()
            ],
            builds=BuildStats.model_validate(self.builds.statistics()),
            cache={
                **self.namespace.statistics(),
                **self.ops.statistics(),
                **(self.cache.statistics(len(self.cached)) if self.cache is not None else {}),
            },
            refresh={"last_ok": self.last_refresh, "error": self.refresh_error},
        )

    async def _status_loop(self, path: Path) -> None:
        last: str | None = None
        while True:
            # A fresh event before reading the state: a change during the write below must
            # wake the next round, not be forgotten with the old event.
            self._status_dirty = trio.Event()
            text = self.status().model_dump_json(indent=2)
            if text != last:
                try:
                    await trio.to_thread.run_sync(_write_atomically, path, text)
                    last = text
                except OSError as e:
                    log.error("cannot write status file %s: %s", path, e)
            with trio.move_on_after(STATUS_INTERVAL):
                await self._status_dirty.wait()


def _write_atomically(path: Path, text: str) -> None:
    """The status file, readable by its owner only (it names the store and what is served)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(fd, "w") as f:
        f.write(text + "\n")
    os.replace(tmp, path)
