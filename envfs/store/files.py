"""Trees on disk: walking, copying, removing and making read-only the files of a snapshot,
and reading a snapshot's listing from its manifest (what the namespace serves)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import pydantic

from envfs.core.errors import EnvironmentProblem
from envfs.store.formats import AccessTrace, PackIndex

_M = TypeVar("_M", bound=pydantic.BaseModel)

META = ".envfs"  # metadata directory inside a snapshot (manifest, build log); not served


def make_private(path: Path) -> None:
    """Take group and other permissions off a directory of ours: the store's lock and lease
    directories, a node's index (made before they were private, they are fixed on next use)."""
    st = os.stat(path)
    if st.st_mode & 0o077 and st.st_uid == os.geteuid():
        os.chmod(path, stat.S_IMODE(st.st_mode) & 0o700)


def private_dir(path: Path) -> None:
    """Make ``path`` (and its parents) if missing, readable by its owner only: what a node
    keeps for itself (status files, daemon logs, the node cache)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    make_private(path)


def pid_start_time(pid: int) -> int:
    """The start time of a process (clock ticks since boot), 0 if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return 0
    return int(data.rsplit(b")", 1)[1].split()[19])


def regular_files(root: Path) -> Iterator[tuple[Path, os.stat_result]]:
    """Every regular file under ``root`` with its ``lstat`` (links are not followed)."""
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            path = Path(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                yield path, st


def _copy_file_data(src: Path, dest: Path, mode: int) -> None:
    """Copy one file's bytes into a new file ``dest`` with ``mode``."""
    with open(src, "rb") as fin:
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            size = os.fstat(fin.fileno()).st_size
            sent = 0
            while sent < size:
                n = os.sendfile(fd, fin.fileno(), sent, size - sent)
                if n == 0:
                    break
                sent += n
            os.fchmod(fd, mode)
        finally:
            os.close(fd)


def remove_unshared(root: Path) -> int:
    """Delete the files under ``root`` that nothing else links (a content pool's objects
    no tree uses any more); how many."""
    count = 0
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            if os.lstat(path).st_nlink == 1:
                os.unlink(path)
                count += 1
    return count


def make_read_only(root: Path) -> None:
    """Drop write permission on every file and directory under ``root`` (bottom-up)."""
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames + dirnames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if not stat.S_ISLNK(st.st_mode) and st.st_mode & 0o222:
                os.chmod(p, stat.S_IMODE(st.st_mode) & ~0o222)
    st = os.lstat(root)
    os.chmod(root, stat.S_IMODE(st.st_mode) & ~0o222)


def remove_tree(root: Path) -> None:
    """Delete a (possibly read-only) tree."""

    def onerror(func: Callable[..., Any], path: str, exc: object) -> None:
        parent = os.path.dirname(path)
        with contextlib.suppress(OSError):
            os.chmod(parent, 0o755)
        if os.path.isdir(path) and not os.path.islink(path):
            with contextlib.suppress(OSError):
                os.chmod(path, 0o755)
        func(path)

    if root.is_dir() and not root.is_symlink():
        os.chmod(root, 0o755)
        shutil.rmtree(root, onerror=onerror)
    elif root.exists() or root.is_symlink():
        root.unlink()


class SnapshotUnreadable(EnvironmentProblem):
    """A built snapshot whose manifest cannot be read or makes no sense (EIO to a reader)."""


class ListingEntry(NamedTuple):
    """One manifest entry as readers of a snapshot keep it."""

    type: str  # "file", "dir" or "symlink"
    mode: int
    size: int
    sha256: str | None
    target: str | None  # a symlink's target


#: A snapshot's entries by directory: relative dir (b"" is the root) -> name -> entry.
Listing = dict[bytes, dict[bytes, ListingEntry]]


def fixed_tarinfo(
    name: str, kind: bytes, mode: int, size: int = 0, linkname: str = ""
) -> tarfile.TarInfo:
    """A tar header that says nothing of when or by whom (mtime 0, owner 0:0, no names):
    what bundles, image layers and archives are written with, so that the same content
    always gives the same bytes."""
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode, ti.size, ti.linkname = kind, mode, size, linkname
    ti.mtime = ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    return ti


def read_trace(snapshot_path: bytes) -> AccessTrace | None:
    """A built snapshot's access trace (`AccessTrace`), or None: none recorded, or not
    readable (a damaged one is ignored: serving works without it)."""
    return _read_meta(snapshot_path, "trace.json", AccessTrace)


def _read_meta(snapshot_path: bytes, name: str, model: type[_M]) -> _M | None:
    """``.envfs/<name>`` of a snapshot as ``model``, or None if missing or not readable."""
    try:
        with open(snapshot_path + f"/{META}/{name}".encode(), "rb") as f:
            return model.model_validate_json(f.read())
    except (OSError, pydantic.ValidationError):
        return None


#: Where a snapshot's packs are, under its ``.envfs/`` (`PackIndex`).
PACKS = "packs"


def read_packs(snapshot_path: bytes) -> PackIndex | None:
    """A built snapshot's pack index (`PackIndex`), or None: none written, or not readable
    (a damaged one is ignored: a fresh node copies the files one by one)."""
    return _read_meta(snapshot_path, "packs.json", PackIndex)


def pack_file(snapshot_path: bytes, sha256: str) -> bytes:
    """The path of one of a snapshot's packs."""
    return snapshot_path + f"/{META}/{PACKS}/{sha256}.pack".encode()


def read_listing(snapshot_path: bytes) -> Listing:
    """A built snapshot's manifest, by directory (`Manifest` is the format; this reader
    skips pydantic because it is on the path of a first access to thousands of entries).

    Raises `SnapshotUnreadable` if the manifest is missing or does not make sense.
    """
    manifest = snapshot_path + b"/" + META.encode() + b"/manifest.json"
    try:
        with open(manifest, "rb") as f:
            files = json.loads(f.read())["files"]
        listing: Listing = {b"": {}}
        for e in files:
            rel = os.fsencode(e["path"])
            parent, _, name = rel.rpartition(b"/")
            kind = e["type"]
            listing.setdefault(parent, {})[name] = ListingEntry(
                kind, e["mode"], e["size"], e["sha256"], e["target"]
            )
            if kind == "dir":
                listing.setdefault(rel, {})
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SnapshotUnreadable(
            f"snapshot {os.fsdecode(snapshot_path)}: unreadable manifest "
            f"({type(e).__name__}: {e}); run `envfs verify`"
        ) from e
    return listing
