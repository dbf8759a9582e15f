"""The index's checkpoints (`envfs.store.checkpoint` owns the files; this module what is in
them): a node writes its index's shared tables, as of its feed cursor, as one LMDB file
in the store; a fresh node copies that file in one large read and takes its tables in
instead of parsing every log line, then reads the logs after its cursor as any node does.
`envfs.node.index.Index` is a `Checkpointing`; see its module for the tables."""

from __future__ import annotations

import contextlib
import itertools
import logging
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import lmdb

from envfs.node.records import INTENT_WAIT, SCHEMA
from envfs.node.seed import BATCH
from envfs.store import feed
from envfs.store.formats import IndexCheckpoint
from envfs.store.layout import Store

log = logging.getLogger(__name__)
#: The tables a checkpoint carries: what the feed and the store's files say. Not what only
#: one node knows (the digests of files its builds read, its ACL serial), nor the ACLs (an
#: index reads those from the store's files whenever it is seeded).
SHARED = (b"bindings", b"revs", b"snapshots", b"specs", b"swept", b"locks", b"unsettled")
#: The meta keys a checkpoint carries, with the tables they describe.
SHARED_META = (b"feed_cursor", b"walk_due")
#: Bytes of logs past the store's checkpoint after which a daemon writes a new one (some
#: 40,000 lines: seeding from that many lines takes well under a second).
LAG = 16 << 20
#: Seconds between a daemon's looks at the store's checkpoint (one small read each).
CHECK_EVERY = 600.0
#: Files next to the index: a checkpoint being written, one being read.
OUT = "checkpoint.out"
COPY = "checkpoint.in"


def copy_tables(src: lmdb.Environment, dst: lmdb.Environment) -> int:
    """The `SHARED` tables and meta keys of ``src``, read in one transaction, appended to
    the same, empty, tables of ``dst`` (`BATCH` keys per write); the bindings copied."""
    pairs = [(src.open_db(name, create=False), dst.open_db(name)) for name in SHARED]
    src_meta, dst_meta = src.open_db(b"meta", create=False), dst.open_db(b"meta")
    found = 0
    with src.begin() as txn:
        for name, (from_db, to_db) in zip(SHARED, pairs, strict=True):
            items = txn.cursor(db=from_db).iternext()
            while chunk := list(itertools.islice(items, BATCH)):
                with dst.begin(write=True) as out:
                    _consumed, added = out.cursor(db=to_db).putmulti(chunk, append=True)
                if added != len(chunk):
                    raise lmdb.Error(f"{name.decode()}: {added} of {len(chunk)} keys copied")
                if name == b"bindings":
                    found += added
        with dst.begin(write=True) as out:
            for key in SHARED_META:
                value = txn.get(key, db=src_meta)
                if value is not None:
                    out.put(key, value, db=dst_meta)
    return found


def write_checkpoint_file(env: lmdb.Environment, path: Path) -> tuple[int, feed.Cursor]:
    """An index's shared tables as a new LMDB file at ``path``: its bindings and the feed
    cursor they are as of."""
    path.unlink(missing_ok=True)
    out = lmdb.open(str(path), subdir=False, map_size=1 << 30, max_dbs=16, lock=False, sync=False)
    try:
        found = copy_tables(env, out)
        meta = out.open_db(b"meta")
        with out.begin() as txn:
            cursor = feed.Cursor.loads(txn.get(b"feed_cursor", db=meta))
    finally:
        out.close()
    return found, cursor


@contextlib.contextmanager
def checkpoint_copy(
    store: Store, path: Path, schema: bytes
) -> Iterator[tuple[lmdb.Environment, IndexCheckpoint] | None]:
    """The store's checkpoint copied to ``path`` and opened, if it has one an index of this
    ``schema`` can take (else None); the copy is removed after."""
    info = store.checkpoint()
    if info is None or info.index_schema != schema.decode() or info.store_uuid != store.uuid:
        yield None
        return
    if not store.fetch_checkpoint(info, path):
        yield None
        return
    try:
        src = lmdb.open(str(path), subdir=False, readonly=True, lock=False, max_dbs=16)
    except lmdb.Error as exc:
        log.warning("checkpoint %s cannot be opened (%s): ignored", info.file, exc)
        path.unlink(missing_ok=True)
        yield None
        return
    try:
        yield src, info
    finally:
        src.close()
        path.unlink(missing_ok=True)


class Checkpointing:
    """The checkpoint half of an `envfs.node.index.Index` (whose tables these are)."""

    store: Store
    path: Path
    env: lmdb.Environment
    meta: lmdb._Database
    _lock: threading.RLock
    _pending: dict[tuple[str, str], float]
    _checkpoint_at: float | None = None  # when a daemon next looks at the store's
    _checkpointer: threading.Thread | None = None

    def _clear(self) -> None:
        """Empty the tables a seed fills (a seed cut short leaves no schema: the next open
        seeds again)."""
        with self.env.begin(write=True) as txn:
            for name in SHARED:
                txn.drop(self.env.open_db(name, txn=txn), delete=False)
            for key in SHARED_META:
                txn.delete(key, db=self.meta)

    def _seed_from_checkpoint(self) -> int | None:
        """The bindings the store's checkpoint holds, taken in with the feed cursor it is as
        of; None if there is none this index can take (then nothing is written)."""
        with checkpoint_copy(self.store, self.path / COPY, SCHEMA) as got:
            if got is None:
                return None
            src, info = got
            self._clear()
            try:
                found = copy_tables(src, self.env)
            except lmdb.Error as exc:
                log.warning("checkpoint %s is unreadable (%s): ignored", info.file, exc)
                self._clear()
                return None
        deadline = time.monotonic() + INTENT_WAIT
        self._pending.update(dict.fromkeys(info.pending, deadline))
        log.info("index seeded from checkpoint %s (%d bindings)", info.file[:12], found)
        return found

    def write_checkpoint(self, host: str) -> IndexCheckpoint:
        """Publish this index's shared tables, as of its feed cursor, as the store's
        checkpoint (the caller holds the store's `checkpoint_claim`)."""
        out = self.path / OUT
        try:
            with self._lock:
                pending = sorted(self._pending)
                found, cursor = write_checkpoint_file(self.env, out)
            return self.store.publish_checkpoint(
                out, index_schema=SCHEMA.decode(), store_uuid=self.store.uuid, host=host,
                written=time.time(), bindings=found, log_bytes=cursor.size(), pending=pending,
            )  # fmt: skip
        finally:
            out.unlink(missing_ok=True)

    def checkpoint_when_due(self, host: str) -> None:
        """A daemon's, after each refresh: about every `CHECK_EVERY` seconds, look at the
        store's checkpoint, and if this index has read `LAG` bytes of logs past it, write
        a new one in a thread (one writer at a time across nodes: the store's claim)."""
        now = time.monotonic()
        if self._checkpoint_at is None:  # a fleet started at once does not look at once
            self._checkpoint_at = now + random.uniform(0.1, 1.0) * CHECK_EVERY
        if now < self._checkpoint_at or (self._checkpointer and self._checkpointer.is_alive()):
            return
        self._checkpoint_at = now + random.uniform(0.5, 1.5) * CHECK_EVERY
        self._checkpointer = threading.Thread(
            target=self._checkpoint_if_behind, args=(host,), name="envfs-checkpoint", daemon=True
        )
        self._checkpointer.start()

    def checkpoint_behind(self) -> int:
        """The bytes of logs this index has read past the store's checkpoint."""
        info = self.store.checkpoint()
        with self._lock, self.env.begin() as txn:  # not while the index is being closed
            cursor = feed.Cursor.loads(txn.get(b"feed_cursor", db=self.meta))
        return cursor.size() - (info.log_bytes if info is not None else 0)

    def _checkpoint_if_behind(self, host: str) -> None:
        try:
            if self.checkpoint_behind() < LAG:
                return
            with self.store.checkpoint_claim() as mine:
                if mine:
                    info = self.write_checkpoint(host)
                    log.info("wrote checkpoint %s (%d bindings)", info.file[:12], info.bindings)
        except Exception as exc:  # a hint only: the next look tries again
            log.warning("cannot write a checkpoint: %s: %s", type(exc).__name__, exc)
