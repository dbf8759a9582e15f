"""The snapshots a namespace has attached (their trees loaded): what they are, where they are
served from, which pinned views the kernel may serve, and letting go of one no process uses
(`Attachments.release`), so that gc may take it. `envfs.fs.vfs.Namespace` is one."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

from envfs.fs.inodes import View, _Backing, _Dir, _File, _load_tree, _Node
from envfs.fs.nowait import blocking_is_cheap
from envfs.store.files import Listing, SnapshotUnreadable


class Attachments:
    """The attached snapshots of a `Namespace` (whose tables these are)."""

    _lock: threading.Lock
    _roots: dict[str, _Backing]  # snapshot id -> backing root directory
    _views: dict[tuple[str, str, str, str | int], int]
    _inodes: dict[int, _Node]
    _files: dict[tuple[str | None, int], _File]
    #: whether a view may be kernel-served (`envfs.fs.grants.Grants.kernel_allowed`):
    #: declared, not defined, so whichever base defines it wins in any order
    kernel_allowed: Callable[[View], bool]

    def _snapshot_path(self, snapshot_id: str) -> bytes | None:
        raise NotImplementedError

    def attached_snapshots(self) -> list[str]:
        """Snapshots whose tree this namespace has loaded (it may serve their files)."""
        with self._lock:
            return list(self._roots)

    def preload(self, snapshot_id: str) -> bool:
        """Load a built snapshot's tree ahead of any access (False if it is not built or not
        readable), so that its first access costs no manifest parse."""
        if snapshot_id in self._roots:
            return False
        path = self._snapshot_path(snapshot_id)
        if path is None:
            return False
        try:
            tree, attr = _load_tree(path, blocking_is_cheap(os.path.dirname(path)))
        except (OSError, SnapshotUnreadable):
            return False
        with self._lock:
            self._roots.setdefault(snapshot_id, _Backing(tree, b"", attr))
        return True

    def remote_tree(self, snapshot_id: str) -> tuple[bytes, Listing, tuple[int, int]] | None:
        """Where an attached snapshot served from a NAS (not a local disk) is, its entries,
        and the owner (uid, gid) its files are given; None for any other."""
        backing = self._roots.get(snapshot_id)
        if backing is None or backing.tree.blocking_is_cheap:
            return None
        tree = backing.tree
        return tree.path, tree.listing, (tree.uid, tree.gid)

    def snapshot_source(self, snapshot_id: str) -> bytes | None:
        """The directory an attached snapshot is served from, or None if not attached."""
        backing = self._roots.get(snapshot_id)
        return None if backing is None else backing.tree.path

    def relocate(self, snapshot_id: str, path: os.PathLike[str]) -> None:
        """Serve an attached snapshot from ``path`` from now on (a complete copy of it: the
        node cache's); files already open stay open where they are."""
        raw = os.fsencode(path)
        cheap = blocking_is_cheap(os.path.dirname(raw))
        with self._lock:
            backing = self._roots.get(snapshot_id)
            if backing is not None:
                backing.tree.path = raw
                backing.tree.blocking_is_cheap = cheap

    def kernel_candidates(self) -> list[tuple[View, bytes, int | None]]:
        """Pinned views the daemon may hand to the kernel (`envfs.fs.kernel`), with the directory
        their snapshot is served from and their root inode (None: not looked up yet).

        Those are the pinned views (a revision, a snapshot by id) whose snapshot tree is
        loaded, and the revision view behind each loaded current view: a process started
        from ``wf/node/bin/python`` is about to run from ``wf/node@REV``.
        """
        out: dict[str, tuple[View, bytes, int | None]] = {}
        with self._lock:
            for ino in self._views.values():
                node = self._inodes[ino]
                view = node.view if isinstance(node, _Dir) else None
                backing = self._roots.get(view.snapshot_id) if view is not None else None
                if view is None or backing is None or view.alias:
                    continue  # a short id is FUSE's: one kernel mount per name, canonical only
                if not self.kernel_allowed(view):
                    continue  # a restricted snapshot's id view keeps the bits FUSE shows
                if view.kind == "current":
                    pinned = View("revision", view.snapshot_id, view.workflow, view.node,
                                  view.revision)  # fmt: skip
                    rev_key = ("revision", view.workflow, view.node, view.revision)
                    out.setdefault(
                        pinned.path, (pinned, backing.tree.path, self._views.get(rev_key))
                    )
                else:
                    out[view.path] = (view, backing.tree.path, ino)
        return list(out.values())

    def view_paths(self, snapshot_id: str) -> list[str]:
        """The paths (below the mountpoint) of every view of a snapshot looked up so far,
        and the pinned revision view behind each current one."""
        with self._lock:
            views = [
                node.view
                for ino in self._views.values()
                if isinstance(node := self._inodes[ino], _Dir)
                and node.view is not None
                and node.view.snapshot_id == snapshot_id
            ]
        paths = {v.path for v in views}
        paths |= {f"{v.workflow}/{v.node}@{v.revision}" for v in views if v.kind == "current"}
        return sorted(paths)

    def release(self, snapshot_id: str) -> list[tuple[int, bytes]]:
        """Let go of an attached snapshot no process uses: its tree is dropped, every file
        it showed first is served from now on through another attached snapshot that holds
        it (or forgotten), and its views are reset, so that a later use attaches it again
        (rebuilding it if gc took it meanwhile). Returns the kernel entries to invalidate:
        the roots of its views. The caller makes sure nothing uses it (no open file, no
        working directory, no kernel mount)."""
        with self._lock:
            backing = self._roots.pop(snapshot_id, None)
            if backing is None:
                return []
            tree = backing.tree
            for key, file in list(self._files.items()):
                file.others = [o for o in file.others if o[0].tree is not tree]
                if file.parent.tree is not tree or file.target is not None:
                    continue
                if file.others:  # the same content in an attached snapshot: read it there
                    file.parent, file.name = file.others.pop(0)
                else:  # the inode stays (the kernel may hold it); a new lookup makes a new one
                    del self._files[key]
            roots = set(self._views.values())
            entries = []
            for ino, node in list(self._inodes.items()):
                if not isinstance(node, _Dir) or node.view is None:
                    continue
                if node.view.snapshot_id != snapshot_id:
                    continue
                if ino in roots:
                    node.backing = None
                    node.subdirs = {}
                    name = node.view.path.rsplit("/", 1)[-1]
                    entries.append((node.parent, os.fsencode(name)))
                else:
                    del self._inodes[ino]  # below a view root: unreachable once it is reset
            return entries
