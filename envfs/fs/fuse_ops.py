"""Thin pyfuse3 adapter over `vfs.Namespace`: translate requests, cache replies, never write.

Hot paths answer from memory: lookup, getattr, readdir and readlink once a snapshot's manifest
is read, and open always (the backing file is opened by the first read that needs it).  Reads
run on the event loop when that cannot stall it: always for a store on a local file system,
and on a network one when the page cache holds the data (``RWF_NOWAIT``, see
`envfs.fs.nowait`).  Anything else that needs store I/O runs in a worker thread
(`trio.to_thread`), so a slow NAS or a build never stalls other requests.

Kernel caching: snapshot contents never change, so their entries, attributes and negative
entries live long and files are opened with ``keep_cache``; binding-level names (``<wf>``,
``<node>``) get short timeouts and are invalidated actively by the daemon on change.
"""

from __future__ import annotations

import errno
import logging
import os
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from functools import wraps
from typing import Any, ParamSpec, TypeVar

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
    XAttrNameT,
)

from envfs.core.errors import EnvfsError
from envfs.fs.inodes import CACHE_LONG, CACHE_NONE, CACHE_SHORT, Attr, NeedsBuild, WouldBlock
from envfs.fs.nowait import open_cached, read_cached
from envfs.fs.vfs import Namespace
from envfs.node.builds import BuildQueue
from envfs.node.cache import PARTIAL_MIN, NodeCache
from envfs.store.files import ListingEntry, SnapshotUnreadable

log = logging.getLogger(__name__)

#: Kernel cache lifetime for snapshot contents (immutable) and binding-level names (changing).
LONG_TIMEOUT = 24 * 3600.0
SHORT_TIMEOUT = 1.0
#: Backing file descriptors kept open (least recently read closed first).
MAX_FDS = 1024

_TIMEOUTS = {CACHE_LONG: LONG_TIMEOUT, CACHE_SHORT: SHORT_TIMEOUT, CACHE_NONE: 0.0}

_P = ParamSpec("_P")
_T = TypeVar("_T")


def _guarded(
    fn: Callable[_P, Coroutine[Any, Any, _T]],
) -> Callable[_P, Coroutine[Any, Any, _T]]:
    """Turn OSError into its errno and any other unexpected error into a logged EIO.

    pyfuse3 lets a handler's non-FUSEError exception end the main loop; never do that.
    """

    @wraps(fn)
    async def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        try:
            return await fn(*args, **kwargs)
        except FUSEError:
            raise
        except EnvfsError as e:
            raise FUSEError(e.errno) from None
        except OSError as e:
            raise FUSEError(e.errno or errno.EIO) from None
        except Exception:
            log.exception("internal error in %s", fn.__name__)
            raise FUSEError(errno.EIO) from None

    return wrapper


def _erofs() -> FUSEError:
    return FUSEError(errno.EROFS)


class EnvfsOperations(pyfuse3.Operations):
    """pyfuse3 request handlers for one mount (construct with the namespace and build queue)."""

    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(
        self,
        namespace: Namespace,
        builds: BuildQueue,
        on_attach: Callable[[int], Awaitable[None]] | None = None,
        cache: NodeCache | None = None,
        on_fetch: Callable[[], None] | None = None,
    ) -> None:
        super().__init__()
        self._ns = namespace
        self._on_fetch = on_fetch  # called after a file was read into the node cache
        self._cache = cache  # files of a store on a NAS are read into it on first read
        self._local: set[int] = set()  # inodes whose descriptor is the node cache's copy
        self._on_attach = on_attach  # awaited after a request loaded a snapshot
        self._builds = builds
        self._entries: dict[int, tuple[Attr, EntryAttributes]] = {}
        self._negative_long = self._negative(LONG_TIMEOUT)
        self._negative_short = self._negative(SHORT_TIMEOUT)
        self._fds = _Descriptors(MAX_FDS)
        self._unreadable: set[str] = set()  # snapshots already logged as unreadable
        self.opens = 0
        self.reads_inline = 0
        self.reads_threaded = 0

    # -- replies --------------------------------------------------------------------------

    @staticmethod
    def _negative(timeout: float) -> EntryAttributes:
        entry = EntryAttributes()
        entry.st_ino = 0
        entry.entry_timeout = timeout
        return entry

    def _entry(self, attr: Attr) -> EntryAttributes:
        """The reply for an inode, built once per attributes (pyfuse3 copies it into each
        reply); attributes that changed (an ACL's grant, `envfs.fs.grants`) make a new one."""
        cached = self._entries.get(attr.ino)
        if cached is not None and (cached[0] is attr or cached[0] == attr):
            return cached[1]
        entry = _make_entry(attr)
        self._entries[attr.ino] = (attr, entry)
        return entry

    def statistics(self) -> dict[str, int]:
        return {
            "opens": self.opens,
            "reads_inline": self.reads_inline,
            "reads_threaded": self.reads_threaded,
            "backing_fds": len(self._fds),
        }

    # -- namespace ------------------------------------------------------------------------

    async def _resolve(self, method: Callable[[int, bool], _T], ino: int) -> _T:
        """Call a namespace method: from memory if warm, else in a thread, building if needed."""
        for _attempt in range(3):
            try:
                try:
                    return method(ino, False)
                except WouldBlock:
                    return await trio.to_thread.run_sync(method, ino, True)
            except NeedsBuild as need:
                path = await self._builds.wait_for_build(need.snapshot_id)
                self._ns.note_built(need.snapshot_id, path)
            except SnapshotUnreadable as e:
                if e.message not in self._unreadable:
                    self._unreadable.add(e.message)
                    log.error("%s", e.message)
                raise
        log.error("inode %d still needs a build after building it; giving up", ino)
        raise FUSEError(errno.EIO)

    @_guarded
    async def lookup(
        self, parent_inode: InodeT, name: FileNameT, ctx: RequestContext
    ) -> EntryAttributes:
        ns = self._ns
        attached = ns.attach_count
        uid = ctx.uid
        attr = await self._resolve(lambda ino, io: ns.lookup(ino, name, io, uid), parent_inode)
        if ns.attach_count != attached and self._on_attach is not None:
            # a view's first use, inside it (never a binding-level directory: a mount below
            # one would walk it while this request holds it)
            await self._on_attach(parent_inode)
        if attr is not None:
            return self._entry(attr)
        if ns.is_binding_level(parent_inode):
            return self._negative_short
        return self._negative_long

    @_guarded
    async def getattr(self, inode: InodeT, ctx: RequestContext) -> EntryAttributes:
        attr = self._ns.getattr(inode)
        if attr is None:
            raise FUSEError(errno.ENOENT)
        return self._entry(attr)

    @_guarded
    async def readlink(self, inode: InodeT, ctx: RequestContext) -> FileNameT:
        target = self._ns.readlink(inode)
        if target is None:
            raise FUSEError(errno.EINVAL)
        return target

    @_guarded
    async def opendir(self, inode: InodeT, ctx: RequestContext) -> FileHandleT:
        if not self._ns.is_dir(inode):
            raise FUSEError(errno.ENOTDIR)
        return inode  # listings are cached by the namespace: the handle is the inode

    @_guarded
    async def readdir(self, fh: FileHandleT, start_id: int, token: ReaddirToken) -> None:
        entries = await self._resolve(self._ns.readdir, fh)
        for index in range(start_id, len(entries)):
            name, attr = entries[index]
            if not pyfuse3.readdir_reply(token, name, self._entry(attr), index + 1):
                break

    async def releasedir(self, fh: FileHandleT) -> None:
        return None

    async def forget(self, inode_list: Sequence[tuple[InodeT, int]]) -> None:
        return None  # inodes are small and never reused: keep them

    @_guarded
    async def statfs(self, ctx: RequestContext) -> StatvfsData:
        data = StatvfsData()
        data.f_bsize = 4096
        data.f_frsize = 4096
        data.f_files = self._ns.inode_count()
        data.f_namemax = 255
        return data

    # -- files ----------------------------------------------------------------------------

    @_guarded
    async def open(self, inode: InodeT, flags: FlagT, ctx: RequestContext) -> FileInfo:
        # No store I/O here: with keep_cache, a warm file is read from the kernel's page
        # cache and its backing file is never needed.  The first read opens it.
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise _erofs()
        if self._ns.file_path(inode) is None:
            raise FUSEError(errno.EISDIR if self._ns.is_dir(inode) else errno.ENOENT)
        self.opens += 1
        return FileInfo(fh=inode, keep_cache=True)

    @_guarded
    async def read(self, fh: FileHandleT, off: int, size: int) -> bytes:
        fd = self._backing_fd(fh)
        if fd is None:
            path = self._ns.file_path(fh)
            assert path is not None  # _backing_fd checked it
            remote = self._ns.remote_file(fh) if self._cache is not None else None
            if remote is not None and remote[1].size >= PARTIAL_MIN:  # its pieces, as read
                assert self._cache is not None
                piece = self._cache.read_here(remote[1], off, size)  # here: no thread for it
                if piece is not None:
                    self.reads_inline += 1
                    return piece
                piece = await trio.to_thread.run_sync(self._read_range, *remote, off, size)
                if piece is not None:
                    self.reads_threaded += 1
                    return piece
            if remote is not None:
                path = await trio.to_thread.run_sync(self._fetch, *remote)
            self.reads_threaded += 1
            new_fd, data = await trio.to_thread.run_sync(_open_and_read, path, off, size)
            self._fds.add(fh, new_fd)
            if remote is not None and path != remote[0]:
                self._local.add(fh)
                if self._on_fetch is not None:
                    self._on_fetch()
            return data
        try:
            inline = self._read_inline(fd, fh, off, size)
            if inline is not None:
                self.reads_inline += 1
                return inline
            self.reads_threaded += 1
            return await trio.to_thread.run_sync(os.pread, fd, size, off)
        finally:
            self._fds.release(fh)

    def _backing_fd(self, inode: int) -> int | None:
        """The backing file's descriptor, acquired (`_Descriptors.release` it), or None if
        opening it needs a worker thread."""
        fd = self._fds.acquire(inode)
        if fd is not None:
            return fd
        path = self._ns.file_path(inode)
        if path is None:
            raise FUSEError(errno.EBADF)
        cache = self._cache
        remote = self._ns.remote_file(inode) if cache is not None else None
        if cache is not None and remote is not None:  # the node's copy, or None: `read`
            local = cache.object_path(remote[1])  # copies it in a thread
            if local is None:
                return None
            cache.opened()  # a job reads the env in: whole copies wait
            self._local.add(inode)
            return self._fds.add(inode, os.open(local, os.O_RDONLY | os.O_CLOEXEC), busy=True)
        opened = open_cached(path)
        if opened is None and self._ns.blocking_is_cheap(inode):
            opened = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        if opened is None:
            return None
        return self._fds.add(inode, opened, busy=True)

    def _read_inline(self, fd: int, inode: int, off: int, size: int) -> bytes | None:
        """The bytes, read on the event loop if that cannot stall it, else None."""
        if inode in self._local or self._ns.blocking_is_cheap(inode):
            return os.pread(fd, size, off)
        return read_cached(fd, off, size)

    def _fetch(self, path: bytes, entry: ListingEntry) -> bytes:
        """In a worker thread: the node cache's copy of a store file, copied now if the
        node lacks its content; the store's own path if it cannot be (read there, as
        before: `envfs verify` names a store file that does not match its manifest)."""
        assert self._cache is not None
        try:
            return os.fsencode(self._cache.fetch(entry, path))
        except (OSError, EnvfsError) as e:
            log.warning("serving %s from the store: %s", os.fsdecode(path), e)
            return path

    def _read_range(self, path: bytes, entry: ListingEntry, off: int, size: int) -> bytes | None:
        """In a worker thread: bytes of a big store file the node does not hold whole yet,
        only the pieces they lie in fetched; None: open it whole (held now, or its copy was
        refused: `_fetch` then serves it from the store)."""
        assert self._cache is not None
        try:
            return self._cache.read_range(entry, path, off, size)
        except (OSError, EnvfsError) as e:
            log.warning("serving %s from the store: %s", os.fsdecode(path), e)
            return None

    async def release(self, fh: FileHandleT) -> None:
        return None  # backing descriptors outlive opens: see `_Descriptors`

    async def flush(self, fh: FileHandleT) -> None:
        # Nothing to flush on a read-only filesystem. ENOSYS (not success) makes the kernel
        # stop sending FLUSH altogether: one synchronous round trip less on every close().
        raise FUSEError(errno.ENOSYS)

    def close_all(self) -> None:
        """Close every cached descriptor (after the main loop has ended)."""
        self._fds.close_all()

    def backing_moved(self) -> None:
        """Snapshots are served from new paths (the node cache): reopen files there."""
        self._fds.invalidate()
        self._local.clear()

    # -- extended attributes --------------------------------------------------------------

    @_guarded
    async def getxattr(self, inode: InodeT, name: XAttrNameT, ctx: RequestContext) -> bytes:
        value = self._ns.xattrs(inode).get(name)
        if value is None:
            raise FUSEError(pyfuse3.ENOATTR)
        if name == b"user.envfs.state" and value == b"bound":
            view = self._ns.view_of(inode)
            assert view is not None
            return self._builds.state(view.snapshot_id).encode()
        return value

    @_guarded
    async def listxattr(self, inode: InodeT, ctx: RequestContext) -> Sequence[XAttrNameT]:
        return list(self._ns.xattrs(inode))

    # -- everything that would change something: read-only file system --------------------

    async def setxattr(
        self, inode: InodeT, name: XAttrNameT, value: bytes, ctx: RequestContext
    ) -> None:
        raise _erofs()

    async def removexattr(self, inode: InodeT, name: XAttrNameT, ctx: RequestContext) -> None:
        raise _erofs()

    async def setattr(
        self,
        inode: InodeT,
        attr: EntryAttributes,
        fields: SetattrFields,
        fh: FileHandleT | None,
        ctx: RequestContext,
    ) -> EntryAttributes:
        raise _erofs()

    async def write(self, fh: FileHandleT, off: int, buf: bytes) -> int:
        raise _erofs()

    async def create(
        self, parent_inode: InodeT, name: FileNameT, mode: ModeT, flags: FlagT, ctx: RequestContext
    ) -> tuple[FileInfo, EntryAttributes]:
        raise _erofs()

    async def mknod(
        self, parent_inode: InodeT, name: FileNameT, mode: ModeT, rdev: int, ctx: RequestContext
    ) -> EntryAttributes:
        raise _erofs()

    async def mkdir(
        self, parent_inode: InodeT, name: FileNameT, mode: ModeT, ctx: RequestContext
    ) -> EntryAttributes:
        raise _erofs()

    async def unlink(self, parent_inode: InodeT, name: FileNameT, ctx: RequestContext) -> None:
        raise _erofs()

    async def rmdir(self, parent_inode: InodeT, name: FileNameT, ctx: RequestContext) -> None:
        raise _erofs()

    async def symlink(
        self, parent_inode: InodeT, name: FileNameT, target: FileNameT, ctx: RequestContext
    ) -> EntryAttributes:
        raise _erofs()

    async def rename(
        self,
        parent_inode_old: InodeT,
        name_old: FileNameT,
        parent_inode_new: InodeT,
        name_new: FileNameT,
        flags: FlagT,
        ctx: RequestContext,
    ) -> None:
        raise _erofs()

    async def link(
        self, inode: InodeT, new_parent_inode: InodeT, new_name: FileNameT, ctx: RequestContext
    ) -> EntryAttributes:
        raise _erofs()


class _Descriptors:
    """Backing file descriptors by inode, least recently used closed first beyond ``limit``.

    A descriptor is shared by every open of its inode and outlives them (a file read again
    later needs no new open); one in use by a read in a worker thread is never closed.
    Used from the event loop only.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._fds: OrderedDict[int, int] = OrderedDict()  # inode -> fd
        self._busy: dict[int, int] = {}  # inode -> reads in progress
        self._retired: list[int] = []  # forgotten while a read used them

    def __len__(self) -> int:
        return len(self._fds)

    def acquire(self, ino: int) -> int | None:
        fd = self._fds.get(ino)
        if fd is not None:
            self._fds.move_to_end(ino)
            self._busy[ino] = self._busy.get(ino, 0) + 1
        return fd

    def release(self, ino: int) -> None:
        left = self._busy[ino] - 1
        if left:
            self._busy[ino] = left
        else:
            del self._busy[ino]

    def invalidate(self) -> None:
        """Forget every descriptor: idle ones are closed, ones a read in flight uses are
        closed with the rest at `close_all` (a handful at most)."""
        for ino, fd in self._fds.items():
            if ino in self._busy:
                self._retired.append(fd)
            else:
                os.close(fd)
        self._fds.clear()

    def add(self, ino: int, fd: int, busy: bool = False) -> int:
        """Keep ``fd`` for ``ino`` (and `acquire` it if ``busy``); returns the one kept."""
        other = self._fds.get(ino)
        if other is not None:  # a concurrent first read got there first
            os.close(fd)
            fd = other
        self._fds[ino] = fd
        if busy:
            self.acquire(ino)
        while len(self._fds) > self._limit:
            # the least recently used one not in use (busy ones are few: reads in flight)
            idle = next((i for i in self._fds if i not in self._busy), None)
            if idle is None:
                break
            os.close(self._fds.pop(idle))
        return fd

    def close_all(self) -> None:
        for fd in [*self._fds.values(), *self._retired]:
            os.close(fd)
        self._fds.clear()
        self._busy.clear()
        self._retired.clear()


def _open_and_read(path: bytes, off: int, size: int) -> tuple[int, bytes]:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return fd, os.pread(fd, size, off)
    except BaseException:
        os.close(fd)
        raise


def _make_entry(attr: Attr) -> EntryAttributes:
    entry = EntryAttributes()
    entry.st_ino = attr.ino
    entry.generation = 0
    timeout = _TIMEOUTS[attr.cache]
    entry.entry_timeout = timeout
    entry.attr_timeout = timeout
    entry.st_mode = attr.mode
    entry.st_nlink = attr.nlink
    entry.st_uid = attr.uid
    entry.st_gid = attr.gid
    entry.st_rdev = attr.rdev
    entry.st_size = attr.size
    entry.st_blksize = 4096
    entry.st_blocks = attr.blocks
    entry.st_atime_ns = attr.mtime_ns
    entry.st_mtime_ns = attr.mtime_ns
    entry.st_ctime_ns = attr.ctime_ns
    return entry
