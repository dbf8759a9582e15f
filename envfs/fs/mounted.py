"""Mounts seen from outside a daemon: whether a path is an envfs mount and whether it is
stale, who may unmount it and how, who uses it, a daemon's status file and whether it is
alive, and the live mount of a store on this node."""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import time
from pathlib import Path

import pydantic

from envfs.core.errors import BadInput, EnvironmentProblem
from envfs.fs import kernel
from envfs.fs.status import DaemonStatus
from envfs.store.files import pid_start_time

log = logging.getLogger(__name__)


def is_stale_mount(path: Path) -> bool:
    """True if ``path`` is a FUSE mount whose daemon is gone (ENOTCONN).

    The kernel keeps answering ``stat`` of the mountpoint itself from cached attributes after
    the daemon died, so this also looks up a name that cannot be cached: that needs the daemon.
    """
    probe = os.path.join(path, f".envfs-probe-{os.getpid()}-{time.monotonic_ns()}")
    try:
        os.stat(path)
        os.stat(probe)
    except FileNotFoundError:
        return False
    except OSError as e:
        return e.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    return False


def mount_type(mountpoint: Path) -> str | None:
    """The file-system type mounted at ``mountpoint`` (the topmost), from mountinfo."""
    target = os.fsencode(os.path.abspath(mountpoint))
    types = [m.fstype for m in kernel.mount_table() if m.point == target]
    return types[-1] if types else None


def check_may_unmount(mountpoint: Path) -> None:
    """Refuse, in words, a user who did not mount the FUSE file system at ``mountpoint``
    (its ``user_id=``) and is not root: fusermount3 would say "entry not found in mtab"."""
    target = os.fsencode(os.path.abspath(mountpoint))
    owners = [m.owner for m in kernel.mount_table() if m.point == target]
    owner = owners[-1] if owners else None
    if os.geteuid() != 0 and owner is not None and owner != os.geteuid():
        raise EnvironmentProblem(
            f"permission denied: {mountpoint} was mounted by uid {owner}; only that user "
            "or root can unmount it"
        )


def unmount(mountpoint: Path) -> None:
    """Unmount envfs at ``mountpoint``: ``fusermount3 -u``, then a lazy ``-u -z`` if busy.

    Refuses anything that is not an envfs mount (an operator's typo must not unmount a
    tmpfs or a NAS).
    """
    kind = mount_type(mountpoint)
    if kind != "fuse.envfs":
        raise BadInput(f"{mountpoint} is a {kind or 'not a'} mount, not envfs's; not unmounting it")
    check_may_unmount(mountpoint)
    first = subprocess.run(
        ["fusermount3", "-u", str(mountpoint)], capture_output=True, text=True, check=False
    )
    if first.returncode == 0:
        return
    lazy = subprocess.run(
        ["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True, text=True, check=False
    )
    if lazy.returncode != 0:
        reason = (lazy.stderr or first.stderr).strip()
        raise EnvironmentProblem(f"cannot unmount {mountpoint}: {reason}")


def users_of(mountpoint: Path, ignore: set[int]) -> list[int]:
    """Processes using anything under ``mountpoint`` (working or root directory, executable,
    open files, mapped files), as ``fuser -m`` finds them; pids in ``ignore`` aside."""
    prefix = os.fspath(mountpoint).rstrip("/") + "/"
    root = os.fspath(mountpoint)

    def inside(path: str) -> bool:
        return path == root or path.startswith(prefix)

    users = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in ignore:
            continue
        base = f"/proc/{name}"
        try:
            links = [os.readlink(f"{base}/{link}") for link in ("cwd", "root", "exe")]
            links += [os.readlink(f"{base}/fd/{fd}") for fd in os.listdir(f"{base}/fd")]
            with open(f"{base}/maps") as maps:
                links += [line.split(None, 5)[-1].strip() for line in maps if "/" in line]
        except OSError:  # gone, or not ours to look at
            continue
        if any(inside(link) for link in links):
            users.append(int(name))
    return users


def read_status(status_path: Path) -> DaemonStatus | None:
    """The status a daemon last wrote, or None if there is no readable status file."""
    try:
        return DaemonStatus.model_validate_json(status_path.read_bytes())
    except (OSError, pydantic.ValidationError):
        return None


def daemon_alive(status: DaemonStatus) -> bool:
    """Whether the daemon that wrote ``status`` still runs (not just some process that was
    given its pid since: the pid's start time must match too)."""
    if not status.pid_start:  # written before the start time was recorded
        return pid_start_time(status.pid) != 0
    return pid_start_time(status.pid) == status.pid_start


def live_mount_of(store: Path) -> Path | None:
    """Where a live daemon on this node serves ``store`` (from the daemons' status files)."""
    from envfs.core.config import runtime_dir

    wanted = str(store.resolve())
    for path in sorted((runtime_dir() / "mounts").glob("*.json")):
        status = read_status(path)
        if status is not None and status.store == wanted and daemon_alive(status):
            return Path(status.mountpoint)
    return None


def prepare_mountpoint(mountpoint: Path) -> None:
    """Make ``mountpoint`` ready for a new mount: a stale one (its daemon died) removed, a
    live one refused in one line."""
    if is_stale_mount(mountpoint):
        log.warning("removing the stale mount at %s (its daemon died)", mountpoint)
        unmount(mountpoint)
    elif os.path.ismount(mountpoint):
        raise EnvironmentProblem(
            f"{mountpoint} is already a mount point: run `envfs umount {mountpoint}` first"
        )
    mountpoint.mkdir(parents=True, exist_ok=True)
