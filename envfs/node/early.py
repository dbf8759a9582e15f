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
from collections.abc import Collection
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
    def make(
        cls,
        cache: NodeCache,
        snapshot_id: str,
        listing: Listing,
        coming: Collection[str] | None = None,
    ) -> EarlyTree:
        """The directories and symlinks of ``listing``, and links to the files the node
        holds; with ``coming`` (the files the prefetch is about to link in: its trace), only
        the directories those and the files held are in. A directory the tree lacks is the
        FUSE view's alone: all that is in it is FUSE-served (a fresh pandas env: 152 of
        630 directories made, in a quarter of the time, while the job waits for them).
        Raises `OSError` (the cache's disk is full) with nothing left behind."""
        path = cache.early / f"{snapshot_id}.{os.getpid()}.{uuid.uuid4().hex[:12]}"
        root = os.fsencode(path)
        tree = cls(cache, snapshot_id, path)
        meta = META.encode()
        held = cache.held()
        files = [
            (os.path.join(rel, name), entry)
            for rel, entries in listing.items()
            if not _meta(rel, meta)  # FUSE views hide the snapshot's .envfs
            for name, entry in entries.items()
            if entry.type == "file" and object_name(entry) in held
        ]
        if coming is None:
            made = {rel for rel in listing if rel and not _meta(rel, meta)}
        else:
            made = set()
            for rel in [os.fsencode(f) for f in coming] + [rel for rel, _entry in files]:
                parent = os.path.dirname(rel)
                while parent and parent not in made:
                    made.add(parent)
                    parent = os.path.dirname(parent)
            made = {rel for rel in made if rel in listing and not _meta(rel, meta)}
        mask = _umask()
        try:
            os.mkdir(root, 0o555)
            os.chmod(root, 0o555)  # modes as the snapshot's, whatever the daemon's umask
            for rel in sorted(made):
                mode = dir_mode(listing, rel) & ~0o222
                os.mkdir(os.path.join(root, rel), mode)
                if mode & mask:
                    os.chmod(os.path.join(root, rel), mode)
            for rel in [b"", *made]:
                for name, entry in listing[rel].items():
                    if entry.type == "symlink" and entry.target is not None:
                        os.symlink(entry.target, os.path.join(root, rel, name))
            for rel, entry in files:
                tree.link(rel, entry)
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


def _umask() -> int:
    """The process's umask, read without changing it (``os.umask`` sets it for every
    thread; Linux shows it in /proc/self/status); all bits if it cannot be read."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o777


def _meta(rel: bytes, meta: bytes) -> bool:
    return rel == meta or rel.startswith(meta + b"/")
