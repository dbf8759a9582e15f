"""Store I/O that never waits: answer from the kernel's caches, or say "not now" (None).

The daemon's event loop must not block on a disk or a NAS, but a worker-thread round trip costs
more than the whole operation when the data is cached.  These helpers try the cached path
inline and return None when only a blocking call could answer; the caller then goes to a thread.

- `open_cached`: ``openat2(RESOLVE_CACHED)`` (Linux >= 5.12) fails with EAGAIN unless every path
  component is in the dentry cache and needs no revalidation (a network file system's do).
- `read_cached`: ``preadv2(RWF_NOWAIT)`` (Linux >= 4.14) fails with EAGAIN unless the page cache
  holds the data.

On older kernels, or file systems that cannot tell, both always say "not now".

When they say "not now" the data has to come from the device.  On a local disk that takes
less time than a worker-thread round trip, so `blocking_is_cheap` lets the caller read
inline there; on a network file system (the production NAS) it can take milliseconds, and a
blocked event loop would stall every other request, so there it goes to a thread.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import sys

from envfs.fs import kernel

_SYS_OPENAT2 = 437  # the same number on every Linux architecture (the generic table)
_RESOLVE_CACHED = 0x20
_AT_FDCWD = -100
_RWF_NOWAIT: int = getattr(os, "RWF_NOWAIT", 0)
#: File systems on local devices (or memory): a cold read costs about as much as a thread hop.
LOCAL_FILE_SYSTEMS = frozenset(
    {"ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "zfs", "bcachefs", "tmpfs", "ramfs"}
)
#: ``always`` or ``never`` overrides the file-system check of `blocking_is_cheap`.
INLINE_IO_ENV = "ENVFS_INLINE_IO"


class _OpenHow(ctypes.Structure):
    _fields_ = (
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    )


def _load_syscall() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    if not sys.platform.startswith("linux"):
        return None
    try:
        syscall = ctypes.CDLL(None, use_errno=True).syscall
    except (OSError, AttributeError):
        return None
    syscall.restype = ctypes.c_long
    return syscall


_syscall = _load_syscall()
_HOW = _OpenHow(os.O_RDONLY | os.O_CLOEXEC, 0, _RESOLVE_CACHED)
_HOW_SIZE = ctypes.c_size_t(ctypes.sizeof(_OpenHow))


def open_cached(path: bytes) -> int | None:
    """A read-only descriptor for ``path`` if opening it needs no I/O, else None.

    Every failure is "not now": the caller's blocking open then gives the real error.
    """
    global _syscall
    if _syscall is None:
        return None
    fd: int = _syscall(
        ctypes.c_long(_SYS_OPENAT2),
        ctypes.c_int(_AT_FDCWD),
        ctypes.c_char_p(path),
        ctypes.byref(_HOW),
        _HOW_SIZE,
    )
    if fd >= 0:
        return fd
    if ctypes.get_errno() in (errno.ENOSYS, errno.EINVAL, errno.E2BIG):
        _syscall = None  # a kernel without openat2 or RESOLVE_CACHED: stop asking
    return None


def read_cached(fd: int, off: int, size: int) -> bytes | None:
    """The bytes at ``off`` if the page cache holds all of them (or all up to the end of the
    file), else None."""
    if not _RWF_NOWAIT:
        return None
    buf = bytearray(size)
    try:
        n = os.preadv(fd, [buf], off, _RWF_NOWAIT)
    except OSError:  # EAGAIN: not cached; EOPNOTSUPP: this file system cannot say
        return None
    if n < size and (n == 0 or os.fstat(fd).st_size > off + n):
        return None  # partly cached, or a zero-byte answer we cannot tell from a miss
    return bytes(memoryview(buf)[:n])


def blocking_is_cheap(path: bytes) -> bool:
    """Whether blocking I/O under ``path`` may run on the event loop: yes on a local file system
    (`LOCAL_FILE_SYSTEMS`), no on anything else (NFS, SMB, FUSE, overlays, unknown).
    ``ENVFS_INLINE_IO=always|never`` overrides the check."""
    override = os.environ.get(INLINE_IO_ENV, "auto")
    if override in ("always", "never"):
        return override == "always"
    return file_system_type(path) in LOCAL_FILE_SYSTEMS


@functools.lru_cache(maxsize=256)
def file_system_type(path: bytes) -> str | None:
    """The type of the file system holding ``path`` (from the mount table), None if unknown.

    Cached: callers ask about a few directories (the store's), many times."""
    real = os.path.realpath(path)
    best, best_type = b"", None
    try:
        table = kernel.mount_table()
    except OSError:
        return None
    for m in table:
        inside = real == m.point or real.startswith(m.point.rstrip(b"/") + b"/")
        if inside and len(m.point) >= len(best):
            best, best_type = m.point, m.fstype
    return best_type
