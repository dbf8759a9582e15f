"""What no process uses any more (`envfs mount --idle-release`): the views processes on this
node are in, have open, have mapped or run from (`views_in_use`, from ``/proc``), and how long
each attached snapshot has gone unused (`IdleClock`).

A daemon lets go of a snapshot unused for the idle time (`envfs.fs.attached.Attachments.release`,
its lease removed), so gc may take it; a process still running on an old revision keeps it.
Processes in another mount namespace that see the mount at another path (a container that
bind-mounts ``/envs`` elsewhere) are seen through their kernel mounts' busy state and their
open files only: a kernel-served view is never detached while busy (`envfs.fs.kernel`).
"""

from __future__ import annotations

import contextlib
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path

#: What in ``/proc/<pid>`` names files a process uses.
_LINKS = ("cwd", "root", "exe")


def views_in_use(mountpoint: Path, entered_only: bool = False) -> set[str]:
    """The views (``wf/node``, ``wf/node@REV``, ``.snapshots/ID``: the first two components
    below ``mountpoint``) that some process is in, has open or mapped, or runs from.
    ``entered_only``: only working directories, roots and open directories (a process
    walking a view: a mount placed on it then would make ``..`` from below it land on the
    mount, and walkers such as ``find`` see the tree change under them). A program running
    from a view, or a file open or mapped there, is not in the way of a mount: it keeps the
    file it has, and its next lookups go through the mount."""
    prefix = os.fsencode(mountpoint).rstrip(b"/") + b"/"
    found: set[str] = set()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            proc = f"/proc/{pid}".encode()
            paths = _walking(proc, prefix) if entered_only else _paths_of(proc)
            for path in paths:
                if path.startswith(prefix):
                    parts = path[len(prefix) :].split(b"/", 2)
                    found.add(os.fsdecode(b"/".join(parts[:2])))
    return found


def _walking(proc: bytes, prefix: bytes) -> list[bytes]:
    """The directories below ``prefix`` a process is in or has open: its cwd, its root, its
    descriptors onto directories."""
    paths = _links(proc, ("cwd", "root"))
    for fd, path in _open(proc):
        with contextlib.suppress(OSError):
            if path.startswith(prefix) and stat.S_ISDIR(os.stat(fd).st_mode):
                paths.append(path)
    return paths


def _paths_of(proc: bytes) -> list[bytes]:
    """The files ``/proc/<pid>`` says a process uses: cwd, root, exe, open files, mappings."""
    paths = _links(proc, _LINKS) + [path for _fd, path in _open(proc)]
    with contextlib.suppress(OSError), open(proc + b"/maps", "rb") as f:
        for line in f:
            fields = line.split(None, 5)
            if len(fields) == 6:
                paths.append(fields[5].rstrip(b"\n"))
    return paths


def _links(proc: bytes, names: tuple[str, ...]) -> list[bytes]:
    paths = []
    for name in names:
        with contextlib.suppress(OSError):
            paths.append(os.readlink(proc + b"/" + name.encode()))
    return paths


def _open(proc: bytes) -> list[tuple[bytes, bytes]]:
    """A process's open descriptors: each one's /proc path and what it names."""
    try:
        fds = os.listdir(proc + b"/fd")
    except OSError:
        return []
    found = []
    for fd in fds:
        with contextlib.suppress(OSError):
            found.append((proc + b"/fd/" + fd, os.readlink(proc + b"/fd/" + fd)))
    return found


class IdleClock:
    """How long each candidate snapshot has been unused; which ones are past ``idle_after``."""

    def __init__(self, idle_after: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.idle_after = idle_after
        self._clock = clock
        self._since: dict[str, float] = {}  # snapshot id -> when it was last seen in use

    def idle(self, candidates: dict[str, list[str]], in_use: set[str]) -> list[str]:
        """The candidates (snapshot id -> its view paths) unused for ``idle_after``."""
        now = self._clock()
        self._since = {sid: t for sid, t in self._since.items() if sid in candidates}
        out = []
        for sid, paths in sorted(candidates.items()):
            if any(p in in_use for p in paths) or sid not in self._since:
                self._since[sid] = now
            elif now - self._since[sid] >= self.idle_after:
                out.append(sid)
        return out

    def busy(self, snapshot_id: str) -> None:
        """Found in use after all (a kernel mount that would not go): start again."""
        self._since[snapshot_id] = self._clock()

    def forget(self, snapshot_id: str) -> None:
        self._since.pop(snapshot_id, None)
