"""Who holds what on the store: build leases (``locks/<id>.lease``, create-exclusive,
heartbeaten, broken by rename when stale), the gc fence (``flock`` on ``locks/gc``, with a
deadline), and the serve leases daemons refresh (``leases/<id>/<host>``) so gc keeps what a
node serves. ``locks/`` and ``leases/`` are the owner's only."""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pydantic

from envfs.core.config import node_time
from envfs.core.errors import Busy, EnvironmentProblem
from envfs.store import feed
from envfs.store.base import StoreBase
from envfs.store.files import make_private, pid_start_time
from envfs.store.formats import LeaseInfo

#: A lease not heartbeaten for this long (store clock) is broken by waiters;
#: ``ENVFS_LEASE_STALE`` overrides it (tests).  Holders beat four times as often.
LEASE_STALE = float(os.environ.get("ENVFS_LEASE_STALE") or 60.0)

LEASE_HEARTBEAT = LEASE_STALE / 4

#: A node's ``leases/<id>/<host>`` older than this (store clock) no longer keeps ``<id>``.
SERVE_LEASE_TTL = 300.0

#: Seconds a build, bind or sweep waits for the gc fence before it gives up, naming who holds
#: it; ``ENVFS_FENCE_WAIT`` overrides it (tests).
FENCE_WAIT = float(os.environ.get("ENVFS_FENCE_WAIT") or 60.0)


def lock_holders(fd: int) -> str:
    """Who holds a lock on the file open at ``fd``, from ``/proc/locks`` (pid, user,
    command), for a message; a holder on another node of a NAS is not listed there."""
    st = os.fstat(fd)
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids: set[int] = set()
    with contextlib.suppress(OSError), open("/proc/locks") as f:
        for line in f:
            # "1: FLOCK  ADVISORY  WRITE 1234 00:2a:5678 0 EOF"; waiters read "1: -> FLOCK ..."
            fields = line.split()
            if len(fields) >= 6 and fields[1] != "->" and fields[5] == key:
                pids.add(int(fields[4]))
    pids.discard(os.getpid())
    if not pids:
        return "a process this node cannot see (another node?)"
    return ", ".join(_describe_pid(pid) for pid in sorted(pids))


def _describe_pid(pid: int) -> str:
    import pwd

    try:
        uid = os.stat(f"/proc/{pid}").st_uid
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return f"pid {pid}"
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    return f"pid {pid} ({comm}, user {user})"


class Lease:
    """A held build lease; a daemon thread touches it so that waiters see the holder alive.

    The lease is this file with our nonce: a holder that was stopped past ``LEASE_STALE``
    and resumed finds the path holding someone else's lease, and then neither touches nor
    removes it (`held` says so; the builder abandons its build).
    """

    def __init__(self, path: Path, info: LeaseInfo, locks: Path) -> None:
        self.path = path
        self.info = info
        self.locks = locks
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)
        self._thread.start()

    def held(self) -> bool:
        """Whether the lease file is still ours (its nonce; inode numbers get reused)."""
        return _lease_nonce(self.path) == self.info.nonce

    def _beat(self) -> None:
        while not self._stop.wait(LEASE_HEARTBEAT):
            if not self.held():
                return  # broken while we were stopped: it is someone else's now
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        """Remove the lease if it is still ours (by rename, so a new holder's is never lost)."""
        self._stop.set()
        self._thread.join()
        if not self.held():
            return
        aside = self.locks / f"{self.path.name}.released.{uuid.uuid4().hex[:12]}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        if _lease_nonce(aside) != self.info.nonce:  # taken over between check and rename
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)
        os.unlink(aside)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _lease_nonce(path: Path) -> str | None:
    try:
        return LeaseInfo.model_validate_json(path.read_bytes()).nonce
    except (OSError, pydantic.ValidationError):
        return None


class Leases(StoreBase):
    """Build leases, the gc fence and serve leases."""

    def _serve_lease(self, snapshot_id: str, host: str) -> Path:
        return self.leases / snapshot_id / feed.log_name(host).removesuffix(".jsonl")

    def hold_snapshots(self, snapshot_ids: list[str], host: str) -> None:
        """Mark (or refresh) ``leases/<id>/<host>``: this node serves these snapshots."""
        for sid in snapshot_ids:
            path = self._serve_lease(sid, host)
            path.parent.mkdir(exist_ok=True)
            with open(path, "a"):
                pass
            os.utime(path)

    def release_snapshots(self, snapshot_ids: list[str], host: str) -> None:
        for sid in snapshot_ids:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._serve_lease(sid, host))

    def served_snapshots(self, now: float, ttl: float = SERVE_LEASE_TTL) -> dict[str, list[str]]:
        """Snapshots some node marked as served within ``ttl`` of ``now`` (store clock)."""
        served: dict[str, list[str]] = {}
        try:
            dirs = list(os.scandir(self.leases))
        except FileNotFoundError:
            return served
        for d in dirs:
            if not d.is_dir(follow_symlinks=False):
                continue
            for lease in os.scandir(d.path):
                with contextlib.suppress(FileNotFoundError):
                    if lease.stat().st_mtime >= now - ttl:
                        served.setdefault(d.name, []).append(lease.name)
        return served

    @contextlib.contextmanager
    def gc_fence(self, exclusive: bool = False, wait: float | None = None) -> Iterator[None]:
        """Builds and binds hold it shared, a sweep exclusively (``flock`` on locks/gc, which
        only the store's owner may open). Waits at most ``wait`` seconds (``FENCE_WAIT``),
        then raises `Busy` naming who holds it: a stuck or hostile holder fails a command in
        one line instead of freezing it."""
        import fcntl

        make_private(self.locks)
        path = self.locks / "gc"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            if os.fstat(fd).st_mode & 0o077:
                os.fchmod(fd, 0o600)
            mode = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
            deadline = time.monotonic() + (FENCE_WAIT if wait is None else wait)
            pause = 0.01
            while True:
                try:
                    fcntl.flock(fd, mode)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        doing = "a sweep" if exclusive else "builds and binds"
                        raise Busy(
                            f"{path} (the gc fence, which {doing} must take) is held by "
                            f"{lock_holders(fd)}; try again when it is done"
                        ) from None
                    time.sleep(pause)
                    pause = min(pause * 2, 0.5)
            yield
        finally:
            os.close(fd)

    def lease_path(self, snapshot_id: str) -> Path:
        return self.locks / f"{snapshot_id}.lease"

    def try_lease(self, snapshot_id: str, host: str) -> Lease | None:
        """Take the build lease of a snapshot (create-exclusive), or None if someone holds it."""
        pid = os.getpid()
        info = LeaseInfo(
            snapshot_id=snapshot_id,
            host=host,
            pid=pid,
            pid_start=pid_start_time(pid),
            nonce=uuid.uuid4().hex,
            started=node_time(),
        )
        path = self.lease_path(snapshot_id)
        if not self.create_file(path, info.model_dump_json().encode()):
            return None
        return Lease(path, info, self.locks)

    def read_lease(self, snapshot_id: str) -> tuple[LeaseInfo, float] | None:
        """The lease holder and the time of its last heartbeat, or None."""
        path = self.lease_path(snapshot_id)
        try:
            st = os.stat(path)
            return self.read_model(path, LeaseInfo), st.st_mtime
        except (FileNotFoundError, EnvironmentProblem):
            return None

    def lease_is_stale(self, info: LeaseInfo, heartbeat: float, host: str) -> bool:
        """Stale: no heartbeat for LEASE_STALE by the store's clock (the lease's mtime is the
        store's too, so nodes' clocks do not matter), or its holder on this host is gone."""
        if info.host == host and pid_start_time(info.pid) != info.pid_start:
            return True
        return self.store_now() - heartbeat > LEASE_STALE

    def break_lease(self, snapshot_id: str, seen: LeaseInfo) -> bool:
        """Break a stale lease by rename (never by two deleters); True if we broke it.

        If the lease renamed away turns out to be a fresh one taken meanwhile, it is put back.
        """
        path = self.lease_path(snapshot_id)
        broken = self.locks / f"{snapshot_id}.broken.{uuid.uuid4().hex[:12]}"
        try:
            os.rename(path, broken)
        except FileNotFoundError:
            return False
        try:
            got = self.read_model(broken, LeaseInfo)
        except EnvironmentProblem:
            got = None
        if got is not None and got.nonce != seen.nonce:
            with contextlib.suppress(FileExistsError):
                os.link(broken, path)  # put the fresh lease back
            os.unlink(broken)
            return False
        os.unlink(broken)
        return True

    def stale_leases(self, host: str) -> list[LeaseInfo]:
        """Build leases whose holder is gone (see `lease_is_stale`): a builder killed after
        publishing leaves one that no later build of its snapshot looks at."""
        stale: list[LeaseInfo] = []
        try:
            names = os.listdir(self.locks)
        except FileNotFoundError:
            return stale
        for name in names:
            if name.endswith(".lease"):
                held = self.read_lease(name[: -len(".lease")])
                if held is not None and self.lease_is_stale(held[0], held[1], host):
                    stale.append(held[0])
        return stale
