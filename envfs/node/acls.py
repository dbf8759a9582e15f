"""The index's table of workflow ACLs (`envfs.store.formats.WorkflowAcl`): read from the
store's ``acls/`` when the index is seeded or rebuilt, and again for a workflow whenever
the feed says its ACL changed (``acl_set`` / ``acl_removed``). `envfs.node.index.Index` is
one; its ``acl_serial`` (in the index, so a change another process on the node took in
counts too) moves with every ACL change and every change of a restricted workflow's
bindings, so a daemon knows to re-apply them."""

from __future__ import annotations

import threading

import lmdb

from envfs.node.records import revision_of
from envfs.store.formats import WorkflowAcl
from envfs.store.layout import Store

#: The feed lines that say a workflow's ACL changed.
ACL_EVENTS = ("acl_set", "acl_removed")


class AclTable:
    store: Store
    env: lmdb.Environment
    acl_db: lmdb._Database
    revs: lmdb._Database
    meta: lmdb._Database
    _lock: threading.RLock

    def acl_serial(self) -> int:
        """Index-only. Moves whenever any process takes an ACL change into this index."""
        with self.env.begin() as txn:
            raw = txn.get(b"acl_serial", db=self.meta)
        return int(raw) if raw is not None else 0

    def _binding_changed(self, txn: lmdb.Transaction, workflow: str) -> None:
        """A binding of ``workflow`` changed: if an ACL restricts it, which snapshots only
        restricted workflows bind may have changed too."""
        if txn.get(workflow.encode(), db=self.acl_db) is not None:
            self._bump(txn)

    def _bump(self, txn: lmdb.Transaction) -> None:
        raw = txn.get(b"acl_serial", db=self.meta)
        txn.put(b"acl_serial", b"%d" % (int(raw or 0) + 1), db=self.meta)

    def acl(self, workflow: str) -> WorkflowAcl | None:
        """Index-only. The ACL of a workflow; None: readable by all."""
        with self.env.begin() as txn:
            raw = txn.get(workflow.encode(), db=self.acl_db)
        return None if raw is None else WorkflowAcl.model_validate_json(bytes(raw))

    def acls(self) -> list[WorkflowAcl]:
        """Index-only. Every workflow ACL, by workflow name."""
        with self.env.begin() as txn:
            return [
                WorkflowAcl.model_validate_json(bytes(raw))
                for _key, raw in txn.cursor(db=self.acl_db)
            ]

    def snapshots_of(self, workflow: str) -> set[str]:
        """Index-only. The snapshots any revision of any binding of ``workflow`` names."""
        prefix = workflow.encode() + b"/"
        out: set[str] = set()
        with self.env.begin() as txn:
            cursor = txn.cursor(db=self.revs)
            ok = cursor.set_range(prefix)
            while ok and bytes(cursor.key()).startswith(prefix):
                rev = revision_of(bytes(cursor.value()))
                out.add(rev if isinstance(rev, str) else rev.snapshot_id)
                ok = cursor.next()
        return out

    def _load_acls(self, txn: lmdb.Transaction) -> None:
        """Every ACL the store has, replacing what the table held."""
        txn.drop(self.acl_db, delete=False)
        for acl in self.store.acls():
            txn.put(acl.workflow.encode(), acl.model_dump_json().encode(), db=self.acl_db)
        self._bump(txn)

    def _reload_acl(self, txn: lmdb.Transaction, workflow: str) -> None:
        """One workflow's ACL as its file says now."""
        acl = self.store.read_acl(workflow)
        if acl is None:
            txn.delete(workflow.encode(), db=self.acl_db)
        else:
            txn.put(workflow.encode(), acl.model_dump_json().encode(), db=self.acl_db)
        self._bump(txn)
