"""The namespace's inodes: their numbers and attributes (`Attr`, how long the kernel may
cache each), the views of a snapshot (`View`), directories, files and workflows, and a
snapshot's tree loaded from its listing (`_load_tree`, the only I/O here)."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

from envfs.store.files import Listing, read_listing

ROOT_INODE = 1


SNAPSHOTS_INODE = 2


SNAPSHOTS_NAME = b".snapshots"


METADATA_NAME = b".envfs"


#: The mtime and ctime of everything inside a snapshot: the same on every node and every run
#: (bytecode is unchecked-hash, so no reader compares source and bytecode times).
SNAPSHOT_TIME_NS = 946_684_800 * 10**9  # 2000-01-01T00:00:00Z


_DIR_MODE = stat.S_IFDIR | 0o555


CACHE_LONG = 0


CACHE_SHORT = 1


CACHE_NONE = 2


class WouldBlock(Exception):
    """The answer needs store I/O: call the method again in a worker thread with ``io=True``."""


class NeedsBuild(Exception):
    """The binding names a snapshot that is not built yet: build it, `note_built`, ask again."""

    def __init__(self, snapshot_id: str) -> None:
        super().__init__(snapshot_id)
        self.snapshot_id = snapshot_id


@dataclass(frozen=True, slots=True)
class Attr:
    """What the kernel is told about an inode.  ``ino == 0`` means "name only, no attributes".

    ``cache`` says how long the kernel may keep the entry: `CACHE_LONG` (snapshot contents,
    immutable), `CACHE_SHORT` (binding-level names that may soon point elsewhere) or
    `CACHE_NONE` (listing placeholders for bindings not looked up yet).
    """

    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    blocks: int
    mtime_ns: int
    ctime_ns: int
    cache: int = 0


@dataclass(frozen=True, slots=True)
class View:
    """One way of reaching a snapshot: the current binding, a pinned revision, or by id."""

    kind: str  # "current" | "revision" | "snapshot"
    snapshot_id: str
    workflow: str = ""
    node: str = ""
    revision: int = 0
    alias: str = ""  # a snapshot view reached by a short id (as the CLI prints them)

    @property
    def path(self) -> str:
        """The view's path below the mountpoint."""
        if self.kind == "snapshot":
            return f".snapshots/{self.alias or self.snapshot_id}"
        if self.kind == "revision":
            return f"{self.workflow}/{self.node}@{self.revision}"
        return f"{self.workflow}/{self.node}"


@dataclass(slots=True, eq=False)
class _Tree:
    """One snapshot's entries, from its manifest, by directory: read once, shared by views."""

    path: bytes  # the snapshot directory in the store
    uid: int
    gid: int
    listing: Listing  # relative dir (b"" is the root) -> name -> entry
    blocking_is_cheap: bool  # on a local file system: see `envfs.fs.nowait.blocking_is_cheap`


@dataclass(slots=True, eq=False)
class _Backing:
    """A directory inside a snapshot, shared by every view that shows it."""

    tree: _Tree
    rel: bytes  # relative to the snapshot root, b"" for the root itself
    attr: Attr  # ino 0: each view's directory inode has its own number
    children: dict[bytes, _File | _Backing] = field(default_factory=dict)  # made on first use

    @property
    def path(self) -> bytes:
        return self.tree.path + b"/" + self.rel if self.rel else self.tree.path


@dataclass(slots=True, eq=False)
class _File:
    """A regular file or symlink: one inode per content (or link target), shared by views."""

    attr: Attr
    parent: _Backing
    name: bytes
    target: bytes | None = None  # symlink target
    #: other attached directories holding the same content (served from if ``parent`` goes)
    others: list[tuple[_Backing, bytes]] = field(default_factory=list)

    @property
    def path(self) -> bytes:
        return self.parent.path + b"/" + self.name


@dataclass(slots=True, eq=False)
class _Dir:
    """A directory inode of one view (``backing``), or a synthetic one (root, ``.snapshots``)."""

    attr: Attr
    parent: int
    view: View | None = None
    backing: _Backing | None = None
    subdirs: dict[bytes, int] = field(default_factory=dict)


@dataclass(slots=True, eq=False)
class _Workflow:
    attr: Attr
    name: str


_Node = _Dir | _File | _Workflow


def _synthetic_dir(ino: int, now_ns: int, cache: int = CACHE_LONG) -> Attr:
    return Attr(ino, _DIR_MODE, 2, 0, 0, 0, 0, 0, now_ns, now_ns, cache)


def _decode_name(name: bytes) -> str | None:
    """A user-visible binding name, or None if it cannot be one (bad UTF-8, dot, slash)."""
    if not name or name.startswith(b".") or b"/" in name or b"\0" in name:
        return None
    try:
        return name.decode()
    except UnicodeDecodeError:
        return None


def _load_tree(path: bytes, cheap: bool) -> tuple[_Tree, Attr]:
    """A built snapshot's `_Tree` (and the root directory's attributes); ``cheap``: whether
    its store may be read on the event loop."""
    st = os.stat(path)
    listing = read_listing(path)
    listing[b""].pop(METADATA_NAME, None)
    tree = _Tree(path, st.st_uid, st.st_gid, listing, cheap)
    return tree, _dir_attr(tree, b"", st.st_mode & 0o555)


def _dir_attr(tree: _Tree, rel: bytes, mode: int) -> Attr:
    """A snapshot directory's attributes (ino 0: each view numbers its own directories)."""
    subdirs = sum(e[0] == "dir" for e in tree.listing[rel].values())
    return _tree_attr(tree, 0, stat.S_IFDIR | mode, 2 + subdirs, 0)


def _tree_attr(tree: _Tree, ino: int, mode: int, nlink: int, size: int) -> Attr:
    t = SNAPSHOT_TIME_NS
    return Attr(ino, mode, nlink, tree.uid, tree.gid, 0, size, (size + 511) // 512, t, t)


def _clone(attr: Attr, ino: int, cache: int) -> Attr:
    return Attr(
        ino,
        attr.mode,
        attr.nlink,
        attr.uid,
        attr.gid,
        attr.rdev,
        attr.size,
        attr.blocks,
        attr.mtime_ns,
        attr.ctime_ns,
        cache,
    )
