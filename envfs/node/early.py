"""A fresh node's early tree: what the kernel can serve of a snapshot before its whole copy is in.

A snapshot served from a NAS is FUSE-served until the node holds all of it (the whole copy
waits for jobs to quieten: `envfs.node.cache`), and through FUSE a first import runs at
about 1.5x its kernel-served time, however fast the NAS. So when such a snapshot is first
attached its early tree is made under ``<cache>/early/``: the directories on the way to
the files the trace names, and the symlinks in them; the prefetch (`envfs.fs.prefetch`)
links each traced file in as it lands or is found held (from any env; of a snapshot
with no trace, every file the node holds is linked as the tree is made). With it the
image of all the snapshot's names is written (`envfs.node.erofs`: metacopy stubs, no
bytes). The daemon mounts the tree over the snapshot's pinned views as the upper layer
of a read-only overlay, the image below it and the FUSE view itself as its data-only
layer (`envfs.fs.kernel_views.early_overlay`): the kernel serves every file linked in and
every name, FUSE the bytes of the other files (without the image, the FUSE view is the
lower layer, and answers the names the tree lacks). A directory left out of the tree is
the lower layers' alone: a first import of pandas goes through 152 of the env's 632
directories, and each one made is an inode written while the job waits. Once the whole
copy is in, a bind of it replaces the overlay.

A file looked up before it was linked stays FUSE-served for that name until the kernel
forgets it (overlayfs keeps what it found): the same bytes, only slower. Nothing here is
ever unlinked while an overlay uses the tree; it goes when its snapshot is let go of, when
the daemon stops, or at the next start (leftovers of a killed daemon).
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterable
from pathlib import Path

from envfs.node.cache import NodeCache, dir_mode, object_name
from envfs.node.erofs import write_image
from envfs.store.files import META, Listing, ListingEntry, remove_tree

log = logging.getLogger(__name__)

_META = META.encode()  # the snapshot's own directory, which FUSE views hide


class EarlyTree:
    """The early tree of one snapshot (`make` it; `link` files in as the node gets them)."""

    def __init__(self, cache: NodeCache, snapshot_id: str, path: Path) -> None:
        self.cache = cache
        self.snapshot_id = snapshot_id
        self.path = path
        self._root = os.fsencode(path)
        self.linked = 0  # files linked in so far
        #: the snapshot's names as an EROFS image of metacopy stubs (`envfs.node.erofs`), to
        #: go between the tree and the FUSE view; None: none (FUSE answers other names)
        self.image: Path | None = None

    @classmethod
    def make(
        cls,
        cache: NodeCache,
        snapshot_id: str,
        listing: Listing,
        coming: Iterable[bytes] = (),
        names_as: tuple[int, int, int] | None = None,
    ) -> EarlyTree:
        """The directories of ``listing`` on the way to the files ``coming`` (the prefetch's:
        the trace's, each linked in by it as it lands or is found held, in the trace's order)
        and their symlinks; without ``coming`` (no trace), to the files the node holds, each
        linked in now. With ``names_as`` (the uid, gid and mtime the FUSE view gives its
        files), the image of all its names too (written next to the tree; none if that
        fails). Raises `OSError` (the cache's disk is full) with nothing left behind.

        What the node holds is not all linked when there is a trace: a node that has run a
        sibling env holds nearly all of a new one, and linking it all (pandas: 6,676 files,
        632 directories) kept the kernel from serving any of it for 0.55 s, the job running
        through FUSE meanwhile: slower than on an empty node. The rest the node holds is
        read through FUSE from its copy until the whole copy replaces the overlay (with
        none to come, `link_held` links it once the job's start is over)."""
        path = cache.early / f"{snapshot_id}.{os.getpid()}.{uuid.uuid4().hex[:12]}"
        tree = cls(cache, snapshot_id, path)
        root = tree._root
        coming = list(coming)
        links = [] if coming else _held(cache, listing)
        try:
            os.mkdir(root)
            os.chmod(root, 0o555)  # modes as the snapshot's, whatever the daemon's umask
            _symlinks(root, listing, b"")
            _make_dirs(root, listing, _on_the_way([rel for rel, _entry in links] + coming))
            for rel, entry in links:
                tree.link(rel, entry)
        except BaseException:
            remove_tree(path)
            raise
        if names_as is not None:
            tree.image = path.with_name(path.name + ".erofs")
            names = {**listing, b"": {n: e for n, e in listing[b""].items() if n != _META}}
            try:
                write_image(tree.image, names, *names_as)
            except OSError as e:  # the tree alone: FUSE answers the names it lacks
                log.warning("no names image for %s: %s", snapshot_id[:12], e)
                tree.image = None
        return tree

    def link(self, rel: bytes, entry: ListingEntry) -> bool:
        """Link the node's copy of the file at ``rel`` in (False if the node lacks it, or it
        is linked already)."""
        if entry.sha256 is None:
            return False
        try:  # no stat first: the link says whether the node has it
            os.link(self.cache.object_file(entry), os.path.join(self._root, rel))
        except (FileExistsError, FileNotFoundError):  # linked already, or not held
            return False
        self.linked += 1
        return True

    def link_held(self, listing: Listing) -> int:
        """Link in every other file of ``listing`` the node holds (from any env), with the
        directories on the way and their symlinks, as `make` does without a trace: for a
        node whose whole copy will not come (``--fill-rate off``), once the job's start is
        over. A directory the overlay has looked up already keeps what it found (its files
        are read through FUSE from the node's copy). How many it linked."""
        links = _held(self.cache, listing)  # those linked already: `link` says no
        _make_dirs(self._root, listing, _on_the_way([rel for rel, _e in links]))
        return sum(self.link(rel, entry) for rel, entry in links)

    def drop_image(self) -> None:
        """Do without the names image (it could not be mounted): removed now."""
        image, self.image = self.image, None
        if image is not None:
            image.unlink(missing_ok=True)

    def remove(self) -> None:
        """Remove the tree (only once no overlay uses it); what cannot be removed now goes
        at the next start (`NodeCache`)."""
        try:
            self.drop_image()
            remove_tree(self.path)
        except OSError as e:
            log.warning("cannot remove the early tree %s (removed at the next start): %s",
                        self.path.name, e)  # fmt: skip


def _held(cache: NodeCache, listing: Listing) -> list[tuple[bytes, ListingEntry]]:
    """The files of ``listing`` (but ``.envfs/``) whose content the node holds."""
    held = cache.held()
    return [
        (os.path.join(rel, name), entry)
        for rel, entries in listing.items()
        if not _meta(rel)
        for name, entry in entries.items()
        if entry.type == "file" and object_name(entry) in held
    ]


def _make_dirs(root: bytes, listing: Listing, dirs: set[bytes]) -> None:
    """Those of ``dirs`` that are directories of ``listing`` (but ``.envfs/``) and not made
    yet under ``root``, parents first: each with the snapshot's mode but never writable,
    and its symlinks."""
    for rel in sorted(rel for rel in dirs if rel in listing and not _meta(rel)):
        path = os.path.join(root, rel)
        try:
            os.mkdir(path)
        except FileExistsError:  # made before (`link_held` after `make`), with its symlinks
            continue
        os.chmod(path, dir_mode(listing, rel) & ~0o222)
        _symlinks(root, listing, rel)


def _symlinks(root: bytes, listing: Listing, rel: bytes) -> None:
    for name, entry in listing[rel].items():
        if entry.type == "symlink" and entry.target is not None:
            os.symlink(entry.target, os.path.join(root, rel, name))


def _on_the_way(files: list[bytes]) -> set[bytes]:
    """The directories the paths of ``files`` go through (not the root)."""
    dirs: set[bytes] = set()
    for rel in files:
        parent = rel.rpartition(b"/")[0]
        while parent and parent not in dirs:
            dirs.add(parent)
            parent = parent.rpartition(b"/")[0]
    return dirs


def _meta(rel: bytes) -> bool:
    return rel == _META or rel.startswith(_META + b"/")
