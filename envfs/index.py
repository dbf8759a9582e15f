"""The node-local LMDB index: a fast, rebuildable view of the store. The only lmdb importer.

Databases:
    meta       schema version, store uuid, audit offset
    bindings   "wf/node"      -> current revision (JSON: revision, snapshot_id)
    revs       "wf/node@rev"  -> snapshot id
    snapshots  id             -> "ready" (present only once the snapshot is complete)
    digests    "dev:ino:size:mtime_ns" -> sha256 of a store file shared with uv's cache, so
               builds do not hash a wheel's files again (node-local: inodes are)

The index is never the source of truth: a missing, corrupt or foreign index (another store's)
is rebuilt from the store automatically and gives the same answers.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from pathlib import Path

import lmdb

from envfs.catalog import BindingView
from envfs.errors import EnvironmentProblem
from envfs.model import Revision
from envfs.store import Store

log = logging.getLogger(__name__)

SCHEMA = b"1"
MAP_SIZE = 1 << 30  # sparse; grows only as used


def _key(workflow: str, node: str) -> bytes:
    return f"{workflow}/{node}".encode()


class Index:
    """An open index over one store. Thread-safe for readers; writes serialize in LMDB."""

    def __init__(self, path: Path, store: Store) -> None:
        self.path = path
        self.store = store
        self._lock = threading.Lock()
        self.rebuilt = False
        try:
            self._open()
            with self.env.begin() as txn:
                fresh = txn.get(b"schema", db=self.meta) is None
            if fresh:
                self.rebuild()
            elif not self._valid():
                self._reset_and_rebuild("it belongs to another store or an older schema")
        except lmdb.Error as exc:
            self._reset_and_rebuild(f"it is corrupt ({exc})")

    # -- opening --------------------------------------------------------------------------

    def _open(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self.env = lmdb.open(str(self.path), map_size=MAP_SIZE, max_dbs=8, max_readers=512)
        self.meta = self.env.open_db(b"meta")
        self.bindings = self.env.open_db(b"bindings")
        self.revs = self.env.open_db(b"revs")
        self.snaps = self.env.open_db(b"snapshots")
        self.digests = self.env.open_db(b"digests")

    def _valid(self) -> bool:
        with self.env.begin() as txn:
            schema = txn.get(b"schema", db=self.meta)
            uuid = txn.get(b"store_uuid", db=self.meta)
        return schema == SCHEMA and uuid == self.store.uuid.encode()

    def _reset_and_rebuild(self, why: str) -> None:
        log.warning("rebuilding the index at %s: %s", self.path, why)
        if hasattr(self, "env"):
            self.env.close()
        shutil.rmtree(self.path, ignore_errors=True)
        try:
            self._open()
        except lmdb.Error as exc:
            raise EnvironmentProblem(f"cannot open the index at {self.path}: {exc}") from exc
        self.rebuild()

    def close(self) -> None:
        self.env.close()

    # -- rebuilding from the store --------------------------------------------------------

    def rebuild(self) -> int:
        """Replace the index contents with a fresh scan of the store; returns bindings found."""
        offset = self.store.audit_size()
        count = 0
        with self.env.begin(write=True) as txn:
            for db in (self.bindings, self.revs, self.snaps):
                txn.drop(db, delete=False)
            for wf, node in self.store.binding_names():
                revisions = self.store.revisions(wf, node)
                if revisions:
                    self._put_binding(txn, revisions)
                    count += 1
            for sid in self.store.snapshot_ids():
                if self.store.snapshot_ready(sid):
                    txn.put(sid.encode(), b"ready", db=self.snaps)
            txn.put(b"schema", SCHEMA, db=self.meta)
            txn.put(b"store_uuid", self.store.uuid.encode(), db=self.meta)
            txn.put(b"audit_offset", str(offset).encode(), db=self.meta)
        self.rebuilt = True
        return count

    def _put_binding(self, txn: lmdb.Transaction, revisions: list[Revision]) -> None:
        newest = revisions[-1]
        key = _key(newest.workflow, newest.node)
        value = {"revision": newest.revision, "snapshot_id": newest.snapshot_id}
        txn.put(key, json.dumps(value).encode(), db=self.bindings)
        for rev in revisions:
            txn.put(key + b"@%d" % rev.revision, rev.snapshot_id.encode(), db=self.revs)

    # -- writes ---------------------------------------------------------------------------

    def put_binding(self, revisions: list[Revision]) -> None:
        if revisions:
            with self.env.begin(write=True) as txn:
                self._put_binding(txn, revisions)

    def mark_ready(self, snapshot_id: str) -> None:
        with self.env.begin(write=True) as txn:
            txn.put(snapshot_id.encode(), b"ready", db=self.snaps)

    # -- file digests (builds) -------------------------------------------------------------

    @staticmethod
    def _digest_key(st: os.stat_result) -> bytes:
        return b"%d:%d:%d:%d" % (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def cached_digest(self, st: os.stat_result) -> str | None:
        """The sha256 a build computed for this very file (same inode, size and mtime)."""
        with self.env.begin() as txn:
            value = txn.get(self._digest_key(st), db=self.digests)
        return value.decode() if value is not None else None

    def remember_digests(self, items: list[tuple[os.stat_result, str]]) -> None:
        with self.env.begin(write=True) as txn:
            for st, digest in items:
                txn.put(self._digest_key(st), digest.encode(), db=self.digests)

    # -- reads ----------------------------------------------------------------------------

    def current(self, workflow: str, node: str) -> BindingView | None:
        with self.env.begin() as txn:
            raw = txn.get(_key(workflow, node), db=self.bindings)
        if raw is None:
            return None
        value = json.loads(raw)
        return BindingView(workflow, node, value["revision"], value["snapshot_id"])

    def at_revision(self, workflow: str, node: str, revision: int) -> BindingView | None:
        with self.env.begin() as txn:
            raw = txn.get(_key(workflow, node) + b"@%d" % revision, db=self.revs)
        return None if raw is None else BindingView(workflow, node, revision, raw.decode())

    def is_ready(self, snapshot_id: str) -> bool:
        with self.env.begin() as txn:
            return txn.get(snapshot_id.encode(), db=self.snaps) is not None

    def all_bindings(self) -> list[BindingView]:
        out = []
        with self.env.begin() as txn:
            for key, raw in txn.cursor(db=self.bindings):
                wf, node = bytes(key).decode().split("/", 1)
                value = json.loads(raw)
                out.append(BindingView(wf, node, value["revision"], value["snapshot_id"]))
        return out

    def workflows(self) -> list[str]:
        """Distinct workflow names, jumping over each workflow's nodes (O(workflows))."""
        out: list[str] = []
        with self.env.begin() as txn:
            cursor = txn.cursor(db=self.bindings)
            ok = cursor.first()
            while ok:
                wf = bytes(cursor.key()).split(b"/", 1)[0]
                out.append(wf.decode())
                ok = cursor.set_range(wf + b"0")  # '0' sorts right after '/'
        return out

    def nodes(self, workflow: str) -> list[str]:
        prefix = workflow.encode() + b"/"
        out = []
        with self.env.begin() as txn:
            cursor = txn.cursor(db=self.bindings)
            ok = cursor.set_range(prefix)
            while ok and bytes(cursor.key()).startswith(prefix):
                out.append(bytes(cursor.key())[len(prefix) :].decode())
                ok = cursor.next()
        return out

    # -- following the store --------------------------------------------------------------

    def audit_offset(self) -> int:
        with self.env.begin() as txn:
            raw = txn.get(b"audit_offset", db=self.meta)
        return int(raw or b"0")

    def follow_audit(self) -> list[tuple[str, str]]:
        """Apply store changes recorded in the audit log since the last call.

        Returns the bindings named by new ``bound``/``rolled_back`` events (whether or not
        this process already had them: another process on this node may have written the
        index first, but a daemon still has to invalidate its kernel entries).
        """
        with self._lock:
            offset = self.audit_offset()
            size = self.store.audit_size()
            if size == offset:
                return []
            if size < offset:  # the log was rotated or replaced: start over
                self.rebuild()
                return [(b.workflow, b.node) for b in self.all_bindings()]
            events, new_offset = self.store.audit_events(offset)
            changed: dict[tuple[str, str], None] = {}
            ready: set[str] = set()
            for event in events:
                kind = event.get("event")
                if kind in ("bound", "rolled_back") and "workflow" in event:
                    changed[(str(event["workflow"]), str(event["node"]))] = None
                elif kind == "built" and event.get("snapshot_id"):
                    ready.add(str(event["snapshot_id"]))
            with self.env.begin(write=True) as txn:
                for wf, node in changed:
                    revisions = self.store.revisions(wf, node)
                    if revisions:
                        self._put_binding(txn, revisions)
                    else:
                        txn.delete(_key(wf, node), db=self.bindings)
                for sid in ready:
                    if self.store.snapshot_ready(sid):
                        txn.put(sid.encode(), b"ready", db=self.snaps)
                txn.put(b"audit_offset", str(new_offset).encode(), db=self.meta)
            return list(changed)


def open_index(path: Path, store: Store) -> Index:
    """Open (creating or rebuilding as needed) the index of ``store`` at ``path``."""
    try:
        return Index(path, store)
    except OSError as exc:
        raise EnvironmentProblem(
            f"cannot open the index at {path}: {exc.strerror}; pass --index DIR on a local disk"
        ) from exc
