"""Which pinned views a daemon has handed to the kernel, and handing them over
(`envfs.fs.kernel` owns the mount calls): a bind of the snapshot's tree (the store's, or
the node cache's whole copy for a store on a NAS), or, on a fresh node until that copy is
in, an overlay of the snapshot's early tree and the image of its names over the FUSE view
(`envfs.node.early`, `envfs.node.erofs`: `early_overlay`), which the bind replaces once
the copy is in.

A view some process is in (its working directory, an open directory: a walk) is left to
FUSE until it leaves: a mount placed under a walker changes what ``..`` is below it.
Without the privilege (EPERM: no CAP_SYS_ADMIN) FUSE serves everything, as it does for
processes in mount namespaces the mounts do not propagate to.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from pathlib import Path

import trio

from envfs.fs import idle, kernel
from envfs.fs.inodes import View
from envfs.fs.vfs import Namespace
from envfs.node.cache import NodeCache
from envfs.node.early import EarlyTree

log = logging.getLogger(__name__)

#: Seconds before a view some process was found in is looked at again for a kernel mount.
ENTERED_RECHECK = 1.0


class KernelViews:
    """The kernel mounts of one daemon's views (used from its event loop)."""

    def __init__(
        self, namespace: Namespace, mountpoint: Path, cache: NodeCache | None, enabled: bool
    ) -> None:
        self.namespace = namespace
        self.mountpoint = mountpoint
        self.cache = cache
        self.enabled = enabled  # False: FUSE serves everything (asked, or no privilege)
        self.stopping = False
        self.served: dict[str, str] = {}  # view path -> snapshot id, kernel-served
        self.trees: dict[str, EarlyTree] = {}  # snapshot id -> its early tree (fresh node)
        self._early: set[str] = set()  # served views that are overlays of an early tree
        self._failed: set[str] = set()
        self._no_overlay: set[str] = set()  # views an overlay could not be mounted on
        self._pending: set[str] = set()  # views being mounted (in worker threads)
        self._entered: dict[str, float] = {}  # view a process was in -> when to look again

    def is_early(self, path: str) -> bool:
        return path in self._early

    async def place(self, skip: int | None = None) -> None:
        """Mount each candidate view that needs it (``skip``: a view whose directory a
        request is in: the mount would wait for that very request)."""
        todo = []
        for view, source, ino in self.namespace.kernel_candidates():
            path = view.path
            copied = self.cache is None or self._in_cache(source)
            early = not copied and path not in self._no_overlay
            tree = self.trees.get(view.snapshot_id) if early else None
            if not copied and tree is None:
                continue  # the kernel serves the node's copy, once it is made
            if not self._wanted(path, tree) or path in self._failed:
                continue
            if ino is not None and ino == skip:
                continue
            if self._entered.get(path, 0.0) > time.monotonic():
                continue  # a process was in it just now: looked at again after a while
            todo.append((view, source, tree))
        if not todo:
            return
        entered = await trio.to_thread.run_sync(
            lambda: idle.views_in_use(self.mountpoint, entered_only=True)
        )
        for view, source, tree in todo:
            path = view.path
            if path in entered:  # not every KERNEL_CHECK: a /proc scan costs ms a time
                self._entered[path] = time.monotonic() + ENTERED_RECHECK
                continue
            self._entered.pop(path, None)
            if not self._wanted(path, tree):
                continue
            if self.stopping or not self.enabled:
                return
            self._pending.add(path)
            # abandoned if the caller stops waiting: the thread records the outcome itself
            await trio.to_thread.run_sync(
                self._mount, view, os.fsdecode(source), tree, abandon_on_cancel=True
            )

    def _wanted(self, path: str, tree: EarlyTree | None) -> bool:
        """Whether a view needs a kernel mount: an overlay of ``tree`` if it has none, else a
        bind if it has none or an early overlay (and none is being placed)."""
        if path in self._pending:
            return False
        return path not in self.served or (tree is None and path in self._early)

    def _in_cache(self, source: bytes) -> bool:
        """Whether a snapshot is served from the node cache's copy (not from the store)."""
        assert self.cache is not None
        return source.startswith(os.fsencode(self.cache.snapshots) + b"/")

    def _mount(self, view: View, source: str, tree: EarlyTree | None) -> None:
        """In a worker thread: one bind mount (or overlay of ``tree``), its outcome
        recorded (see `place`)."""
        target = self.mountpoint / view.path
        try:
            if tree is not None:
                early_overlay(tree, target)
                self._early.add(view.path)
            else:
                if view.path in self._early:  # processes in the early overlay keep it
                    kernel.detach(target)
                    self.forget(view.path)
                kernel.bind_read_only(source, target)
        except OSError as e:
            if tree is not None:  # FUSE serves it until the whole copy is in, as before
                log.warning("no early overlay for %s: %s", view.path, e)
                self._no_overlay.add(view.path)
            elif e.errno in (errno.EPERM, errno.EACCES):
                if self.enabled:
                    log.warning("no kernel mounts (%s): FUSE serves every view", e.strerror)
                self.enabled = False
            else:
                log.warning("cannot hand %s to the kernel: %s", view.path, e)
                self._failed.add(view.path)
        except Exception as e:  # a bug: FUSE goes on serving everything
            log.error("kernel mounts stopped: %s: %s", type(e).__name__, e)
            self.enabled = False
        else:
            self.served[view.path] = view.snapshot_id
            early = ""
            if tree is not None:
                names = ", names from its image" if tree.image is not None else ""
                early = f", early: {tree.linked} files held{names}"
            log.info("%s is kernel-served (%s%s)", view.path, view.snapshot_id[:12], early)
        finally:
            self._pending.discard(view.path)

    def forget(self, path: str) -> None:
        """The kernel mount at ``path`` is gone (detached or unmounted)."""
        self.served.pop(path, None)
        self._early.discard(path)

    async def release(self, snapshot_id: str, paths: list[str]) -> bool:
        """Unmount a snapshot's views (False if one is in use: kept) and drop its early
        tree."""
        for path in paths:
            if self.served.get(path) == snapshot_id:
                target = self.mountpoint / path
                try:
                    gone = await trio.to_thread.run_sync(kernel.unmount_unused, target)
                except OSError as e:
                    log.warning("cannot unmount the idle view %s: %s", path, e)
                    return False
                if not gone:
                    return False  # in use after all: kept
                self.forget(path)
        tree = self.trees.pop(snapshot_id, None)
        if tree is not None:
            await trio.to_thread.run_sync(tree.remove)
        return True

    async def detach_all(self) -> None:
        """Detach every kernel mount (the daemon is stopping)."""
        self.stopping = True
        for path in sorted(self.served, reverse=True):
            try:
                await trio.to_thread.run_sync(kernel.detach, self.mountpoint / path)
            except OSError as e:  # the FUSE unmount detaches it with everything else
                log.warning("cannot detach the kernel mount at %s: %s", path, e)
        self.served.clear()
        self._early.clear()

    def remove_trees(self) -> None:
        """Remove the early trees (no overlay uses them any more: the mount is gone)."""
        for tree in self.trees.values():
            tree.remove()
        self.trees.clear()


def early_overlay(tree: EarlyTree, target: Path) -> None:
    """The early overlay of ``tree`` on ``target`` (the snapshot's FUSE view): over the
    snapshot's names image, with the view as its data-only layer; or, with no image or one
    the kernel refuses (removed then), over the view alone. Raises `OSError` with nothing
    mounted."""
    if tree.image is not None:
        try:
            with kernel.image_mounted(tree.image) as names:
                kernel.overlay_read_only([tree.path, names], target, data=[target])
            return
        except OSError as e:
            log.warning("the names image of %s is not used: %s", tree.snapshot_id[:12], e)
            tree.drop_image()
    kernel.overlay_read_only([tree.path, target], target)
