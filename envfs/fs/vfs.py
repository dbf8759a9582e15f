"""The envfs namespace in plain Python: inodes, views and cached snapshot trees (no pyfuse3).

Layout::

    /                          workflow names (Catalog.workflows) and ``.snapshots``
    /<wf>/                     node names (Catalog.nodes)
    /<wf>/<node>/...           the current revision's snapshot
    /<wf>/<node>@<rev>/...     a pinned revision (lookup-only)
    /.snapshots/<id>/...       a built snapshot by id (lookup-only)

A *view* is one of the three ways to reach a snapshot.  Every view has its own directory inodes
(Linux cannot show one directory under two parents), but regular files are one inode per
content (sha256 and mode) and symlinks one per target, so a file shared by many envs (hardlinked
in the store, or just identical) is one inode to the kernel, and one copy in its page cache.
The snapshot metadata directory ``.envfs`` is hidden.

Snapshots are immutable and every one carries a manifest (``.envfs/manifest.json``) that lists
each entry with its type, mode, size, digest and link target.  The first access inside a
snapshot reads that one file (through `envfs.store.files.read_listing`: the store owns the format,
the namespace parses nothing); from then on lookups, listings, attributes and link targets are
answered from memory, for every view of it, without touching the store.  Methods that may need
store I/O take ``io``: with ``io=False`` (the event loop) they raise `WouldBlock` instead of
touching the disk, and the caller repeats the call in a worker thread with ``io=True``.  Binding
lookups that name an unbuilt snapshot raise `NeedsBuild`; the caller builds it
(`envfs.node.builds.BuildQueue`), reports the path with `Namespace.note_built` and asks again.
Mutations of the tables happen under one lock, never held across I/O.

Past 500 lines, on purpose: `Namespace` answers every lookup, listing and attribute from
tables it shares under that lock. Its inodes (`envfs.fs.inodes`) and the cost of missing
names (`envfs.fs.misses`) are apart already; split out the next concern that grows.
"""

from __future__ import annotations

import os
import re
import stat
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from envfs.core.names import parse_revision
from envfs.core.views import BindingView
from envfs.fs.attached import Attachments
from envfs.fs.catalog import Catalog
from envfs.fs.grants import Grants
from envfs.fs.inodes import (
    CACHE_LONG,
    CACHE_NONE,
    CACHE_SHORT,
    ROOT_INODE,
    SNAPSHOTS_INODE,
    SNAPSHOTS_NAME,
    Attr,
    NeedsBuild,
    View,
    WouldBlock,
    _Backing,
    _clone,
    _decode_name,
    _Dir,
    _dir_attr,
    _File,
    _load_tree,
    _Node,
    _synthetic_dir,
    _tree_attr,
    _Workflow,
)
from envfs.fs.misses import Misses
from envfs.fs.nowait import blocking_is_cheap
from envfs.store.files import ListingEntry

#: The interpreter's executable in a snapshot's ``bin/`` (served pinned in current views).
_INTERPRETER = re.compile(rb"^python3\.\d+t?$")
#: A snapshot id as the CLI prints it (12 hex digits) or any prefix of 12 to 63 of them.
_SHORT_ID = re.compile(r"^[0-9a-f]{12,63}$")


K = TypeVar("K")


class Namespace(Grants, Attachments):
    """Inode table and lookups for one mount.  Thread-safe; see the module docstring."""

    def __init__(
        self,
        catalog: Catalog,
        *,
        clock: Callable[[], float] = time.monotonic,
        local_copy: Callable[[str], os.PathLike[str] | None] | None = None,
    ) -> None:
        self._catalog = catalog
        self._local_copy = local_copy  # the node cache's copy of a snapshot, if any
        self._clock = clock
        self._lock = threading.Lock()
        now_ns = time.time_ns()
        self._now_ns = now_ns
        self._inodes: dict[int, _Node] = {
            ROOT_INODE: _Dir(_synthetic_dir(ROOT_INODE, now_ns), ROOT_INODE),
            SNAPSHOTS_INODE: _Dir(_synthetic_dir(SNAPSHOTS_INODE, now_ns), ROOT_INODE),
        }
        self._next_ino = SNAPSHOTS_INODE + 1
        self._workflows: dict[str, int] = {}
        self._views: dict[tuple[str, str, str, str | int], int] = {}
        self._roots: dict[str, _Backing] = {}  # snapshot id -> backing root directory
        #: called (in the thread about to read it) before a snapshot's manifest is loaded
        self.on_loading: Callable[[str], None] | None = None
        self._files: dict[tuple[str | None, int], _File] = {}  # (sha256 or target, mode) -> file
        self._built: dict[str, bytes] = {}  # snapshot id -> dir, from builds this process ran
        self._misses = Misses(clock, self._lock)
        self._negative = self._misses.negative  # (wf, node) -> expiry
        self._placeholders: dict[tuple[str, str], int] = {}  # (wf, node) -> inode
        self.lookups = 0
        self.cold = 0
        self.store_lookups = 0
        self._view_attaches = 0

    # -- queries --------------------------------------------------------------------------

    def getattr(self, ino: int) -> Attr | None:
        node = self._inodes.get(ino)
        return None if node is None else self._granted(node)

    def inode_count(self) -> int:
        return len(self._inodes)

    def is_binding_level(self, ino: int) -> bool:
        """True for directories whose entries are bindings (short, changing answers)."""
        return ino in (ROOT_INODE, SNAPSHOTS_INODE) or isinstance(self._inodes.get(ino), _Workflow)

    def is_dir(self, ino: int) -> bool:
        return isinstance(self._inodes.get(ino), _Dir | _Workflow)

    def file_path(self, ino: int) -> bytes | None:
        """The backing path of a regular file or symlink inode."""
        node = self._inodes.get(ino)
        return node.path if isinstance(node, _File) else None

    def remote_file(self, ino: int) -> tuple[bytes, ListingEntry] | None:
        """A regular file served from a store that is not cheap to read (a NAS): its
        path there and its manifest entry (its content's sha256); None for any other."""
        node = self._inodes.get(ino)
        if not isinstance(node, _File) or node.target is not None:
            return None
        backing = node.parent
        if backing.tree.blocking_is_cheap:
            return None
        entry = backing.tree.listing.get(backing.rel, {}).get(node.name)
        if entry is None or entry.type != "file" or entry.sha256 is None:
            return None
        return backing.path + b"/" + node.name, entry

    def blocking_is_cheap(self, ino: int) -> bool:
        """Whether blocking reads of this file's backing may run on the event loop."""
        node = self._inodes.get(ino)
        return isinstance(node, _File) and node.parent.tree.blocking_is_cheap

    def lookup(self, parent: int, name: bytes, io: bool = False, uid: int = 0) -> Attr | None:
        """The entry ``name`` in directory ``parent``; None if there is none. ``uid`` (who
        asks) draws on its own budget of store lookups for names the index does not know."""
        if not io:
            self.lookups += 1
        try:
            node = self._inodes.get(parent)
            if isinstance(node, _Dir):
                if node.view is not None:
                    return self._lookup_in_view(node, name, io)
                if name == b".":
                    return node.attr
                if name == b"..":
                    return self._inodes[ROOT_INODE].attr
                if parent == ROOT_INODE:
                    return self._lookup_workflow(name, io, uid)
                if parent == SNAPSHOTS_INODE:
                    return self._lookup_snapshot(name, io, uid)
            elif isinstance(node, _Workflow):
                if name == b".":
                    return node.attr
                if name == b"..":
                    return self._inodes[ROOT_INODE].attr
                return self._lookup_binding(node, name, io, uid)
            return None
        except WouldBlock:
            self.cold += 1
            raise

    def readdir(self, ino: int, io: bool = False) -> list[tuple[bytes, Attr]]:
        """Entries of directory ``ino`` (without ``.``/``..``), in a stable order."""
        node = self._inodes.get(ino)
        if isinstance(node, _Workflow):
            return self._readdir_workflow(node)
        if not isinstance(node, _Dir):
            return []
        if node.view is None:
            if ino != ROOT_INODE:
                return []  # .snapshots is lookup-only
            entries = [(SNAPSHOTS_NAME, self._inodes[SNAPSHOTS_INODE].attr)]
            for wf in self._catalog.workflows():
                entries.append((wf.encode(), self._workflow_attr(wf)))
            return entries
        backing = node.backing or self._attach(node, io)
        out = []
        for name in backing.tree.listing[backing.rel]:
            attr = self._lookup_in_view(node, name, io)
            if attr is not None:
                out.append((name, attr))
        return out

    def readlink(self, ino: int) -> bytes | None:
        node = self._inodes.get(ino)
        return node.target if isinstance(node, _File) else None

    def view_of(self, ino: int) -> View | None:
        node = self._inodes.get(ino)
        return node.view if isinstance(node, _Dir) else None

    def xattrs(self, ino: int) -> dict[bytes, bytes]:
        """Extended attributes of a view's directories: snapshot id, revision, state.

        The state is ``ready`` once the snapshot is built, else ``bound`` (the adapter
        refines it with what the build queue knows: ``building`` or ``failed``).
        """
        node = self._inodes.get(ino)
        if not isinstance(node, _Dir) or node.view is None:
            return {}
        view = node.view
        ready = node.backing is not None or self._snapshot_path(view.snapshot_id) is not None
        return {
            b"user.envfs.id": view.snapshot_id.encode(),
            b"user.envfs.rev": str(view.revision).encode() if view.revision else b"",
            b"user.envfs.state": b"ready" if ready else b"bound",
            b"user.envfs.view": view.kind.encode(),
        }

    # -- updates --------------------------------------------------------------------------

    def note_built(self, snapshot_id: str, path: os.PathLike[str] | str) -> None:
        """Remember where a build this process ran put ``snapshot_id``."""
        with self._lock:
            self._built[snapshot_id] = os.fsencode(path)

    def binding_changed(self, workflow: str, node: str) -> list[tuple[int, bytes]]:
        """Forget cached answers for a binding; return the kernel entries to invalidate."""
        with self._lock:
            self._misses.forget(workflow, node)
            wf_ino = self._workflows.get(workflow)
        if wf_ino is None:
            return [(ROOT_INODE, workflow.encode())]
        return [(wf_ino, node.encode())]

    def statistics(self) -> dict[str, int]:
        files = len(self._files)
        return {
            "inodes": len(self._inodes),
            "files": files,
            "dirs": len(self._inodes) - files - len(self._workflows),
            "views": len(self._views),
            "lookups": self.lookups,
            "hits": self.lookups - self.cold,
            "cold": self.cold,
            "store_lookups": self.store_lookups,
        }

    @property
    def attach_count(self) -> int:
        """How many view roots got their snapshot (grows by one at each view's first use)."""
        return self._view_attaches

    def views(self) -> list[View]:
        out = []
        for ino in list(self._views.values()):
            view = self.view_of(ino)
            if view is not None:
                out.append(view)
        return out

    # -- binding level --------------------------------------------------------------------

    def _workflow_attr(self, wf: str) -> Attr:
        ino = self._synthetic(self._workflows, wf, CACHE_SHORT, lambda a: _Workflow(a, wf))
        return self._granted(self._inodes[ino])

    def _lookup_workflow(self, name: bytes, io: bool, uid: int) -> Attr | None:
        if name == SNAPSHOTS_NAME:
            return self._inodes[SNAPSHOTS_INODE].attr
        wf = _decode_name(name)
        if wf is None:
            return None
        if wf not in self._workflows and not self._catalog.nodes(wf):
            # bound a moment ago (before this daemon read the change): ask the store, as
            # for a new node in a known workflow, at the missing-name rate
            if self._misses.known_missing(wf, ""):
                return None
            if not io:
                raise WouldBlock
            if not self._misses.take(uid):
                return None
            self.store_lookups += 1
            if not self._catalog.workflow_in_store(wf):
                self._misses.remember(wf, "")
                return None
        return self._workflow_attr(wf)

    def _lookup_binding(self, parent: _Workflow, name: bytes, io: bool, uid: int) -> Attr | None:
        text = _decode_name(name)
        if text is None:
            return None
        wf = parent.name
        revision: int | None = None
        node = text
        if "@" in text:
            node, _, rev_text = text.rpartition("@")
            revision = parse_revision(rev_text)
            if not node or revision is None:
                return None
        binding = self._binding(wf, node, revision)
        if binding is None:
            if self._misses.known_missing(wf, node):
                return None
            if not io:
                raise WouldBlock
            if not self._misses.take(uid):
                return None  # over the rate: the index (refreshed from the store) answers
            self.store_lookups += 1
            binding = self._catalog.lookup_store(wf, node)
            if binding is not None and revision is not None:
                binding = self._catalog.at_revision(wf, node, revision)
            if binding is None:
                self._misses.remember(wf, node)
                return None
        if revision is None:
            view = View("current", binding.snapshot_id, wf, node, binding.revision)
            key: tuple[str, str, str, str | int] = ("current", wf, node, binding.snapshot_id)
        else:
            view = View("revision", binding.snapshot_id, wf, node, binding.revision)
            key = ("revision", wf, node, revision)
        cache = CACHE_SHORT if revision is None else CACHE_LONG
        return self._view_root(key, view, parent.attr.ino, io, cache)

    def _binding(self, wf: str, node: str, revision: int | None) -> BindingView | None:
        if revision is None:
            return self._catalog.current(wf, node)
        return self._catalog.at_revision(wf, node, revision)

    def _lookup_snapshot(self, name: bytes, io: bool, uid: int) -> Attr | None:
        snapshot_id = _decode_name(name)
        if snapshot_id is None:
            return None
        key: tuple[str, str, str, str | int] = ("snapshot", "", "", snapshot_id)
        alias = ""
        if key not in self._views and _SHORT_ID.match(snapshot_id):
            if not io:
                raise WouldBlock
            if not self._misses.take(uid):
                return None
            self.store_lookups += 1
            full = self._catalog.find_snapshot(snapshot_id)
            if full is None:
                return None
            alias, snapshot_id = snapshot_id, full
        if key not in self._views and self._snapshot_path(snapshot_id) is None:
            return None  # by id only what is built: a typo must not start a build
        view = View("snapshot", snapshot_id, alias=alias)
        attr = self._view_root(key, view, SNAPSHOTS_INODE, io, CACHE_LONG)
        return self._granted(self._inodes[attr.ino])

    def _snapshot_path(self, snapshot_id: str) -> bytes | None:
        path = self._built.get(snapshot_id)
        if path is not None:
            return path
        if self._local_copy is not None:
            local = self._local_copy(snapshot_id)
            if local is not None:
                return os.fsencode(local)
        found = self._catalog.snapshot_dir(snapshot_id)
        return None if found is None else os.fsencode(found)

    def _view_root(
        self,
        key: tuple[str, str, str, str | int],
        view: View,
        parent: int,
        io: bool,
        cache: int,
    ) -> Attr:
        """The root directory inode of a view; answered without I/O and without building.

        The snapshot is attached on the first lookup or listing *inside* the view (which may
        raise `NeedsBuild`): the kernel serializes lookups per directory, so blocking here
        would stall every other first access in the same workflow during a build.
        """
        ino = self._synthetic(
            self._views,
            key,
            cache,
            lambda a: _Dir(a, parent, view),  # attached by the first use inside it
        )
        return self._inodes[ino].attr

    def _attach(self, node: _Dir, io: bool) -> _Backing:
        """The snapshot behind a view root: needs the snapshot built (`NeedsBuild`) and, the
        first time, its manifest read (`WouldBlock`)."""
        assert node.view is not None
        snapshot_id = node.view.snapshot_id
        backing = self._roots.get(snapshot_id)
        if backing is None:
            path = self._snapshot_path(snapshot_id)
            if path is None:
                raise NeedsBuild(snapshot_id)
            # Mostly parsing (the GIL is held either way): a thread only helps a slow store.
            cheap = blocking_is_cheap(os.path.dirname(path))
            if not io and not cheap:
                raise WouldBlock
            if self.on_loading is not None:
                self.on_loading(snapshot_id)
            try:
                tree, attr = _load_tree(path, cheap)
            except FileNotFoundError:  # gc took it since it was let go of: build it again
                with self._lock:
                    self._built.pop(snapshot_id, None)
                raise NeedsBuild(snapshot_id) from None
            with self._lock:
                backing = self._roots.setdefault(snapshot_id, _Backing(tree, b"", attr))
        if node.backing is None:
            self._view_attaches += 1
        node.backing = backing
        return backing

    def _readdir_workflow(self, node: _Workflow) -> list[tuple[bytes, Attr]]:
        entries = []
        for name in self._catalog.nodes(node.name):
            binding = self._catalog.current(node.name, name)
            ino = None
            if binding is not None:
                ino = self._views.get(("current", node.name, name, binding.snapshot_id))
            if ino is None:  # not looked up yet: a placeholder (listing must not start builds)
                ino = self._placeholder(node.name, name)
            entries.append((name.encode(), self._inodes[ino].attr))
        return entries

    def _placeholder(self, wf: str, node: str) -> int:
        """A directory inode the kernel must not cache: its next lookup gives the real one.

        (A listing entry needs a non-zero inode: glibc's readdir skips ``d_ino == 0``.)
        """
        parent = self._workflows[wf]
        return self._synthetic(
            self._placeholders, (wf, node), CACHE_NONE, lambda a: _Dir(a, parent)
        )

    def _synthetic(
        self, table: dict[K, int], key: K, cache: int, make: Callable[[Attr], _Node]
    ) -> int:
        """The directory inode ``table[key]``, made once by ``make`` (checked again under the
        lock, so concurrent first lookups agree on one inode)."""
        ino = table.get(key)
        if ino is None:
            with self._lock:
                ino = table.get(key)
                if ino is None:
                    ino = self._alloc()
                    self._inodes[ino] = make(_synthetic_dir(ino, self._now_ns, cache))
                    table[key] = ino
        return ino

    # -- inside a snapshot ----------------------------------------------------------------

    def _lookup_in_view(self, node: _Dir, name: bytes, io: bool) -> Attr | None:
        if name == b".":
            return node.attr
        if name == b"..":
            return self._inodes[node.parent].attr
        backing = node.backing or self._attach(node, io)
        child = backing.children.get(name)
        if child is None:
            child = self._child(backing, name)
            if child is None:
                return None
        if isinstance(child, _File):
            view = node.view
            if (
                view is not None
                and view.kind == "current"
                and backing.rel == b"bin"
                and child.target is None
                and _INTERPRETER.match(name)
            ):
                return self._pinned(backing, name, view).attr
            return child.attr
        ino = node.subdirs.get(name)
        if ino is None:
            with self._lock:
                ino = node.subdirs.get(name)
                if ino is None:
                    ino = self._alloc()
                    attr = _clone(child.attr, ino, CACHE_LONG)
                    self._inodes[ino] = _Dir(attr, node.attr.ino, node.view, child)
                    node.subdirs[name] = ino
        return self._inodes[ino].attr

    def _child(self, backing: _Backing, name: bytes) -> _File | _Backing | None:
        """The entry ``name`` of a snapshot directory, made from its manifest entry once."""
        tree = backing.tree
        entry = tree.listing[backing.rel].get(name)
        if entry is None:
            return None
        kind, mode, size, sha256, target = entry
        with self._lock:
            child = backing.children.get(name)
            if child is not None:
                return child
            if kind == "dir":
                rel = backing.rel + b"/" + name if backing.rel else name
                child = _Backing(tree, rel, _dir_attr(tree, rel, mode))
            else:
                link = os.fsencode(target) if kind == "symlink" and target is not None else None
                key = (sha256, mode) if link is None else (target, stat.S_IFLNK)
                child = self._files.get(key)
                if child is not None and child.parent.tree is not tree and link is None:
                    child.others.append((backing, name))  # served from here if its first goes
                if child is None:
                    ino = self._alloc()
                    if link is None:
                        attr = _tree_attr(tree, ino, stat.S_IFREG | mode, 1, size)
                    else:
                        attr = _tree_attr(tree, ino, stat.S_IFLNK | 0o777, 1, len(link))
                    child = _File(attr, backing, name, link)
                    self._files[key] = child
                    self._inodes[ino] = child
            backing.children[name] = child
            return child

    def _pinned(self, backing: _Backing, name: bytes, view: View) -> _File:
        """``<node>/bin/python3.X`` of a current view, as a link into its pinned revision.

        Python takes its prefix from the real path of its executable, so a process started
        as ``/envs/wf/node/bin/python`` runs with ``sys.prefix`` ``/envs/wf/node@REV``: every
        later import walks that immutable view, and a rebind while it runs cannot mix two
        revisions in one process.  New processes follow the binding as before.
        """
        target = f"../../{view.node}@{view.revision}/bin/".encode() + name
        key = (os.fsdecode(target), stat.S_IFLNK)
        with self._lock:
            link = self._files.get(key)
            if link is None:
                ino = self._alloc()
                attr = _tree_attr(backing.tree, ino, stat.S_IFLNK | 0o777, 1, len(target))
                link = _File(attr, backing, name, target)
                self._files[key] = link
                self._inodes[ino] = link
        return link

    def _alloc(self) -> int:
        """A fresh inode number; call with the lock held.  Numbers are never reused."""
        ino = self._next_ino
        self._next_ino = ino + 1
        return ino
