"""A fresh node's early tree: what the kernel can serve of a snapshot before its whole copy is in.

A snapshot served from a NAS is FUSE-served until the node holds all of it (the whole copy
waits for jobs to quieten: `envfs.node.cache`), and through FUSE a first import runs at
about 1.5x its kernel-served time, however fast the NAS. So when such a snapshot is first
attached its early tree is made under ``<cache>/early/``: every directory and symlink of
the snapshot, and a hard link to the node cache's copy of every file the node holds
already (from any env); the prefetch (`envfs.fs.prefetch`) links each traced file in as
it lands. The daemon mounts it over the snapshot's pinned views as the upper layer of a
read-only overlay whose lower layer is the FUSE view itself
(`envfs.fs.kernel.overlay_read_only`): the kernel serves every file the node holds, FUSE
the rest (and the names: a lookup below a merged directory asks both layers once). Once
the whole copy is in, a bind of it replaces the overlay.

A file looked up before it was linked stays FUSE-served for that name until the kernel
forgets it (overlayfs keeps what it found): the same bytes, only slower. Nothing here is
ever unlinked while an overlay uses the tree; it goes when its snapshot is let go of, when
the daemon stops, or at the next start (leftovers of a killed daemon).
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

from envfs.node.cache import NodeCache, dir_mode, object_name
from envfs.store.files import META, Listing, ListingEntry, remove_tree

log = logging.getLogger(__name__)


class EarlyTree:
    """The early tree of one snapshot (`make` it; `link` files in as the node gets them)."""

    def __init__(self, cache: NodeCache, snapshot_id: str, path: Path) -> None:
        self.cache = cache
        self.snapshot_id = snapshot_id
        self.path = path
        self.linked = 0  # files linked in so far

    @classmethod
    def make(cls, cache: NodeCache, snapshot_id: str, listing: Listing) -> EarlyTree:
        """The directories and symlinks of ``listing``, and links to the files the node
        holds. Raises `OSError` (the cache's disk is full) with nothing left behind."""
        path = cache.early / f"{snapshot_id}.{os.getpid()}.{uuid.uuid4().hex[:12]}"
        root = os.fsencode(path)
        tree = cls(cache, snapshot_id, path)
        meta = META.encode()
        held = cache.held()
        try:
            os.mkdir(root)
            os.chmod(root, 0o555)  # modes as the snapshot's, whatever the daemon's umask
            for rel in sorted(rel for rel in listing if rel and not _meta(rel, meta)):
                os.mkdir(os.path.join(root, rel))
                os.chmod(os.path.join(root, rel), dir_mode(listing, rel) & ~0o222)
            for rel, entries in listing.items():
                if _meta(rel, meta):
                    continue  # FUSE views hide the snapshot's .envfs
                for name, entry in entries.items():
                    if rel == b"" and name == meta:
                        continue
                    if entry.type == "symlink" and entry.target is not None:
                        os.symlink(entry.target, os.path.join(root, rel, name))
                    elif entry.type == "file" and object_name(entry) in held:
                        tree.link(os.path.join(rel, name), entry)
        except BaseException:
            remove_tree(path)
            raise
        return tree

    def link(self, rel: bytes, entry: ListingEntry) -> bool:
        """Link the node's copy of the file at ``rel`` in (False if the node lacks it, or it
        is linked already)."""
        obj = self.cache.object_path(entry) if entry.sha256 is not None else None
        if obj is None:
            return False
        try:
            os.link(obj, os.path.join(os.fsencode(self.path), rel))
        except (FileExistsError, FileNotFoundError):  # linked, or evicted just now
            return False
        self.linked += 1
        return True

    def remove(self) -> None:
        """Remove the tree (only once no overlay uses it); what cannot be removed now goes
        at the next start (`NodeCache`)."""
        try:
            remove_tree(self.path)
        except OSError as e:
            log.warning("cannot remove the early tree %s (removed at the next start): %s",
                        self.path.name, e)  # fmt: skip


def _meta(rel: bytes, meta: bytes) -> bool:
    return rel == meta or rel.startswith(meta + b"/")
