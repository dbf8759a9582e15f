"""nas-sim: a stand-in for an NFS export, for tests and benchmarks.

    scripts/nas-sim BACKING MOUNTPOINT [--latency-ms MS] [--counts FILE]

Mounts a read-write FUSE passthrough of directory BACKING at MOUNTPOINT and serves it in the
foreground until SIGTERM or SIGINT (then unmounts and exits 0).  Prints ``ready`` to stdout
once mounted.  Like a NAS it is slow and uncached:

- every request waits MS milliseconds (default 1.0) before it is served (0: no wait; the
  event loop's timers have ~1 ms granularity, so smaller waits last about 1 ms);
- the kernel caches no attributes (timeout 0) and files are opened without ``keep_cache``,
  so every stat and open is a round trip (NFS close-to-open); names are cached for
  ``--entry-timeout`` seconds (default 1; 0: every path walk is a round trip per component),
  as an NFS client caches them;
- permissions are checked by nas-sim on open and access (mode bits; root may do anything),
  as an NFS server does, not by the kernel on every directory walked;
- inode numbers are the backing ones, so hardlinks share an inode through the mount.

Signals:
    SIGUSR1  toggle an outage: while it lasts every request fails with EIO (after the latency);
             logs ``outage on`` / ``outage off`` to stderr
    SIGUSR2  print the request counts by operation, and the bytes read and written
             (``read_bytes``, ``write_bytes``: not requests), as one JSON object line to
             stderr (and rewrite --counts FILE atomically); done at exit too
    SIGTERM, SIGINT  unmount and exit 0

BACKING must be one file system (its inode numbers are passed through).  Extended attributes
are not supported (the kernel then answers EOPNOTSUPP, as NFSv3 does); flock and POSIX locks
are kept by the local kernel.  Change BACKING through the mount only: changes made behind its
back are noticed when the changed name is next looked up, not before.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import json
import logging
import os
import signal
import stat
import sys
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from functools import wraps
from typing import Any, Concatenate, ParamSpec, TypeVar

import pyfuse3
import trio
from pyfuse3 import (
    EntryAttributes,
    FileHandleT,
    FileInfo,
    FileNameT,
    FlagT,
    FUSEError,
    InodeT,
    ModeT,
    ReaddirToken,
    RequestContext,
    SetattrFields,
    StatvfsData,
)

log = logging.getLogger("nas-sim")

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)
ROOT = pyfuse3.ROOT_INODE
AT_FDCWD = -100
_libc = ctypes.CDLL(None, use_errno=True)

_P = ParamSpec("_P")
_T = TypeVar("_T")
_Handler = Callable[Concatenate["NasSim", _P], Coroutine[Any, Any, _T]]


def _op(*, always: bool = False) -> Callable[[_Handler[_P, _T]], _Handler[_P, _T]]:
    """Count a request, delay it, fail it in an outage, and turn errors into FUSEError.

    ``always``: bookkeeping the kernel does not retry (release, forget) is done even in an
    outage, or our tables would leak.
    """

    def decorate(fn: _Handler[_P, _T]) -> _Handler[_P, _T]:
        name = fn.__name__

        @wraps(fn)
        async def wrapper(self: NasSim, /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
            self.counts[name] += 1
            if self.latency > 0:
                await trio.sleep(self.latency)
            if self.outage and not always:
                raise FUSEError(errno.EIO)
            try:
                return await fn(self, *args, **kwargs)
            except FUSEError:
                raise
            except OSError as e:
                raise FUSEError(e.errno or errno.EIO) from None
            except Exception:  # pyfuse3 would end the main loop: never let that happen
                log.exception("internal error in %s", name)
                raise FUSEError(errno.EIO) from None

        return wrapper

    return decorate


@dataclass(eq=False)
class Node:
    """An inode the kernel knows (or a directory on the way to one): its names and users."""

    lookups: int = 0  # the kernel's lookup count (forget brings it to 0)
    links: set[tuple[int, bytes]] = field(default_factory=set)  # (parent inode, name)
    children: int = 0  # links of other nodes naming this one as their parent
    fds: set[int] = field(default_factory=set)  # open file handles (backing fds)


@dataclass(eq=False)
class DirHandle:
    inode: int
    names: list[bytes] = field(default_factory=list)


def _renameat2(old: bytes, new: bytes, flags: int) -> None:
    if _libc.renameat2(AT_FDCWD, old, AT_FDCWD, new, ctypes.c_uint(flags)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class NasSim(pyfuse3.Operations):
    """Passthrough of ``backing``.  Inodes map to names as (parent inode, name) links, so
    renaming a directory moves everything below it without touching the table."""

    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(self, backing: str, latency: float, entry_timeout: float = 1.0) -> None:
        super().__init__()
        self.entry_timeout = entry_timeout
        self.root = os.fsencode(backing)
        st = os.lstat(self.root)
        self.dev, self.root_ino = st.st_dev, st.st_ino
        self.latency = latency
        self.outage = False
        self.counts: Counter[str] = Counter()
        self.nodes: dict[int, Node] = {ROOT: Node(lookups=1)}
        self.entries: dict[tuple[int, bytes], int] = {}  # (parent, name) -> inode
        self.open_files: dict[int, int] = {}  # file handle -> inode
        self.dirs: dict[int, DirHandle] = {}
        self.next_dir = 1
        self.chown = os.geteuid() == 0

    # -- the inode table ------------------------------------------------------------------

    def _ino(self, st: os.stat_result) -> int:
        """FUSE inode of a backing inode: the same number, the root swapped with ROOT_INODE."""
        if st.st_dev != self.dev:
            raise FUSEError(errno.EXDEV)  # another file system below BACKING: numbers clash
        if st.st_ino == self.root_ino:
            return ROOT
        return self.root_ino if st.st_ino == ROOT else st.st_ino

    def _node(self, inode: int) -> Node:
        node = self.nodes.get(inode)
        if node is None:
            raise FUSEError(errno.ESTALE)
        return node

    def _path(self, inode: int) -> bytes:
        names: list[bytes] = []
        while inode != ROOT:
            node = self._node(inode)
            if not node.links:
                raise FUSEError(errno.ENOENT)  # unlinked
            inode, name = next(iter(node.links))  # any of a hardlinked file's names will do
            names.append(name)
        return os.path.join(self.root, *reversed(names))

    def _child(self, parent: int, name: bytes) -> bytes:
        return os.path.join(self._path(parent), name)

    def _link(self, inode: int, parent: int, name: bytes) -> None:
        old = self.entries.get((parent, name))
        if old == inode:
            return
        self.entries[(parent, name)] = inode
        self.nodes[inode].links.add((parent, name))
        self.nodes[parent].children += 1
        if old is not None:
            self._unlink(old, parent, name, entry_replaced=True)

    def _unlink(self, inode: int, parent: int, name: bytes, entry_replaced: bool = False) -> None:
        node = self.nodes[inode]
        node.links.discard((parent, name))
        if not entry_replaced:
            del self.entries[(parent, name)]
        self.nodes[parent].children -= 1
        self._maybe_free(parent)
        self._maybe_free(inode)

    def _unlink_name(self, parent: int, name: bytes) -> None:
        inode = self.entries.get((parent, name))
        if inode is not None:
            self._unlink(inode, parent, name)

    def _maybe_free(self, inode: int) -> None:
        node = self.nodes.get(inode)
        if node is None or inode == ROOT or node.lookups > 0 or node.children or node.fds:
            return
        del self.nodes[inode]
        for parent, name in node.links:
            del self.entries[(parent, name)]
            self.nodes[parent].children -= 1
            self._maybe_free(parent)

    def _learn(self, parent: int, name: bytes, st: os.stat_result) -> EntryAttributes:
        """The kernel now knows ``name`` in ``parent`` (one more lookup of its inode)."""
        attr = self._attr(st)
        node = self.nodes.setdefault(attr.st_ino, Node())
        node.lookups += 1
        self._link(attr.st_ino, parent, name)
        if stat.S_ISDIR(st.st_mode):  # a directory has one name: others are stale
            for link in node.links - {(parent, name)}:
                self._unlink(attr.st_ino, *link)
        return attr

    def _attr(self, st: os.stat_result) -> EntryAttributes:
        attr = EntryAttributes()
        attr.st_ino = self._ino(st)
        attr.generation = 0
        attr.entry_timeout = self.entry_timeout
        attr.attr_timeout = 0
        attr.st_mode = st.st_mode
        attr.st_nlink = st.st_nlink
        attr.st_uid = st.st_uid
        attr.st_gid = st.st_gid
        attr.st_rdev = st.st_rdev
        attr.st_size = st.st_size
        attr.st_blksize = st.st_blksize
        attr.st_blocks = st.st_blocks
        attr.st_atime_ns = st.st_atime_ns
        attr.st_mtime_ns = st.st_mtime_ns
        attr.st_ctime_ns = st.st_ctime_ns
        return attr

    def _stat(self, inode: int) -> os.stat_result:
        node = self._node(inode)
        if node.fds and (inode == ROOT or not node.links):
            return os.fstat(next(iter(node.fds)))
        return os.lstat(self._path(inode))

    def _created(self, parent: int, name: bytes, ctx: RequestContext) -> EntryAttributes:
        """Give a new entry to the caller (as an NFS server would) and learn it."""
        path = self._child(parent, name)
        if self.chown:
            parent_setgid = os.lstat(self._path(parent)).st_mode & stat.S_ISGID
            os.chown(path, ctx.uid, -1 if parent_setgid else ctx.gid, follow_symlinks=False)
        return self._learn(parent, name, os.lstat(path))

    # -- requests -------------------------------------------------------------------------

    @_op()
    async def lookup(
        self, parent_inode: InodeT, name: FileNameT, ctx: RequestContext
    ) -> EntryAttributes:
        try:
            st = os.lstat(self._child(parent_inode, name))
        except FileNotFoundError:
            self._unlink_name(parent_inode, name)  # removed behind our back
            raise
        return self._learn(parent_inode, name, st)

    @_op(always=True)
    async def forget(self, inode_list: Sequence[tuple[InodeT, int]]) -> None:
        for inode, nlookup in inode_list:
            node = self.nodes.get(inode)
            if node is not None:
                node.lookups -= nlookup
                self._maybe_free(inode)

    @_op()
    async def getattr(self, inode: InodeT, ctx: RequestContext) -> EntryAttributes:
        return self._attr(self._stat(inode))

    @_op()
    async def setattr(
        self,
        inode: InodeT,
        attr: EntryAttributes,
        fields: SetattrFields,
        fh: FileHandleT | None,
        ctx: RequestContext,
    ) -> EntryAttributes:
        node = self._node(inode)
        target: int | bytes
        if fh is not None:
            target = fh
        elif node.links or inode == ROOT or not node.fds:
            target = self._path(inode)
        else:
            target = next(iter(node.fds))  # unlinked but open
        old = os.fstat(target) if isinstance(target, int) else os.lstat(target)
        # chown/utime of a symlink change the link itself (the kernel never opens one)
        follow = isinstance(target, int) or not stat.S_ISLNK(old.st_mode)
        if fields.update_size:
            os.truncate(target, attr.st_size)
        if fields.update_mode:
            if not follow:
                raise FUSEError(errno.EOPNOTSUPP)
            os.chmod(target, stat.S_IMODE(attr.st_mode))
        if fields.update_uid or fields.update_gid:
            uid = attr.st_uid if fields.update_uid else -1
            gid = attr.st_gid if fields.update_gid else -1
            os.chown(target, uid, gid, follow_symlinks=follow)
        if fields.update_atime or fields.update_mtime:
            atime = attr.st_atime_ns if fields.update_atime else old.st_atime_ns
            mtime = attr.st_mtime_ns if fields.update_mtime else old.st_mtime_ns
            os.utime(target, ns=(atime, mtime), follow_symlinks=follow)
        return self._attr(self._stat(inode))

    @_op()
    async def readlink(self, inode: InodeT, ctx: RequestContext) -> FileNameT:
        return os.readlink(self._path(inode))

    @_op()
    async def mknod(
        self, parent_inode: InodeT, name: FileNameT, mode: ModeT, rdev: int, ctx: RequestContext
    ) -> EntryAttributes:
        os.mknod(self._child(parent_inode, name), mode, rdev)
        return self._created(parent_inode, name, ctx)

    @_op()
    async def mkdir(
        self, parent_inode: InodeT, name: FileNameT, mode: ModeT, ctx: RequestContext
    ) -> EntryAttributes:
        os.mkdir(self._child(parent_inode, name), stat.S_IMODE(mode))
        return self._created(parent_inode, name, ctx)

    @_op()
    async def symlink(
        self, parent_inode: InodeT, name: FileNameT, target: FileNameT, ctx: RequestContext
    ) -> EntryAttributes:
        os.symlink(target, self._child(parent_inode, name))
        return self._created(parent_inode, name, ctx)

    @_op()
    async def link(
        self, inode: InodeT, new_parent_inode: InodeT, new_name: FileNameT, ctx: RequestContext
    ) -> EntryAttributes:
        path = self._child(new_parent_inode, new_name)
        os.link(self._path(inode), path, follow_symlinks=False)
        return self._learn(new_parent_inode, new_name, os.lstat(path))

    @_op()
    async def unlink(self, parent_inode: InodeT, name: FileNameT, ctx: RequestContext) -> None:
        os.unlink(self._child(parent_inode, name))
        self._unlink_name(parent_inode, name)

    @_op()
    async def rmdir(self, parent_inode: InodeT, name: FileNameT, ctx: RequestContext) -> None:
        os.rmdir(self._child(parent_inode, name))
        self._unlink_name(parent_inode, name)

    @_op()
    async def rename(
        self,
        parent_inode_old: InodeT,
        name_old: FileNameT,
        parent_inode_new: InodeT,
        name_new: FileNameT,
        flags: FlagT,
        ctx: RequestContext,
    ) -> None:
        old, new = (parent_inode_old, name_old), (parent_inode_new, name_new)
        old_path, new_path = self._child(*old), self._child(*new)
        if flags:
            _renameat2(old_path, new_path, flags)
        else:
            os.rename(old_path, new_path)
        moved, replaced = self.entries.get(old), self.entries.get(new)
        if old == new or (moved is not None and moved == replaced):
            return  # renaming a file onto itself (or a hardlink of itself) changes nothing
        if flags & pyfuse3.RENAME_EXCHANGE:  # links made before old ones go: nodes stay
            if moved is not None:
                self._link(moved, *new)
            if replaced is not None:
                self._link(replaced, *old)
            if moved is not None and replaced is None:
                self._unlink(moved, *old)
            if replaced is not None and moved is None:
                self._unlink(replaced, *new)
            return
        if moved is None:
            self._unlink_name(*new)
            return
        self._link(moved, *new)  # before unlinking the old name, so the node stays
        self._unlink(moved, *old)

    @_op()
    async def open(self, inode: InodeT, flags: FlagT, ctx: RequestContext) -> FileInfo:
        path = self._path(inode)
        want = {os.O_RDONLY: 4, os.O_WRONLY: 2, os.O_RDWR: 6}[flags & os.O_ACCMODE]
        if not _permitted(os.lstat(path), ctx, want):
            raise FUSEError(errno.EACCES)
        fd = os.open(path, flags & ~os.O_NOFOLLOW)
        return self._opened(inode, fd)

    def _opened(self, inode: int, fd: int) -> FileInfo:
        self.nodes[inode].fds.add(fd)
        self.open_files[fd] = inode
        return FileInfo(fh=fd, keep_cache=False, direct_io=False)

    @_op()
    async def create(
        self, parent_inode: InodeT, name: FileNameT, mode: ModeT, flags: FlagT, ctx: RequestContext
    ) -> tuple[FileInfo, EntryAttributes]:
        fd = os.open(self._child(parent_inode, name), flags | os.O_CREAT, stat.S_IMODE(mode))
        try:
            attr = self._created(parent_inode, name, ctx)
        except BaseException:
            os.close(fd)
            raise
        return self._opened(attr.st_ino, fd), attr

    @_op()
    async def read(self, fh: FileHandleT, off: int, size: int) -> bytes:
        data = os.pread(fh, size, off)
        self.counts["read_bytes"] += len(data)
        return data

    @_op()
    async def write(self, fh: FileHandleT, off: int, buf: bytes) -> int:
        written = os.pwrite(fh, buf, off)
        self.counts["write_bytes"] += written
        return written

    @_op()
    async def flush(self, fh: FileHandleT) -> None:
        pass  # writes went to the backing file already

    @_op()
    async def fsync(self, fh: FileHandleT, datasync: bool) -> None:
        (os.fdatasync if datasync else os.fsync)(fh)

    @_op(always=True)
    async def release(self, fh: FileHandleT) -> None:
        inode = self.open_files.pop(fh)
        self.nodes[inode].fds.discard(fh)
        os.close(fh)
        self._maybe_free(inode)

    @_op()
    async def opendir(self, inode: InodeT, ctx: RequestContext) -> FileHandleT:
        self._node(inode)
        fh, self.next_dir = self.next_dir, self.next_dir + 1
        self.dirs[fh] = DirHandle(inode)
        return fh

    @_op()
    async def readdir(self, fh: FileHandleT, start_id: int, token: ReaddirToken) -> None:
        handle = self.dirs[fh]
        path = self._path(handle.inode)
        if start_id == 0:  # the listing stays fixed until the directory is rewound
            handle.names = sorted(os.listdir(path))
        for i in range(start_id, len(handle.names)):
            name = handle.names[i]
            try:
                st = os.lstat(os.path.join(path, name))
            except FileNotFoundError:
                continue
            if not pyfuse3.readdir_reply(token, name, self._attr(st), i + 1):
                break
            self._learn(handle.inode, name, st)

    @_op(always=True)
    async def releasedir(self, fh: FileHandleT) -> None:
        del self.dirs[fh]

    @_op()
    async def fsyncdir(self, fh: FileHandleT, datasync: bool) -> None:
        fd = os.open(self._path(self.dirs[fh].inode), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    @_op()
    async def statfs(self, ctx: RequestContext) -> StatvfsData:
        st = os.statvfs(self.root)
        data = StatvfsData()
        for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files"):
            setattr(data, name, getattr(st, name))
        data.f_ffree, data.f_favail, data.f_namemax = st.f_ffree, st.f_favail, st.f_namemax
        return data

    @_op()
    async def access(self, inode: InodeT, mode: ModeT, ctx: RequestContext) -> bool:
        return _permitted(os.lstat(self._path(inode)), ctx, mode & 7)

    # -- control --------------------------------------------------------------------------

    def report(self, counts_path: str | None) -> None:
        line = json.dumps(dict(sorted(self.counts.items())))
        print(line, file=sys.stderr, flush=True)
        if counts_path is not None:
            tmp = f"{counts_path}.tmp.{os.getpid()}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            with open(fd, "w") as f:
                f.write(line + "\n")
            os.replace(tmp, counts_path)


async def _watch_signals(
    sim: NasSim, counts_path: str | None, *, task_status: trio.TaskStatus[None]
) -> None:
    with trio.open_signal_receiver(*SIGNALS) as signals:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)  # ones that came early arrive now
        print("ready", flush=True)
        task_status.started()
        async for signum in signals:
            if signum == signal.SIGUSR1:
                sim.outage = not sim.outage
                log.warning("outage %s", "on" if sim.outage else "off")
            elif signum == signal.SIGUSR2:
                sim.report(counts_path)
            else:
                log.warning("%s: unmounting", signal.Signals(signum).name)
                pyfuse3.terminate()


async def _serve(sim: NasSim, counts_path: str | None) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(_watch_signals, sim, counts_path)
        await pyfuse3.main(min_tasks=4, max_tasks=200)
        nursery.cancel_scope.cancel()


def _permitted(st: os.stat_result, ctx: RequestContext, want: int) -> bool:
    """The server-side permission check of an NFS export (mode bits; root may do anything)."""
    if ctx.uid == 0:
        return True
    if st.st_uid == ctx.uid:
        bits = st.st_mode >> 6
    elif st.st_gid == ctx.gid:
        bits = st.st_mode >> 3
    else:
        bits = st.st_mode
    return bits & want & 7 == want


def _allow_other() -> bool:
    if os.geteuid() == 0:
        return True
    try:
        with open("/etc/fuse.conf") as f:
            return any(line.strip() == "user_allow_other" for line in f)
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="nas-sim", description="A slow, uncached FUSE passthrough standing in for NFS."
    )
    parser.add_argument("backing", help="directory to serve")
    parser.add_argument("mountpoint", help="where to mount it")
    parser.add_argument("--latency-ms", type=float, default=1.0, help="delay of every request")
    parser.add_argument("--counts", metavar="FILE", help="where SIGUSR2 and exit write counts")
    parser.add_argument(
        "--entry-timeout",
        type=float,
        default=1.0,
        help="seconds the kernel may cache a name (NFS caches names, not attributes)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="nas-sim: %(message)s")
    backing = os.path.realpath(args.backing)
    if not os.path.isdir(backing):
        parser.error(f"not a directory: {args.backing}")
    sim = NasSim(backing, max(args.latency_ms, 0.0) / 1000, max(args.entry_timeout, 0.0))
    # no default_permissions: with uncached attributes the kernel would fetch them for every
    # directory of every path walked; like an NFS server, nas-sim checks opens itself
    options = {"fsname=nas-sim", "subtype=nas-sim"}
    if _allow_other():
        options.add("allow_other")
    os.umask(0)  # modes arrive masked by the client's umask already
    # signals wait (blocked) until their receiver is installed: a SIGTERM right after the
    # mount appears must not kill us and leave a dead mount behind
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        pyfuse3.init(sim, args.mountpoint, options)
    except RuntimeError as e:
        log.error("cannot mount at %s: %s", args.mountpoint, e)
        return 1
    try:
        trio.run(_serve, sim, args.counts)
    finally:
        pyfuse3.close(unmount=True)
        sim.report(args.counts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
