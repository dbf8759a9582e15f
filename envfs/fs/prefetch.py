"""A fresh node's head start: when a snapshot served from a NAS is first used, the files its
build's access trace names (`envfs.build.trace`) are copied into the node cache in that
order, by `PREFETCH_THREADS` threads at once, while the job starts; the job's reads find
them on the node (`envfs.node.cache.NodeCache.fetch` copies each content once, whoever
asks first). With kernel mounts, the snapshot's early tree (`envfs.node.early`) is made
first and handed to the daemon, which mounts it over the snapshot's views; each file is
linked into it as it lands (or is found held: a sibling env's), and is kernel-served from
then on. Files the trace does not name are copied on their first read, and the whole env
later (`mount --fill-rate`). Of a big library (`PARTIAL_MIN`) the import mapped, only the
parts the trace says it touched are copied (`envfs.node.partial`: pandas' OpenBLAS, 2.3
of 22 MB); a traced file past `WHOLE_MAX` the trace names no parts of is not copied here:
an import maps such a library and reads a part of it (torch's libtorch_cuda: 103 of 900
MB), so its pieces come in as they are read. The copies go in trace order with at most
`IN_FLIGHT` bytes under way."""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor

import trio

from envfs.core.errors import EnvfsError
from envfs.fs.inodes import SNAPSHOT_TIME_NS
from envfs.fs.vfs import Namespace
from envfs.node.cache import PARTIAL_MIN, NodeCache
from envfs.node.copying import StoreDirs
from envfs.node.early import EarlyTree
from envfs.store.files import Listing, ListingEntry, pack_file, read_packs, read_trace
from envfs.store.formats import AccessTrace, Range

log = logging.getLogger(__name__)

#: Files copied at once: a NAS answers many requests together, each after its latency.
PREFETCH_THREADS = 16
#: The bytes those copies may have under way at once, in trace order: enough requests to
#: keep the NAS busy, few enough that what the job needs first comes first (with 16 big
#: files at once, the start-up's own files came in last).
IN_FLIGHT = 8 << 20
#: The biggest traced file copied whole ahead of the job. A first import reads most of a
#: library this size (pandas' OpenBLAS: 22.1 of 22.4 MB) but a fraction of the huge ones
#: (`import torch`: 749 MB of 3.2 GB); copying those whole took the NAS from the job's own
#: reads (a fresh node's first `import torch`: 26.3 s whole, 12.2 s piece by piece).
WHOLE_MAX = 64 << 20


async def prefetch_snapshot(
    namespace: Namespace,
    cache: NodeCache,
    snapshot_id: str,
    on_tree: Callable[[EarlyTree], Awaitable[None]] | None = None,
) -> None:
    """Copy what the trace of an attached snapshot names into the node cache (nothing if
    it is served from a local disk, has no trace, or the node has it all already). With
    ``on_tree``, its early tree is made first and awaited with."""
    found = namespace.remote_tree(snapshot_id)
    if found is None:
        return
    source, listing, (uid, gid) = found
    t0 = time.monotonic()
    trace = await trio.to_thread.run_sync(read_trace, source)
    coming = [os.fsencode(rel) for rel in trace.files] if trace is not None else []
    links = Links()
    copied: list[int] = []

    async def copying(trace: AccessTrace) -> None:  # while the tree is made
        try:
            copy = functools.partial(copy_traced, cache, source, listing, trace, links)
            copied.append(await trio.to_thread.run_sync(copy))
        except (OSError, EnvfsError) as e:  # the job's reads copy what they need themselves
            log.warning("prefetch of %s stopped: %s", snapshot_id[:12], e)
        except Exception:  # a head start only: a bug in it must not take the mount down
            log.exception("prefetch of %s failed (the job's reads copy what they need)",
                          snapshot_id[:12])  # fmt: skip

    async with trio.open_nursery() as nursery:
        if trace is not None:  # none: nothing to copy ahead (the tree links what is held)
            nursery.start_soon(copying, trace)
        tree = None
        if on_tree is not None:
            try:
                names_as = (uid, gid, SNAPSHOT_TIME_NS // 10**9)  # as FUSE gives them
                make = functools.partial(
                    EarlyTree.make, cache, snapshot_id, listing, coming, names_as
                )
                tree = await trio.to_thread.run_sync(make)
            except OSError as e:  # served as before: through FUSE until the whole copy is in
                log.warning("no early tree for %s: %s", snapshot_id[:12], e)
            except Exception:  # the same, and logged as the bug it is
                log.exception("no early tree for %s", snapshot_id[:12])
        links.attach(tree)
        if tree is not None and on_tree is not None:
            await on_tree(tree)
    if tree is not None and cache.fill_rate == 0:  # no whole copy to come: the rest it holds
        try:
            rest = await trio.to_thread.run_sync(tree.link_held, listing)
            log.info("linked %d more file(s) the node holds into the early tree of %s",
                     rest, snapshot_id[:12])  # fmt: skip
        except OSError as e:  # they stay FUSE-served, from the node's copies
            log.warning("cannot link the rest of %s into its early tree: %s", snapshot_id[:12], e)
    if copied and copied[0]:
        took = time.monotonic() - t0
        log.info("prefetched %d traced file(s) of %s in %.2fs", copied[0], snapshot_id[:12], took)


class Links:
    """Where a prefetch links each file as it lands: the snapshot's early tree once made
    (the files that landed before are linked then), or nowhere (no tree)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tree: EarlyTree | None = None
        self._waiting: list[tuple[bytes, ListingEntry]] | None = []  # None: no tree to come

    def link(self, rel: bytes, entry: ListingEntry) -> None:
        with self._lock:
            tree = self._tree
            if tree is None and self._waiting is not None:
                self._waiting.append((rel, entry))
        if tree is not None:
            tree.link(rel, entry)

    def attach(self, tree: EarlyTree | None) -> None:
        """The tree is made (or None: none will be)."""
        with self._lock:
            self._tree, waiting = tree, self._waiting or []
            self._waiting = None
        if tree is not None:
            for rel, entry in waiting:
                tree.link(rel, entry)


def copy_traced(
    cache: NodeCache,
    source: bytes,
    listing: Listing,
    trace: AccessTrace,
    tree: EarlyTree | Links | None = None,
) -> int:
    """In a worker thread: the copy of what ``trace`` (the snapshot's) names, each file
    linked into ``tree`` as it lands; how many files it copied (or found held)."""
    packs = _packs(source, listing)
    parts = _parts(trace.ranges, listing)
    todo = _in_order(trace.files, packs, listing, parts)

    def unpack(pack: bytes, members: list[tuple[bytes, ListingEntry]]) -> None:
        done: set[int] = set()

        def landed(i: int) -> None:
            done.add(i)
            if tree is not None:
                tree.link(*members[i])

        _unpack(cache, pack, [entry for _rel, entry in members], landed)
        for i, (rel, entry) in enumerate(members):  # held before, or not given (damaged)
            if i not in done:
                fetch(rel, entry)

    def fetch(rel: bytes, entry: ListingEntry) -> None:
        touched = parts.get(rel)
        if touched is not None and cache.object_path(entry) is None:
            # the rest later (linked once whole: FUSE serves it till then)
            cache.fetch_ranges(entry, source + b"/" + rel, touched, dirs)
            return
        cache.fetch(entry, source + b"/" + rel, dirs)
        if tree is not None:
            tree.link(rel, entry)

    def copy(item: tuple[bytes, ListingEntry] | int) -> None:
        if isinstance(item, int):
            unpack(*packs[item])
        else:
            fetch(*item)

    def weight(item: tuple[bytes, ListingEntry] | int) -> int:
        if isinstance(item, int):
            return sum(entry.size for _rel, entry in packs[item][1])
        touched = parts.get(item[0])
        return item[1].size if touched is None else sum(b - a for a, b in touched)

    dirs = StoreDirs()
    window = _Window(IN_FLIGHT)
    try:
        with ThreadPoolExecutor(PREFETCH_THREADS, thread_name_prefix="prefetch") as pool:
            copies = []
            for item in todo:
                size = weight(item)
                window.enter(size)
                copies.append(pool.submit(copy, item))
                copies[-1].add_done_callback(functools.partial(window.leave_after, size))
            for done in copies:
                done.result()
    finally:
        dirs.close()
    return sum(len(packs[it][1]) if isinstance(it, int) else 1 for it in todo)


class _Window:
    """The bytes copies under way may have at once: the next copy starts once those before
    it leave it room (or none is under way)."""

    def __init__(self, most: int) -> None:
        self._most, self._busy = most, 0
        self._changed = threading.Condition()

    def enter(self, size: int) -> None:
        with self._changed:
            self._changed.wait_for(lambda: self._busy == 0 or self._busy + size <= self._most)
            self._busy += size

    def leave_after(self, size: int, _copy: Future[None]) -> None:
        with self._changed:
            self._busy -= size
            self._changed.notify_all()


def _in_order(
    traced: list[str],
    packs: list[tuple[bytes, list[tuple[bytes, ListingEntry]]]],
    listing: Listing,
    parts: dict[bytes, list[Range]] | None = None,
) -> list[tuple[bytes, ListingEntry] | int]:
    """What to copy, in the order the job needs it: the traced files (up to `WHOLE_MAX`,
    or the parts the trace names of bigger ones) in trace order, each pack (by its index)
    where its first member comes."""
    packed = {rel: i for i, (_path, members) in enumerate(packs) for rel, _entry in members}
    todo: list[tuple[bytes, ListingEntry] | int] = []
    queued: set[int] = set()
    for rel in traced:
        raw = os.fsencode(rel)
        pack = packed.get(raw)
        if pack is not None:
            if pack not in queued:
                queued.add(pack)
                todo.append(pack)
            continue
        entry = _listed(listing, raw)
        if entry is None or entry.type != "file" or entry.sha256 is None:
            continue
        if entry.size <= WHOLE_MAX or raw in (parts or {}):
            todo.append((raw, entry))
    return todo + [i for i in range(len(packs)) if i not in queued]


def _parts(traced: dict[str, list[Range]], listing: Listing) -> dict[bytes, list[Range]]:
    """The big traced files (`PARTIAL_MIN`) of which the import touched a part only: the
    byte ranges to copy ahead (their pieces, `PIECE`); the rest comes with the whole copy.
    (pandas' OpenBLAS: 1.3 of 22 MB, libpython 6 of 30.)"""
    parts = {}
    for rel, ranges in traced.items():
        raw = os.fsencode(rel)
        entry = _listed(listing, raw)
        if entry is not None and entry.type == "file" and entry.size >= PARTIAL_MIN:
            parts[raw] = ranges
    return parts


def _listed(listing: Listing, rel: bytes) -> ListingEntry | None:
    parent, _, name = rel.rpartition(b"/")
    return listing.get(parent, {}).get(name)


def _packs(source: bytes, listing: Listing) -> list[tuple[bytes, list[tuple[bytes, ListingEntry]]]]:
    """The snapshot's packs (`envfs.build.packs`): each file's path, and its members' paths
    and listing entries (a pack naming a file the listing does not have is left out)."""
    index = read_packs(source)
    out = []
    for pack in index.packs if index is not None else []:
        members = []
        for member in pack.members:
            rel = os.fsencode(member.path)
            entry = _listed(listing, rel)
            if entry is None or entry.sha256 != member.sha256 or entry.size != member.size:
                break
            members.append((rel, entry))
        else:
            out.append((pack_file(source, pack.sha256), members))
    return out


def _unpack(
    cache: NodeCache, path: bytes, members: list[ListingEntry], landed: Callable[[int], None]
) -> None:
    """One pack into the node cache; if it cannot be read, its files come one by one."""
    try:
        cache.unpack(path, members, landed)
    except OSError as e:
        name = os.path.basename(os.fsdecode(path))
        log.warning("cannot read the pack %s (its files come one by one): %s", name, e)
