"""The node-local LMDB index: a fast, rebuildable view of the store (with its sweep and seed,
the only lmdb importer).

Databases:
    meta       schema version, store uuid, feed cursor (how far each host's log was read),
               walk_due (logs were rotated under this index: lines may be lost),
               acl_serial (moves with every ACL change taken in)
    bindings   "wf/node"      -> current revision (JSON: revision, snapshot_id, and first:
               the lowest revision number its files have, when known)
    revs       "wf/node@rev"  -> the revision (its JSON record; or the ``bound`` feed line that
               told of it, `LINE` + the line, as a seed keeps it; or a bare snapshot id)
    snapshots  id             -> "ready" (present only once the snapshot is complete)
    specs      id             -> its ``spec.json`` (immutable: read from the store once)
    swept      workflow       -> its directory's stamp when the sweep last read all of it
    unsettled  "wf/node"      -> "" (a ``binding_intent`` or ``rescanned`` line told of a
               change its files hold and no line has described yet: gc reads its files)
    locks      "digest\0created\0id" -> "" (requirement-list specs by interpreter, oldest
               first: where a new list's lock starts from, `nearest_spec`)
    acls       workflow       -> its `WorkflowAcl` (JSON), as the store's ``acls/`` has it
    digests    "dev:ino:size:mtime_ns" -> sha256 of a store file shared with uv's cache, so
               builds do not hash a wheel's files again (node-local: inodes are)

The index is never the source of truth. A missing, corrupt or foreign index (another
store's) is seeded from the change feed (`seed`: a few large reads, whatever the number of
bindings), then kept in step with it; the binding files are walked only by `rebuild` and
`reconcile` (``envfs index rebuild`` / ``refresh``) and, a workflow at a time within a
request budget, by a daemon's background `sweep_step`.
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
from envfs.node.acls import ACL_EVENTS, AclTable
from envfs.node.checkpoints import Checkpointing
from envfs.node.records import INTENT_WAIT, SCHEMA, binding_key, revision_of, spec_of
from envfs.node.seed import no_cycle_collection, one_seed_at_a_time, plan, write_bindings
from envfs.node.sweep import Sweeping, _Sweep
from envfs.store import feed
from envfs.store.files import make_private
from envfs.store.formats import Revision, SpecInfo
from envfs.store.layout import Store, closest_spec

log = logging.getLogger(__name__)

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


class Index(Sweeping, AclTable, Checkpointing):
    """An open index over one store. Thread-safe for readers; writes serialize in LMDB."""

    def __init__(self, path: Path, store: Store) -> None:
        self.path = path
        self.store = store
        self._lock = threading.RLock()  # a read that meets garbage re-seeds under it
        self._probe = feed.Probe(store.log_dir)
        self._pending: dict[tuple[str, str], float] = {}  # intents not yet logged as done
        self._sweep = _Sweep()
        self._unreadable: dict[tuple[str, str], str] = {}  # binding -> why (said once)
        self.rebuilt = False
        _claim(path)
        try:
            self._open()
            with self.env.begin() as txn:
                fresh = txn.get(b"schema", db=self.meta) is None
            if fresh:
                self.seed(unless_seeded=True)
            elif not self._valid():
                self._reset_and_rebuild("it belongs to another store or an older schema")
        except _DAMAGED as exc:
            self._reset_and_rebuild(f"it is corrupt ({exc})")
        except lmdb.Error as exc:
            raise EnvironmentProblem(f"cannot open the index at {path}: {exc}") from exc
        with self.env.begin() as txn:  # logs were lost under it (here, or where it came from)
            self._sweep.full_due = txn.get(b"walk_due", db=self.meta) is not None

    # -- opening --------------------------------------------------------------------------

    def _open(self) -> None:
        self.env = lmdb.open(str(self.path), map_size=MAP_SIZE, max_dbs=16, max_readers=512)
        self.meta = self.env.open_db(b"meta")
        self.bindings = self.env.open_db(b"bindings")
        self.revs = self.env.open_db(b"revs")
        self.snaps = self.env.open_db(b"snapshots")
        self.specs = self.env.open_db(b"specs")
        self.swept = self.env.open_db(b"swept")
        self.locks = self.env.open_db(b"locks")
        self.digests = self.env.open_db(b"digests")
        self.unsettled = self.env.open_db(b"unsettled")
        self.acl_db = self.env.open_db(b"acls")

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
        self.seed()

    def close(self) -> None:
        """Close it; under the lock, so not in the middle of a checkpoint's copy of the
        tables (`write_checkpoint`, in a daemon's thread: it fails cleanly after)."""
        with self._lock:
            self._probe.close()
            self.env.close()

    # -- seeding and rebuilding ------------------------------------------------------------

    def seed(self, unless_seeded: bool = False) -> int:
        """Fill an empty index from the store's checkpoint, if it has one this index can
        take (one large read), else from the change feed alone: every host's log read from
        its start (a few large reads). No binding file is opened: bindings the logs do not
        tell of (lost logs) are found later by the sweep, or at once by `reconcile`.
        Returns the bindings found. Written in batches (LMDB keeps the pages of one big
        write for good) under a lock between processes: the schema goes in last, so a seed
        cut short is done again; a process that finds an index another seeded meanwhile
        takes it."""
        # no cyclic GC meanwhile: 200,000 lines' objects would set it off ~100 times
        with self._lock, one_seed_at_a_time(self.path / MARKER), no_cycle_collection():
            if unless_seeded:
                with self.env.begin() as txn:
                    if txn.get(b"schema", db=self.meta) is not None:
                        return 0
            found = self._seed_from_checkpoint()
            if found is None:
                found = self._seed_from_feed()
            with self.env.begin(write=True) as txn:
                self._load_acls(txn)
                txn.put(b"schema", SCHEMA, db=self.meta)
                txn.put(b"store_uuid", self.store.uuid.encode(), db=self.meta)
            self.rebuilt = True
            return found

    def _seed_from_feed(self) -> int:
        scan = self.store.scan_since(feed.Cursor())
        seed = plan(scan.entries)
        deadline = time.monotonic() + INTENT_WAIT
        self._pending.update(dict.fromkeys(seed.pending, deadline))
        self._clear()
        with self.env.begin(write=True) as txn:
            for info in seed.specs:
                self._put_spec(txn, info)
            for name in seed.unsettled:
                txn.put(binding_key(*name), b"", db=self.unsettled)
        write_bindings(self.env, self.bindings, self.revs, seed)
        with self.env.begin(write=True) as txn:
            for sid in seed.ready:
                txn.put(sid.encode(), b"ready", db=self.snaps)
            txn.put(b"feed_cursor", scan.cursor.dumps(), db=self.meta)
        return len(seed.found)

    def rebuild(self, progress: Callable[[int, int], None] | None = None) -> list[tuple[str, str]]:
        """Bring the index in line with a full walk of the store (every binding file read,
        in threads; every snapshot's readiness checked); the bindings that were behind. Runs
        while a daemon serves from the same index: entries are replaced in batches, never
        dropped first."""
        behind = self.reconcile(progress)
        ready = {sid for sid in self.store.snapshot_ids() if self.store.snapshot_ready(sid)}
        with self.env.begin(write=True) as txn:
            for key, _value in list(txn.cursor(db=self.snaps)):
                if bytes(key).decode() not in ready:
                    txn.delete(key, db=self.snaps)
            for sid in ready:
                txn.put(sid.encode(), b"ready", db=self.snaps)
            self._load_acls(txn)
        self.rebuilt = True
        return behind

    def _put_binding(
        self, txn: lmdb.Transaction, revisions: list[Revision], first: int | None = None
    ) -> None:
        """Record revisions: all a binding's files hold, or (given ``first``, the lowest
        revision number its files have) some of them. The current one only moves forward
        (revisions are append-only, so a writer holding an older list, e.g. from a
        parallel bind, never wins)."""
        newest = revisions[-1]
        key = binding_key(newest.workflow, newest.node)
        raw = txn.get(key, db=self.bindings)
        if raw is None or json.loads(bytes(raw))["revision"] <= newest.revision:
            value = {
                "revision": newest.revision,
                "snapshot_id": newest.snapshot_id,
                "first": revisions[0].revision if first is None else first,
            }
            txn.put(key, json.dumps(value).encode(), db=self.bindings)
        for rev in revisions:
            txn.put(key + b"@%d" % rev.revision, rev.model_dump_json().encode(), db=self.revs)
        self._binding_changed(txn, newest.workflow)

    # -- writes ---------------------------------------------------------------------------

    def put_binding(self, revisions: list[Revision], first: int | None = None) -> None:
        """Record all of a binding's revisions, or some given its ``first``."""
        if revisions:
            with self.env.begin(write=True) as txn:
                self._put_binding(txn, revisions, first)

    def forget_binding(self, workflow: str, node: str) -> None:
        """Drop a removed binding (its ``@rev`` entries too)."""
        with self.env.begin(write=True) as txn:
            self._forget(txn, workflow, node)

    def _forget(self, txn: lmdb.Transaction, workflow: str, node: str) -> None:
        key = binding_key(workflow, node)
        txn.delete(key, db=self.bindings)
        cursor = txn.cursor(db=self.revs)
        ok = cursor.set_range(key + b"@")
        while ok and bytes(cursor.key()).startswith(key + b"@"):
            ok = cursor.delete()
        self._binding_changed(txn, workflow)

    def mark_ready(self, snapshot_id: str) -> None:
        with self.env.begin(write=True) as txn:
            txn.put(snapshot_id.encode(), b"ready", db=self.snaps)

    @_rebuilds_on_garbage
    def spec(self, snapshot_id: str) -> SpecInfo | None:
        """A spec read from the store before (specs never change once written)."""
        with self.env.begin() as txn:
            raw = txn.get(snapshot_id.encode(), db=self.specs)
        return None if raw is None else SpecInfo.model_validate_json(bytes(raw))

    def remember_spec(self, info: SpecInfo) -> None:
        with self.env.begin(write=True) as txn:
            self._put_spec(txn, info)

    def _put_spec(self, txn: lmdb.Transaction, info: SpecInfo) -> None:
        txn.put(info.snapshot_id.encode(), info.model_dump_json().encode(), db=self.specs)
        if info.kind == "requirements" and info.interpreter.digest:
            key = b"%s\0%017.6f\0%s" % (
                info.interpreter.digest.encode(),
                info.created,
                info.snapshot_id.encode(),
            )
            txn.put(key, b"", db=self.locks)

    @_rebuilds_on_garbage
    def nearest_spec(
        self,
        reqs: list[str],
        interpreter: str,
        indexes: tuple[str | None, list[str]] = (None, []),
        scan: int = 200,
    ) -> SpecInfo | bool | None:
        """The requirement-list spec sharing the most requirements with ``reqs`` for this
        interpreter digest and these indexes (default, extra), among the ``scan`` newest this
        index knows (from the feed's ``spec_written`` lines and the specs read); None if none
        shares any; False if the index knows no spec of this interpreter at all (a store
        from before those lines: the caller may scan the store)."""
        prefix = interpreter.encode() + b"\0"
        with self.env.begin() as txn:
            cursor = txn.cursor(db=self.locks)
            ids: list[bytes] = []
            ok = cursor.set_range(prefix)
            while ok and bytes(cursor.key()).startswith(prefix):
                ids.append(bytes(cursor.key()).rsplit(b"\0", 1)[1])
                ok = cursor.next()
            if not ids:
                return False
            raws = [txn.get(sid, db=self.specs) for sid in reversed(ids[-scan:])]
        specs = (SpecInfo.model_validate_json(bytes(raw)) for raw in raws if raw is not None)
        return closest_spec(specs, reqs, interpreter, indexes)

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
            raw = txn.get(binding_key(workflow, node), db=self.bindings)
        if raw is None:
            return None
        value = json.loads(raw)
        return BindingView(workflow, node, value["revision"], value["snapshot_id"])

    @_rebuilds_on_garbage
    def at_revision(self, workflow: str, node: str, revision: int) -> BindingView | None:
        with self.env.begin() as txn:
            raw = txn.get(binding_key(workflow, node) + b"@%d" % revision, db=self.revs)
        if raw is None:
            return None
        sid = revision_of(bytes(raw))
        return BindingView(
            workflow, node, revision, sid if isinstance(sid, str) else sid.snapshot_id
        )

    @_rebuilds_on_garbage
    def revisions(self, workflow: str, node: str) -> list[Revision] | None:
        """A binding's revisions, oldest first, as the index has them; None if it has only
        the snapshot id of one of them (or none): then the files must be read."""
        prefix = binding_key(workflow, node) + b"@"
        found: list[Revision] = []
        with self.env.begin() as txn:
            cursor = txn.cursor(db=self.revs)
            ok = cursor.set_range(prefix)
            while ok and bytes(cursor.key()).startswith(prefix):
                rev = revision_of(bytes(cursor.value()))
                if isinstance(rev, str):
                    return None
                found.append(rev)
                ok = cursor.next()
        return sorted(found, key=lambda r: r.revision) or None

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

    def follow_changes(self, sweep: bool = False) -> list[tuple[str, str]]:
        """Apply store changes since the last call; the bindings that changed.

        At rest this costs one request: the feed's `feed.Probe`. When it moved, every
        host's log is read from the stored cursor (bindings named by ``bound`` /
        ``rolled_back`` / ``removed`` / ``rescanned`` lines are re-read from their files;
        ``built`` and ``gc_swept`` mark a snapshot ready or not). A binding named by a
        ``binding_intent`` line is re-read at every call until its change is logged (or
        `INTENT_WAIT` passes): its writer may have died in between. With ``sweep`` (the
        daemon), one `sweep_step` is taken when its request budget allows. A binding is
        returned whether or not this process already had it in the index: another process
        on the node may have written it first, and a daemon still has to invalidate the
        kernel's entries.
        """
        with self._lock:
            changed: dict[tuple[str, str], None] = {}
            try:
                if self._probe.changed():
                    changed.update(dict.fromkeys(self._read_feed()))
            except BaseException:
                self._probe.close()  # read the logs again next time
                raise
            now = time.monotonic()
            for name, deadline in list(self._pending.items()):
                if self._catch_up(*name):
                    changed[name] = None
                if now >= deadline:
                    del self._pending[name]
            if sweep and self._sweep.full_due:
                self._sweep.full_due = False
                log.info("reading every binding file (logs were rotated or replaced)")
                changed.update(dict.fromkeys(self.reconcile()))
            elif sweep and now >= self._sweep.next_at:
                changed.update(dict.fromkeys(self.sweep_step()))
            return list(changed)

    def _read_feed(self) -> list[tuple[str, str]]:
        changes = self.store.changes_since(self.feed_cursor())
        if changes.skipped:
            log.warning("skipped %d unreadable line(s) in %s", changes.skipped, self.store.log_dir)
        if changes.reread:
            log.info("store logs shrank or were replaced, read again: %s", changes.reread)
            self._sweep.full_due = True  # lines may be lost with them: walk the files
            with self.env.begin(write=True) as txn:  # and gc may not trust the index meanwhile
                txn.put(b"walk_due", b"1", db=self.meta)
        changed: dict[tuple[str, str], None] = {}
        settled: dict[tuple[str, str], bool] = {}  # the last word of the lines on a binding
        ready: dict[str, bool] = {}
        acls: set[str] = set()
        for event in changes.events:
            name = (event.workflow or "", event.node or "")
            if event.event in ACL_EVENTS and event.workflow:
                acls.add(event.workflow)
            elif event.event in ("bound", "rolled_back", "removed", "rescanned") and all(name):
                changed[name] = None
                self._pending.pop(name, None)
                settled[name] = True  # its files are read below
            elif event.event == "binding_intent" and all(name):
                self._pending[name] = time.monotonic() + INTENT_WAIT
                settled[name] = False
            elif event.event == "built" and event.snapshot_id:
                ready[event.snapshot_id] = True
            elif event.event == "gc_swept" and event.snapshot_id:
                ready[event.snapshot_id] = False
        specs = [s for s in map(spec_of, changes.events) if s is not None]
        with self.env.begin(write=True) as txn:
            for info in specs:
                self._put_spec(txn, info)
            for workflow in acls:
                self._reload_acl(txn, workflow)
            for name, done in settled.items():
                if done:
                    txn.delete(binding_key(*name), db=self.unsettled)
                else:
                    txn.put(binding_key(*name), b"", db=self.unsettled)
            for wf, node in list(changed):
                revisions = self._revisions(wf, node)
                if revisions is None:  # unreadable: gc must read it (and refuse) too
                    del changed[(wf, node)]
                    txn.put(binding_key(wf, node), b"", db=self.unsettled)
                elif revisions:
                    self._put_binding(txn, revisions)
                else:
                    self._forget(txn, wf, node)  # removed
            for sid, is_ready in ready.items():
                if not is_ready:
                    txn.delete(sid.encode(), db=self.snaps)
                elif self.store.snapshot_ready(sid):
                    txn.put(sid.encode(), b"ready", db=self.snaps)
            txn.put(b"feed_cursor", changes.cursor.dumps(), db=self.meta)
        return list(changed)

    def _catch_up(self, workflow: str, node: str) -> bool:
        """Re-read one binding from its files (its revisions only if the index is behind
        their numbers); whether the index was behind."""
        numbers = self.store.revision_numbers(workflow, node)
        current = self.current(workflow, node)
        if not numbers:
            if current is None:
                return False
            self.forget_binding(workflow, node)
            return True
        if current is not None and current.revision >= numbers[-1]:
            return False
        revisions = self._revisions(workflow, node)
        if not revisions:
            return False
        self.put_binding(revisions)
        return True

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
