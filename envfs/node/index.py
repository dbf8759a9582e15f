"""The node-local LMDB index: a fast, rebuildable view of the store. The only lmdb importer.

Databases:
    meta       schema version, store uuid, feed cursor (how far each host's log was read)
    bindings   "wf/node"      -> current revision (JSON: revision, snapshot_id)
    revs       "wf/node@rev"  -> snapshot id
    snapshots  id             -> "ready" (present only once the snapshot is complete)
    digests    "dev:ino:size:mtime_ns" -> sha256 of a store file shared with uv's cache, so
               builds do not hash a wheel's files again (node-local: inodes are)

The index is never the source of truth: a missing, corrupt or foreign index (another store's)
is rebuilt from the store automatically and gives the same answers.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import lmdb

from envfs.core.errors import BadInput, EnvfsError, EnvironmentProblem
from envfs.core.views import BindingView
from envfs.store import feed
from envfs.store.files import make_private
from envfs.store.formats import Revision
from envfs.store.layout import Store

log = logging.getLogger(__name__)

SCHEMA = b"2"  # 2: per-host logs (meta feed_cursor), file digests
#: Seconds between passes that compare every binding directory with the index.
RECONCILE_EVERY = 2.0
MAP_SIZE = 1 << 30  # sparse; grows only as used
#: The file that says a directory is an envfs index: envfs deletes only in directories that
#: have it, and only its own files there.
MARKER = "envfs-index"
_LMDB_FILES = ("data.mdb", "lock.mdb")
#: What else envfs keeps next to the index (the node cache, the API's audit spool, the
#: daemon's served list): a directory holding only these is envfs's, marked or not.
_ALSO_OURS = ("cache", "audit-spool", "served.json")
#: LMDB errors that mean the files are damaged (rebuilt); any other (EACCES, a full disk) is
#: the environment's, reported and never "repaired" by deleting.
_DAMAGED = (
    lmdb.CorruptedError,
    lmdb.InvalidError,
    lmdb.VersionMismatchError,
    lmdb.PageNotFoundError,
    lmdb.PanicError,
    lmdb.BadRslotError,
)


F = TypeVar("F", bound=Callable[..., Any])


def _rebuilds_on_garbage(method: F) -> F:
    """A read that meets a value it cannot decode rebuilds the index and reads again: the
    index is only a view of the store, so damage to it must never reach a caller."""

    @functools.wraps(method)
    def wrapper(self: Index, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except (ValueError, KeyError, TypeError, IndexError) as exc:  # UnicodeDecodeError too
            self._reset_and_rebuild(f"a value does not decode ({type(exc).__name__}: {exc})")
            return method(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _key(workflow: str, node: str) -> bytes:
    return f"{workflow}/{node}".encode()


class Index:
    """An open index over one store. Thread-safe for readers; writes serialize in LMDB."""

    def __init__(self, path: Path, store: Store) -> None:
        self.path = path
        self.store = store
        self._lock = threading.Lock()
        self._reconciled = -RECONCILE_EVERY  # the first follow_changes reconciles
        self._binding_mtimes: dict[tuple[str, str], int] = {}
        self._unreadable: dict[tuple[str, str], str] = {}  # binding -> why (said once)
        self.rebuilt = False
        _claim(path)
        try:
            self._open()
            with self.env.begin() as txn:
                fresh = txn.get(b"schema", db=self.meta) is None
            if fresh:
                self.rebuild()
            elif not self._valid():
                self._reset_and_rebuild("it belongs to another store or an older schema")
        except _DAMAGED as exc:
            self._reset_and_rebuild(f"it is corrupt ({exc})")
        except lmdb.Error as exc:
            raise EnvironmentProblem(f"cannot open the index at {path}: {exc}") from exc

    # -- opening --------------------------------------------------------------------------

    def _open(self) -> None:
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
        for name in _LMDB_FILES:  # only ours: _claim proved the directory is an index
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path / name)
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
        cursor = self.store.feed_end()
        count = 0
        with self.env.begin(write=True) as txn:
            for db in (self.bindings, self.revs, self.snaps):
                txn.drop(db, delete=False)
            for wf, node in self.store.binding_names():
                revisions = self._revisions(wf, node)  # None: unreadable, said once, skipped
                if revisions:
                    self._put_binding(txn, revisions)
                    count += 1
            for sid in self.store.snapshot_ids():
                if self.store.snapshot_ready(sid):
                    txn.put(sid.encode(), b"ready", db=self.snaps)
            txn.put(b"schema", SCHEMA, db=self.meta)
            txn.put(b"store_uuid", self.store.uuid.encode(), db=self.meta)
            txn.put(b"feed_cursor", cursor.dumps(), db=self.meta)
        self.rebuilt = True
        return count

    def _put_binding(self, txn: lmdb.Transaction, revisions: list[Revision]) -> None:
        """Record revisions; the current one only moves forward (revisions are append-only,
        so a writer holding an older list, e.g. from a parallel bind, never wins)."""
        newest = revisions[-1]
        key = _key(newest.workflow, newest.node)
        raw = txn.get(key, db=self.bindings)
        if raw is None or json.loads(bytes(raw))["revision"] <= newest.revision:
            value = {"revision": newest.revision, "snapshot_id": newest.snapshot_id}
            txn.put(key, json.dumps(value).encode(), db=self.bindings)
        for rev in revisions:
            txn.put(key + b"@%d" % rev.revision, rev.snapshot_id.encode(), db=self.revs)

    # -- writes ---------------------------------------------------------------------------

    def put_binding(self, revisions: list[Revision]) -> None:
        if revisions:
            with self.env.begin(write=True) as txn:
                self._put_binding(txn, revisions)

    def forget_binding(self, workflow: str, node: str) -> None:
        """Drop a removed binding (its ``@rev`` entries too)."""
        key = _key(workflow, node)
        with self.env.begin(write=True) as txn:
            txn.delete(key, db=self.bindings)
            cursor = txn.cursor(db=self.revs)
            ok = cursor.set_range(key + b"@")
            while ok and bytes(cursor.key()).startswith(key + b"@"):
                ok = cursor.delete()

    def mark_ready(self, snapshot_id: str) -> None:
        with self.env.begin(write=True) as txn:
            txn.put(snapshot_id.encode(), b"ready", db=self.snaps)

    # -- file digests (builds) -------------------------------------------------------------

    @staticmethod
    def _digest_key(st: os.stat_result) -> bytes:
        return b"%d:%d:%d:%d" % (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    @_rebuilds_on_garbage
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

    @_rebuilds_on_garbage
    def current(self, workflow: str, node: str) -> BindingView | None:
        with self.env.begin() as txn:
            raw = txn.get(_key(workflow, node), db=self.bindings)
        if raw is None:
            return None
        value = json.loads(raw)
        return BindingView(workflow, node, value["revision"], value["snapshot_id"])

    @_rebuilds_on_garbage
    def at_revision(self, workflow: str, node: str, revision: int) -> BindingView | None:
        with self.env.begin() as txn:
            raw = txn.get(_key(workflow, node) + b"@%d" % revision, db=self.revs)
        return None if raw is None else BindingView(workflow, node, revision, raw.decode())

    def is_ready(self, snapshot_id: str) -> bool:
        with self.env.begin() as txn:
            return txn.get(snapshot_id.encode(), db=self.snaps) is not None

    @_rebuilds_on_garbage
    def all_bindings(self) -> list[BindingView]:
        out = []
        with self.env.begin() as txn:
            for key, raw in txn.cursor(db=self.bindings):
                wf, node = bytes(key).decode().split("/", 1)
                value = json.loads(raw)
                out.append(BindingView(wf, node, value["revision"], value["snapshot_id"]))
        return out

    @_rebuilds_on_garbage
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

    @_rebuilds_on_garbage
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

    def feed_cursor(self) -> feed.Cursor:
        with self.env.begin() as txn:
            return feed.Cursor.loads(txn.get(b"feed_cursor", db=self.meta))

    def follow_changes(self, reconcile_every: float = RECONCILE_EVERY) -> list[tuple[str, str]]:
        """Apply store changes since the last call; the bindings that changed.

        Reads every host's log from the stored cursor (bindings named by ``bound`` /
        ``rolled_back`` events are re-read from their files; ``built`` marks a snapshot
        ready).  Every ``reconcile_every`` seconds it also compares each binding directory
        with the index (`reconcile`): the binding files are the truth and a log only a hint,
        so a bind whose writer died before logging is still seen.  A binding is returned
        whether or not this process already had it in the index: another process on the
        node may have written it first, and a daemon still has to invalidate the kernel's
        entries.
        """
        with self._lock:
            changes = self.store.changes_since(self.feed_cursor())
            if changes.skipped:
                log.warning(
                    "skipped %d unreadable line(s) in %s", changes.skipped, self.store.log_dir
                )
            if changes.reread:
                log.info("store logs shrank or were replaced, read again: %s", changes.reread)
            changed: dict[tuple[str, str], None] = {}
            ready: set[str] = set()
            for event in changes.events:
                if (
                    event.event in ("bound", "rolled_back", "removed")
                    and event.workflow
                    and event.node
                ):
                    changed[(event.workflow, event.node)] = None
                elif event.event == "built" and event.snapshot_id:
                    ready.add(event.snapshot_id)
            with self.env.begin(write=True) as txn:
                for wf, node in list(changed):
                    revisions = self._revisions(wf, node)
                    if revisions is None:
                        del changed[(wf, node)]
                    elif revisions:
                        self._put_binding(txn, revisions)
                    else:
                        txn.delete(_key(wf, node), db=self.bindings)  # removed
                for sid in ready:
                    if self.store.snapshot_ready(sid):
                        txn.put(sid.encode(), b"ready", db=self.snaps)
                txn.put(b"feed_cursor", changes.cursor.dumps(), db=self.meta)
            now = time.monotonic()
            if now - self._reconciled >= reconcile_every:
                self._reconciled = now
                for name in self.reconcile():
                    changed[name] = None
            return list(changed)

    def _revisions(self, workflow: str, node: str) -> list[Revision] | None:
        """A binding's revisions; None (and a log line) if one cannot be read: one damaged
        binding must not keep the others from being indexed or followed."""
        try:
            revisions = self.store.revisions(workflow, node)
        except EnvfsError as exc:
            if self._unreadable.get((workflow, node)) != exc.message:  # once, not every pass
                log.error("cannot read binding %s/%s (skipped): %s", workflow, node, exc.message)
            self._unreadable[(workflow, node)] = exc.message
            return None
        self._unreadable.pop((workflow, node), None)
        return revisions

    def reconcile(self) -> list[tuple[str, str]]:
        """Bring the index in line with the binding files; the bindings that were behind.

        A binding directory whose mtime is unchanged since the last pass is skipped (a new
        revision file changes it), so a pass over many unchanged bindings is one ``stat``
        each.
        """
        behind: list[tuple[str, str]] = []
        present = set(self.store.binding_names())
        for view in self.all_bindings():
            if (view.workflow, view.node) not in present:  # removed, its log line missed
                self.forget_binding(view.workflow, view.node)
                behind.append((view.workflow, view.node))
        for wf, node in present:
            try:
                mtime = os.stat(self.store.binding_dir(wf, node)).st_mtime_ns
            except FileNotFoundError:
                continue
            if self._binding_mtimes.get((wf, node)) == mtime:
                continue
            revisions = self._revisions(wf, node)
            if revisions is None:
                continue  # unreadable: tried again next pass
            current = self.current(wf, node)
            if revisions and (current is None or current.revision < revisions[-1].revision):
                self.put_binding(revisions)
                behind.append((wf, node))
            self._binding_mtimes[(wf, node)] = mtime
        return behind


def _claim(path: Path) -> None:
    """Make ``path`` an index directory, or prove it is one: marked, or holding nothing but
    what envfs keeps there (the marker is then written). Any other directory is refused,
    never cleared."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    entries = set(os.listdir(path))
    if MARKER in entries:
        make_private(path)
        return
    ours = entries <= {*_LMDB_FILES, *_ALSO_OURS}
    if not ours or ("data.mdb" in entries and not _is_envfs_lmdb(path)):
        raise BadInput(
            f"the index directory {path} holds files envfs did not make (no {MARKER} file "
            "in it); give --index (or ENVFS_INDEX) a new or empty directory"
        )
    make_private(path)
    (path / MARKER).write_text("an envfs index (a cache of the store): envfs may delete it\n")


def _is_envfs_lmdb(path: Path) -> bool:
    """Whether ``path`` holds an index of an envfs from before the marker (an LMDB with
    envfs's ``meta`` database and its schema key)."""
    try:
        env = lmdb.open(str(path), readonly=True, lock=False, max_dbs=8)
    except lmdb.Error:
        return False
    try:
        meta = env.open_db(b"meta", create=False)
        with env.begin() as txn:
            return txn.get(b"schema", db=meta) is not None
    except lmdb.Error:
        return False
    finally:
        env.close()


def open_index(path: Path, store: Store) -> Index:
    """Open (creating or rebuilding as needed) the index of ``store`` at ``path``."""
    try:
        return Index(path, store)
    except OSError as exc:
        raise EnvironmentProblem(
            f"cannot open the index at {path}: {exc.strerror}; pass --index DIR on a local disk"
        ) from exc
