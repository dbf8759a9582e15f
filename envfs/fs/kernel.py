"""Kernel-served views: read-only bind mounts of built snapshots placed on their pinned
views inside the FUSE mount (``/envs/wf/node@REV``, ``/envs/.snapshots/<id>``), and, on a
fresh node until a snapshot's whole copy is in, read-only overlays of what the node holds
and of the image of the snapshot's names over the FUSE view itself (`overlay_read_only`,
`image_mounted`, `envfs.node.early`, `envfs.node.erofs`).

FUSE stays the namespace, the build trigger and the fallback; once a pinned view's snapshot
is built and its tree loaded, the daemon binds the snapshot directory read-only (``nosuid``,
``nodev``) onto the view, and from then on the kernel serves every lookup, open and read
below it with no daemon round trip.  A process started from ``/envs/wf/node/bin/python``
runs from ``node@REV`` (see `envfs.fs.vfs`), so its imports are kernel-served too.

This module owns the mount syscalls and the reading of ``/proc/self/mountinfo``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_REMOUNT = 32
MS_BIND = 4096
MNT_DETACH = 2
# the new mount API (Linux 5.2; the same numbers on every architecture)
_SYS_FSOPEN, _SYS_FSCONFIG, _SYS_FSMOUNT = 430, 431, 432
_FSOPEN_CLOEXEC = _FSMOUNT_CLOEXEC = 1
_FSCONFIG_SET_STRING, _FSCONFIG_CMD_CREATE = 1, 6

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_void_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.syscall.restype = ctypes.c_long


def _check(result: int, what: str, path: bytes) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", os.fsdecode(path))


def bind_read_only(source: os.PathLike[str] | str, target: os.PathLike[str] | str) -> None:
    """Bind ``source`` onto ``target`` read-only (two steps: Linux ignores ``MS_RDONLY`` on
    the bind itself).  Raises `OSError` (``EPERM`` without CAP_SYS_ADMIN) with nothing left
    mounted.

    The whole snapshot directory is bound, so a kernel view also shows the snapshot's
    ``.envfs`` (manifest and build log, read-only), which FUSE views hide; hiding it would
    take a second mount per view.
    """
    src, dst = os.fsencode(source), os.fsencode(target)
    _check(_libc.mount(src, dst, None, MS_BIND, None), "bind mount", dst)
    flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV
    try:
        _check(_libc.mount(None, dst, None, flags, None), "read-only remount", dst)
    except OSError:
        detach(dst)
        raise


def overlay_read_only(
    layers: Sequence[os.PathLike[str] | str],
    target: os.PathLike[str] | str,
    data: Sequence[os.PathLike[str] | str] = (),
) -> None:
    """Mount a read-only overlay of ``layers`` (the uppermost first) on ``target``: a name
    is served by the first layer that has it, directories are merged (overlayfs, no upper
    layer: nothing can be written). ``data``: data-only layers below them, whose files are
    reached only through the metacopy stubs of the layers above (`envfs.node.erofs`).
    ``target`` may itself be the lowest layer: overlayfs takes its layers before the mount
    covers them. Raises `OSError` with nothing mounted (EINVAL for a layer whose path
    overlayfs cannot be given: one with ``:``, ``,`` or ``\\`` in it, or data-only layers
    on a kernel without them, before 6.5)."""
    paths = [os.fsencode(os.path.abspath(layer)) for layer in layers]
    below = [os.fsencode(os.path.abspath(layer)) for layer in data]
    dst = os.fsencode(target)
    if any(c in path for path in paths + below for c in (b":", b",", b"\\")):
        raise OSError(
            errno.EINVAL, "overlay: a layer's path has ':', ',' or '\\'", os.fsdecode(dst)
        )
    options = b"lowerdir=" + b":".join(paths)
    if below:
        options += b"::" + b"::".join(below) + b",metacopy=on,redirect_dir=follow"
    flags = MS_RDONLY | MS_NOSUID | MS_NODEV
    _check(
        _libc.mount(b"overlay", dst, b"overlay", flags, ctypes.c_char_p(options)),
        "overlay mount",
        dst,
    )


@contextlib.contextmanager
def image_mounted(image: os.PathLike[str] | str) -> Iterator[str]:
    """An EROFS image mounted read-only where no one sees it (a detached mount: the new
    mount API), as a path a mount call in this process can name as a layer
    (``/proc/self/fd/N``); an overlay given it keeps its own reference, so it is let go of
    on leaving. Raises `OSError` with nothing mounted."""
    src = os.fsencode(image)
    fs = _syscall(_SYS_FSOPEN, b"erofs", _FSOPEN_CLOEXEC)
    try:
        _syscall(_SYS_FSCONFIG, fs, _FSCONFIG_SET_STRING, b"source", src, 0)
        _syscall(_SYS_FSCONFIG, fs, _FSCONFIG_CMD_CREATE, None, None, 0)
        fd = _syscall(_SYS_FSMOUNT, fs, _FSMOUNT_CLOEXEC, MS_RDONLY | MS_NOSUID | MS_NODEV)
    except OSError as e:
        raise OSError(e.errno, f"erofs mount: {e.strerror}", os.fsdecode(src)) from None
    finally:
        os.close(fs)
    try:
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def _syscall(number: int, *args: int | bytes | None) -> int:
    """A raw system call (numbers as ``long``: syscall(2) takes its arguments that way)."""
    raw = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
    result = int(_libc.syscall(ctypes.c_long(number), *raw))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def detach(target: os.PathLike[str] | str | bytes) -> bool:
    """Detach the mount at ``target`` and every mount below it (lazily: users keep what they
    have open); False if nothing is mounted there."""
    dst = os.fsencode(target)
    if _libc.umount2(dst, MNT_DETACH) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOENT):
        return False
    raise OSError(err, f"unmount: {os.strerror(err)}", os.fsdecode(dst))


def unmount_unused(target: os.PathLike[str] | str | bytes) -> bool:
    """Unmount the mount at ``target`` unless something uses it (an open file, a working
    directory, a running program, a mount below it): False then (EBUSY). True if it is
    gone, or was not mounted."""
    dst = os.fsencode(target)
    if _libc.umount2(dst, 0) == 0:
        return True
    err = ctypes.get_errno()
    if err == errno.EBUSY:
        return False
    if err in (errno.EINVAL, errno.ENOENT):
        return True
    raise OSError(err, f"unmount: {os.strerror(err)}", os.fsdecode(dst))


_OCTAL_ESCAPE = re.compile(rb"\\([0-7]{3})")  # mountinfo writes " " as "\040"


@dataclass(frozen=True, slots=True)
class MountEntry:
    """One line of ``/proc/self/mountinfo``."""

    point: bytes  # where it is mounted
    fstype: str  # e.g. "ext4", "fuse.envfs"
    shared: bool = False  # in a peer group: mounts below it propagate to its peers
    owner: int | None = None  # a FUSE mount's user_id= (who mounted it), else None


def mount_table() -> list[MountEntry]:
    """This mount namespace's mounts, in mount order (a later one covers an earlier one)."""
    table = []
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split()
            try:
                sep = fields.index(b"-", 6)
            except ValueError:
                continue
            point = _OCTAL_ESCAPE.sub(lambda m: bytes([int(m[1], 8)]), fields[4])
            shared = any(f.startswith(b"shared:") for f in fields[6:sep])
            options = fields[sep + 3].split(b",") if len(fields) > sep + 3 else []
            owner = next((int(o[8:]) for o in options if o.startswith(b"user_id=")), None)
            fstype = fields[sep + 1].decode(errors="replace")
            table.append(MountEntry(point, fstype, shared, owner))
    return table


def mounts_under(root: Path) -> list[Path]:
    """Mount points strictly below ``root`` in this mount namespace, deepest first."""
    prefix = os.fsencode(root).rstrip(b"/") + b"/"
    found = [Path(os.fsdecode(m.point)) for m in mount_table() if m.point.startswith(prefix)]
    return sorted(found, key=lambda p: len(p.parts), reverse=True)
