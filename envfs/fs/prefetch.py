"""A fresh node's head start: when a snapshot served from a NAS is first used, the files its
build's access trace names (`envfs.build.trace`) are copied into the node cache in that
order, by `PREFETCH_THREADS` threads at once, while the job starts; the job's reads find
them on the node (`envfs.node.cache.NodeCache.fetch` copies each content once, whoever
asks first). Files the trace does not name are copied on their first read, and the
whole env later (`mount --fill-rate`)."""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

import trio

from envfs.core.errors import EnvfsError
from envfs.fs.vfs import Namespace
from envfs.node.cache import NodeCache, StoreDirs
from envfs.store.files import Listing, ListingEntry, read_trace

log = logging.getLogger(__name__)

#: Files copied at once: a NAS answers many requests together, each after its latency.
PREFETCH_THREADS = 16


async def prefetch_snapshot(namespace: Namespace, cache: NodeCache, snapshot_id: str) -> None:
    """Copy what the trace of an attached snapshot names into the node cache (nothing if
    it is served from a local disk, has no trace, or the node has it all already)."""
    found = namespace.remote_tree(snapshot_id)
    if found is None:
        return
    source, listing = found
    t0 = time.monotonic()
    try:
        copied = await trio.to_thread.run_sync(copy_traced, cache, source, listing)
    except (OSError, EnvfsError) as e:  # the job's reads copy what they need themselves
        log.warning("prefetch of %s stopped: %s", snapshot_id[:12], e)
        return
    if copied:
        took = time.monotonic() - t0
        log.info("prefetched %d traced file(s) of %s in %.2fs", copied, snapshot_id[:12], took)


def copy_traced(cache: NodeCache, source: bytes, listing: Listing) -> int:
    """In a worker thread: the copy itself; how many files the trace named."""
    trace = read_trace(source)
    if trace is None:
        return 0
    todo: list[tuple[bytes, ListingEntry]] = []
    for rel in trace.files:
        raw = os.fsencode(rel)
        parent, _, name = raw.rpartition(b"/")
        entry = listing.get(parent, {}).get(name)
        if entry is not None and entry.type == "file" and entry.sha256 is not None:
            todo.append((source + b"/" + raw, entry))
    dirs = StoreDirs()
    try:
        with ThreadPoolExecutor(PREFETCH_THREADS, thread_name_prefix="prefetch") as pool:
            list(pool.map(lambda item: cache.fetch(item[1], item[0], dirs), todo))
    finally:
        dirs.close()
    return len(todo)
