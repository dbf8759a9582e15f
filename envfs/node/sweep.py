"""The index's background sweep and full walks: comparing the binding files with the index
(`Sweeping.sweep_step`, one small step at a time within a request budget; `reconcile`, every
binding at once in threads). `envfs.node.index.Index` is one; see its module for the tables."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import lmdb

from envfs.core.views import BindingView
from envfs.node.records import binding_key
from envfs.store.formats import Revision
from envfs.store.layout import Store

#: NAS requests per second a daemon's background sweep of the binding files may spend.
SWEEP_RATE = 0.2
#: Threads that read binding files in a full walk (`reconcile`): on a NAS each read is a
#: few round trips, so they overlap.
WALK_THREADS = 16


class Sweeping:
    """The sweep's half of an `Index` (whose tables and reads these are)."""

    store: Store
    env: lmdb.Environment
    meta: lmdb._Database
    bindings: lmdb._Database
    swept: lmdb._Database
    unsettled: lmdb._Database
    _sweep: _Sweep
    _lock: threading.RLock

    def workflows(self) -> list[str]:
        raise NotImplementedError

    def nodes(self, workflow: str) -> list[str]:
        raise NotImplementedError

    def all_bindings(self) -> list[BindingView]:
        raise NotImplementedError

    def forget_binding(self, workflow: str, node: str) -> None:
        raise NotImplementedError

    def _catch_up(self, workflow: str, node: str) -> bool:
        raise NotImplementedError

    def _revisions(self, workflow: str, node: str) -> list[Revision] | None:
        raise NotImplementedError

    def _put_binding(self, txn: lmdb.Transaction, revisions: list[Revision]) -> None:
        raise NotImplementedError

    def sweep_step(self) -> list[tuple[str, str]]:
        """One step of the background sweep, which compares the binding files with the
        index; the bindings that were behind.

        A step is one small thing: a ``stat`` of ``bindings/`` (listed when it changed) at
        the start of a pass; a ``stat`` of one workflow's directory, listed only when it
        changed since its last full visit (a writer touches it after each new revision, and
        adding or removing a node changes it anyway); or the listing of one node's
        revisions, read only when the index is behind them. After each step the sweep waits
        until the requests it made fit in `SWEEP_RATE`, so it costs the NAS the same
        whatever the size of the store: a pass over W unchanged workflows takes about
        2 W / SWEEP_RATE seconds (100 workflows: 17 minutes); a workflow not visited since
        this index was made costs a listing per node (10,000 bindings: about 2 days).
        ``envfs index refresh`` does a whole pass at once. Workflows fully visited are
        remembered in the index with their directory's stamp, across restarts.
        """
        sweep, root = self._sweep, self.store.bindings
        behind: list[tuple[str, str]] = []
        cost = 2  # a stat: the name looked up again (NAS clients cache names ~1 s), then read
        if sweep.nodes:  # in the middle of a changed workflow: one node
            node = sweep.nodes.pop()
            cost = 4  # a listing of its revision numbers (more if it was behind)
            if self._catch_up(sweep.workflow, node):
                behind.append((sweep.workflow, node))
            if not sweep.nodes:
                self._swept(sweep.workflow, sweep.stamp)
        elif sweep.queue:  # the next workflow: unchanged since its last visit, or listed
            wf = sweep.queue.pop()
            stamp = _stamp(root / wf)
            if stamp is None:  # gone: every node of it went
                for node in self.nodes(wf):
                    self.forget_binding(wf, node)
                    behind.append((wf, node))
                self._swept(wf, None)
            elif stamp != self._swept_stamp(wf):
                cost += 4
                try:
                    present = set(os.listdir(root / wf))
                except (FileNotFoundError, NotADirectoryError):
                    present = set()
                sweep.workflow, sweep.stamp = wf, stamp
                sweep.nodes = sorted(present | set(self.nodes(wf)), reverse=True)
                if not sweep.nodes:
                    self._swept(wf, stamp)
        else:  # a new pass
            stamp = _stamp(root)
            if stamp != sweep.root_stamp or sweep.workflows is None:
                cost += 4
                try:
                    sweep.workflows = sorted(os.listdir(root))
                except FileNotFoundError:
                    sweep.workflows = []
                sweep.root_stamp = stamp
            gone = set(self.workflows()) - set(sweep.workflows)
            sweep.queue = sorted(set(sweep.workflows) | gone, reverse=True)
        sweep.next_at = time.monotonic() + cost / sweep.rate
        return behind

    def _swept_stamp(self, workflow: str) -> str | None:
        with self.env.begin() as txn:
            raw = txn.get(workflow.encode(), db=self.swept)
        return None if raw is None else bytes(raw).decode()

    def _swept(self, workflow: str, stamp: str | None) -> None:
        with self.env.begin(write=True) as txn:
            if stamp is None:
                txn.delete(workflow.encode(), db=self.swept)
            else:
                txn.put(workflow.encode(), stamp.encode(), db=self.swept)

    def reconcile(
        self, progress: Callable[[int, int], None] | None = None
    ) -> list[tuple[str, str]]:
        """Bring the index in line with every binding file now (``envfs index refresh``);
        the bindings that were behind. Bindings are read by `WALK_THREADS` threads."""
        from concurrent.futures import ThreadPoolExecutor

        workflows = {wf: _stamp(self.store.bindings / wf) for wf in self.store.workflow_names()}
        present = list(self.store.binding_names())
        behind: list[tuple[str, str]] = []
        known = {(v.workflow, v.node) for v in self.all_bindings()}
        for name in sorted(known - set(present)):  # removed, its log line missed
            self.forget_binding(*name)
            behind.append(name)
        with ThreadPoolExecutor(WALK_THREADS) as pool:
            done = 0
            for start in range(0, len(present), 1000):
                chunk = present[start : start + 1000]
                read = list(pool.map(lambda name: self._revisions(*name), chunk))
                with self.env.begin(write=True) as txn:
                    for name, revisions in zip(chunk, read, strict=True):
                        if not revisions:
                            continue  # unreadable (said once) or emptied meanwhile
                        raw = txn.get(binding_key(*name), db=self.bindings)
                        before = None if raw is None else json.loads(bytes(raw))
                        self._put_binding(txn, revisions)
                        newest = revisions[-1]
                        if before is None or before["revision"] < newest.revision:
                            behind.append(name)
                done += len(chunk)
                if progress is not None:
                    progress(done, len(present))
        for wf, stamp in workflows.items():  # as of before the walk: the sweep starts there
            self._swept(wf, stamp)
        with self.env.begin(write=True) as txn:  # what rotated logs lost is read now
            txn.delete(b"walk_due", db=self.meta)
        return behind

    def settled_bindings(self) -> dict[tuple[str, str], tuple[int, int]]:
        """The bindings whose revisions this index knows for certain, as (first, current)
        revision numbers: those a line or a read of their files described last, with the
        lowest number their files have; not those named by an intent or a rescan no line
        has described since, nor any while logs were lost under the index (rotated:
        until `reconcile`). What gc may take without listing a binding (`envfs.store.gc`):
        every envfs writer logs its intent before it changes a binding's files."""
        out: dict[tuple[str, str], tuple[int, int]] = {}
        with self.env.begin() as txn:
            if txn.get(b"walk_due", db=self.meta) is not None:
                return out
            unsettled = {bytes(key) for key, _value in txn.cursor(db=self.unsettled)}
            for key, raw in txn.cursor(db=self.bindings):
                value = json.loads(raw)
                if "first" in value and bytes(key) not in unsettled:
                    wf, node = bytes(key).decode().split("/", 1)
                    out[(wf, node)] = (int(value["first"]), int(value["revision"]))
        return out


class _Sweep:
    """Where the background sweep is (see `Sweeping.sweep_step`)."""

    def __init__(self) -> None:
        self.rate = float(os.environ.get("ENVFS_SWEEP_RATE") or SWEEP_RATE)  # a test knob
        self.full_due = False
        self.next_at = 0.0
        self.root_stamp: str | None = None
        self.workflows: list[str] | None = None
        self.queue: list[str] = []  # workflows left in this pass, the next one last
        self.workflow = ""  # the workflow whose nodes are being read, and its stamp
        self.stamp = ""
        self.nodes: list[str] = []  # its nodes left, the next one last


def _stamp(path: Path) -> str | None:
    """What changes when a directory's entries (or a writer's touch) change it."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return f"{st.st_ino}:{st.st_mtime_ns}:{st.st_ctime_ns}"
