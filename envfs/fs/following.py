"""A daemon following the store: every ``refresh_interval`` the catalog takes in what other
processes and nodes changed; the kernel forgets the entries of bindings that moved, and
when workflow ACLs changed (`envfs.fs.grants`) the attributes of every directory a grant
applies to, and any kernel-served ``.snapshots/<id>`` of a snapshot now restricted is
detached (FUSE serves it from then on, with the bits the kernel must check)."""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import pyfuse3
import trio

from envfs.fs import kernel
from envfs.fs.catalog import Catalog
from envfs.fs.kernel_views import KernelViews
from envfs.fs.vfs import Namespace

log = logging.getLogger(__name__)


class Following:
    """The refresh half of a `envfs.fs.mount.Daemon` (whose state this is)."""

    catalog: Catalog
    namespace: Namespace
    mountpoint: Path
    refresh_interval: float
    refresh_error: str | None
    last_refresh: float | None
    kernel: KernelViews
    _grants_seen: int = 0

    def _status_changed(self) -> None:
        raise NotImplementedError

    async def _refresh_loop(self) -> None:
        while True:
            await trio.sleep(self.refresh_interval)
            try:
                changed = await trio.to_thread.run_sync(self.catalog.refresh)
                generation = await trio.to_thread.run_sync(self.catalog.grants_generation)
            except Exception as e:  # keep serving from the index; say why, once
                message = f"{type(e).__name__}: {e}"
                if message != self.refresh_error:
                    log.error("binding refresh failed (serving cached bindings): %s", message)
                    self.refresh_error = message
                    self._status_changed()
                continue
            if self.refresh_error is not None:
                log.info("binding refresh works again")
                self.refresh_error = None
                self._status_changed()
            self.last_refresh = time.time()
            for workflow, node in changed:
                log.info("binding %s/%s changed", workflow, node)
                for parent, name in self.namespace.binding_changed(workflow, node):
                    pyfuse3.invalidate_entry_async(parent, name, ignore_enoent=True)
            if generation != self._grants_seen:
                self._grants_seen = generation
                await self._regrant()
            if changed:
                self._status_changed()

    async def _regrant(self) -> None:
        log.info("workflow ACLs changed: applying them")
        for path, sid in list(self.kernel.served.items()):
            if path.startswith(".snapshots/") and self.catalog.snapshot_grant(sid) is not None:
                try:
                    await trio.to_thread.run_sync(kernel.detach, self.mountpoint / path)
                except OSError as e:
                    log.error("cannot detach %s (restricted now): %s", path, e)
                    continue
                self.kernel.forget(path)
                self._status_changed()
        inodes = self.namespace.granted_inodes()
        await trio.to_thread.run_sync(_forget_attributes, inodes)


def _forget_attributes(inodes: list[int]) -> None:
    """The kernel asks again for these inodes' attributes (what permission checks read)."""
    for ino in inodes:
        with contextlib.suppress(OSError):
            pyfuse3.invalidate_inode(ino, attr_only=True)
