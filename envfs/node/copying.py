"""How the node cache reads store files and writes its objects: the low-level part of
`envfs.node.cache` (flags, read sizes, bounded reading, new files)."""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import itertools
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

#: How store directories are opened to copy files relative to them: ``O_PATH`` is no open
#: of the directory on the file system (an NFS or FUSE store is asked nothing for it).
DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
#: A store file (or pack) is read this much at a time: each read call costs a NAS client
#: that caches no attributes a round trip for them, and a pack's first members land early;
#: 16 threads copying hold at most 64 MB this way.
READ = 4 << 20
_P = TypeVar("_P", str, Path)
_STAGED = itertools.count()  # names staged objects apart (`beside`)


def copy_bytes(src: int, dest: Path, size: int) -> str:
    """Copy the ``size`` bytes the manifest gives ``src`` (no read past them: one round
    trip less per file) to a new file ``dest``; their sha256 (or of less, if it is short)."""
    fd = create(dest)
    try:
        digest = hashlib.sha256()
        done = 0
        while done < size:
            chunk = os.read(src, min(READ, size - done))
            if not chunk:
                break
            digest.update(chunk)
            write_all(fd, chunk)
            done += len(chunk)
        return digest.hexdigest()
    finally:
        os.close(fd)


class StoreDirs:
    """Store directories kept open while many of their files are copied (one lookup per
    file then, not a directory open and close each), shared by threads; `close` after."""

    def __init__(self) -> None:
        self._fds: dict[bytes, int] = {}
        self._lock = threading.Lock()

    def fd(self, path: bytes) -> int:
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                fd = os.open(path, DIR_FLAGS)
                self._fds[path] = fd
            return fd

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


class Throttle:
    """A bound on bytes a second, shared by threads: ``take(n)`` waits its turn."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self._lock = threading.Lock()
        self._next = time.monotonic()  # when the bytes taken so far are paid for

    def take(self, size: int) -> None:
        with self._lock:
            now = time.monotonic()
            start = max(self._next, now)
            self._next = start + size / self.rate
        if start > now:
            time.sleep(start - now)


#: A background copy gives way while its small files take this many times as long as
#: usual (and `BUSY_MARGIN` s more): the NAS, or this node, is busy with other work.
SLOWER = 3.0
BUSY_MARGIN = 0.002
#: Files under this size measure the NAS's answer time (a bigger one, its bandwidth).
PROBE_MAX = 64 << 10
#: How long it gives way: this many times what the recent files took, at most `PAUSE_MAX` s.
PAUSE_FACTOR = 8.0
PAUSE_MAX = 1.0
#: Files measured before any comparison; "now" is the median of the last `RECENT`.
PROBES_FIRST = 16
RECENT = 5


class GiveWay:
    """A background copy that gives way to other work, shared by its threads. After each
    small file it copied (`took`) it compares what the last few took (their median) with
    what one usually takes (the fastest fifth of all so far: a file the NAS client had
    cached does not set it); past `SLOWER` times that, the thread pauses `PAUSE_FACTOR`
    times as long. A NAS's answer time is its load: other nodes' jobs starting on it (every
    node's first run reads from it), or this node's own CPU taken by jobs. So one node's
    whole copy of an env slows others' first runs little. (LEDBAT, RFC 6817, does the same
    for background transfers on a network: it backs off as the delay it sees rises above
    the lowest it has seen.)"""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._all: list[float] = []  # sorted
        self._recent: deque[float] = deque(maxlen=RECENT)
        self.pauses = 0  # times it gave way

    def took(self, seconds: float) -> float:
        """A small file took ``seconds`` to copy: pause here if the NAS is busy; the pause."""
        with self._lock:
            bisect.insort(self._all, seconds)
            self._recent.append(seconds)
            if len(self._all) < PROBES_FIRST:
                return 0.0
            usual = self._all[len(self._all) // 5]
            now = sorted(self._recent)[len(self._recent) // 2]
            if now <= max(SLOWER * usual, usual + BUSY_MARGIN):
                return 0.0
            self.pauses += 1
        pause = min(PAUSE_FACTOR * now, PAUSE_MAX)
        time.sleep(pause)
        return pause


def read_straight(fd: int) -> None:
    """Tell the kernel a store file is read straight through: the NAS client doubles its
    read-ahead, the same bytes come in half the requests (nas-sim, like FUSE: 256 KB
    instead of 128 KB)."""
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)


def create(path: str | Path) -> int:
    """A new file at ``path`` in ``objects/<xx>/`` (made if missing: not a mkdir per file),
    opened for writing."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    try:
        return os.open(path, flags, 0o600)
    except FileNotFoundError:
        with contextlib.suppress(FileExistsError):
            os.mkdir(os.path.dirname(path))
        return os.open(path, flags, 0o600)


def beside(target: _P) -> _P:
    """Where an object is written before it is put in place (beside it: one rename), named
    apart from any other writer's (this process's count, its pid for other processes)."""
    head, name = os.path.split(target)
    path = os.path.join(head, f".{name}.{os.getpid()}.{next(_STAGED)}")
    return Path(path) if isinstance(target, Path) else path


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def opener_of(source: bytes, dirs: StoreDirs | None) -> Callable[[], int]:
    """Opens the store file ``source`` (through ``dirs``' descriptor of its directory)."""
    dirname, _, name = source.rpartition(b"/")

    def opener() -> int:
        dfd = dirs.fd(dirname) if dirs is not None else None
        return os.open(name if dfd is not None else source, FILE_FLAGS, dir_fd=dfd)

    return opener
