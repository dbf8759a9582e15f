"""What an empty index learns from the whole change feed (`envfs.node.index.Index.seed`).

A mount on a fresh node waits for this, so it reads every host's log in a few large reads
and keeps each line as `envfs.store.feed.scan_since` gives it (no model per line): at
100,000 bindings that is some 200,000 lines. A ``bound`` line is stored as it is, as the
revision's value (`envfs.node.records.LINE`), and read into a revision only when asked for.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from json.encoder import encode_basestring_ascii
from pathlib import Path

import lmdb

from envfs.node.records import LINE, binding_key, spec_of
from envfs.store import feed
from envfs.store.formats import SpecInfo

Name = tuple[str, str]
#: Bindings written per transaction: LMDB keeps the pages of a write for reuse, so one
#: transaction of 100,000 bindings would hold some 70 MB for the daemon's whole life.
BATCH = 5000


@dataclass
class Seed:
    #: each binding's revisions the lines tell of: number -> its ``bound`` line
    found: dict[Name, dict[int, feed.Entry]] = field(default_factory=dict)
    firsts: dict[Name, int] = field(default_factory=dict)  # lowest revision, when told
    #: named by a ``binding_intent`` or ``rescanned`` line no later line settled: gc reads
    #: their files
    unsettled: set[Name] = field(default_factory=set)
    pending: set[Name] = field(default_factory=set)  # intents no line says were carried out
    ready: set[str] = field(default_factory=set)  # snapshots built and not swept since
    specs: list[SpecInfo] = field(default_factory=list)


def plan(entries: list[feed.Entry]) -> Seed:
    """What the lines say, replayed in time order."""
    seed = Seed()
    for entry in sorted(entries, key=lambda e: e.time):
        kind = entry.event
        name = (entry.workflow or "", entry.node or "")
        if kind in ("bound", "rolled_back") and all(name) and entry.snapshot_id:
            if entry.revision is not None:
                seed.found.setdefault(name, {})[entry.revision] = entry
                if entry.first is not None:
                    seed.firsts[name] = entry.first
            seed.pending.discard(name)
            seed.unsettled.discard(name)
        elif kind == "removed" and all(name):
            seed.found.pop(name, None)
            seed.firsts.pop(name, None)
            seed.pending.discard(name)
            seed.unsettled.discard(name)
        elif kind == "binding_intent" and all(name):
            seed.pending.add(name)
            seed.unsettled.add(name)
        elif kind == "rescanned" and all(name):
            seed.unsettled.add(name)  # its files changed without a line saying how
        elif kind == "built" and entry.snapshot_id:
            seed.ready.add(entry.snapshot_id)
        elif kind == "gc_swept" and entry.snapshot_id:
            seed.ready.discard(entry.snapshot_id)
        elif kind == "spec_written":
            event = feed.parse_line(entry.line)
            spec = None if event is None else spec_of(event)
            if spec is not None:
                seed.specs.append(spec)
    return seed


def write_bindings(
    env: lmdb.Environment, bindings: lmdb._Database, revs: lmdb._Database, seed: Seed
) -> None:
    """The bindings the lines tell of, into empty tables: a value as `json.dumps` would
    write it, each revision its ``bound`` line. Each table's keys are sorted and appended
    (LMDB need not search where each goes), `BATCH` keys per transaction."""
    currents: list[tuple[bytes, bytes]] = []
    lines: list[tuple[bytes, bytes]] = []
    for name, told in seed.found.items():
        key = binding_key(*name)
        newest = max(told)
        sid = encode_basestring_ascii(told[newest].snapshot_id or "").encode()
        value = b'{"revision": %d, "snapshot_id": %s' % (newest, sid)
        if name in seed.firsts:
            value += b', "first": %d' % seed.firsts[name]
        currents.append((key, value + b"}"))
        lines += [(b"%s@%d" % (key, n), LINE + entry.line) for n, entry in told.items()]
    for db, items in ((bindings, currents), (revs, lines)):
        items.sort()
        for start in range(0, len(items), BATCH):
            chunk = items[start : start + BATCH]
            with env.begin(write=True) as txn:
                _consumed, added = txn.cursor(db=db).putmulti(chunk, append=True)
            if added != len(chunk):  # an append out of order is skipped, not raised
                raise RuntimeError(f"the seed wrote {added} of {len(chunk)} keys")


@contextlib.contextmanager
def one_seed_at_a_time(marker: Path) -> Iterator[None]:
    """One seed of an index on this node at a time (a lock on its marker file)."""
    fd = os.open(marker, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def no_cycle_collection() -> Iterator[None]:
    """No cyclic garbage collection while many acyclic objects are made at once: each pass
    would walk all of them (process-wide, so only for a moment, and restored after)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()
