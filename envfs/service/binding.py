"""Bindings: append a revision (bind, roll back), bind many at once (`bind_batch`), find a
snapshot by id or prefix, remove a binding. `Service` is one."""

from __future__ import annotations

import getpass
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from envfs.core.config import node_time
from envfs.core.errors import BadInput, Busy, EnvfsError, NotFound
from envfs.core.names import parse_target
from envfs.service.building import Building
from envfs.store.formats import IndexCheckpoint, Revision

#: A snapshot reference: a full id or a prefix of at least 6 hex digits.
_SNAPSHOT_REF = re.compile(r"[0-9a-f]{6,64}")


@dataclass
class BatchReport:
    """What `bind_batch` did: lines bound, lines already bound so, and each failed line."""

    bound: int = 0
    unchanged: int = 0
    failed: list[tuple[int, str]] = field(default_factory=list)  # (line number, why)
    revisions: list[Revision] = field(default_factory=list)  # those appended


class Binding(Building):
    """Binding revisions over the store and the index."""

    def bind(self, workflow: str, node: str, snapshot_id: str, reason: str = "") -> Revision:
        """Append a revision naming ``snapshot_id`` (no-op if it is already current)."""
        return self._bind(workflow, node, snapshot_id, reason)[0]

    def _bind(
        self, workflow: str, node: str, snapshot_id: str, reason: str, reread: bool = True
    ) -> tuple[Revision, bool]:
        """`bind`, and whether it appended a revision."""
        current = self.index.current(workflow, node)
        if current is not None and current.snapshot_id == snapshot_id:
            revisions = self.store.revisions(workflow, node)
            if revisions and revisions[-1].snapshot_id == snapshot_id:
                return revisions[-1], False
        return self._append(workflow, node, snapshot_id, "bound", reread, reason=reason), True

    def find_snapshot(self, ref: str) -> str:
        """The full id of a built or bound snapshot (one with a spec in the store) from its
        id or a unique prefix of at least 6 hex digits."""
        if not _SNAPSHOT_REF.fullmatch(ref):
            raise BadInput(
                f"{ref!r} is not a snapshot id (6 to 64 lowercase hex digits); "
                "see `envfs show WF/NODE`"
            )
        if len(ref) == 64:
            found = [ref] if self.store.spec_dir(ref).is_dir() else []
        else:
            found = [sid for sid in self.store.spec_ids() if sid.startswith(ref)]
        if not found:
            raise NotFound(f"no snapshot {ref} in the store; see `envfs ls` or `envfs show`")
        if len(found) > 1:
            raise BadInput(f"snapshot prefix {ref} names {len(found)} snapshots; give more of it")
        return found[0]

    def bind_snapshot(self, workflow: str, node: str, ref: str, reason: str = "") -> Revision:
        """`envfs bind WF/NODE --snapshot ID`: bind to a snapshot the store knows."""
        with self.store.gc_fence():  # no sweep between finding the snapshot and binding it
            return self.bind(workflow, node, self.find_snapshot(ref), reason)

    def bind_batch(self, lines: Iterable[str], reason: str = "", every: int = 1000) -> BatchReport:
        """`envfs bind --batch`: one ``WF/NODE ID`` per line (blank lines and ``#`` comments
        skipped), each bound as `bind_snapshot` would (see `bind_entries`)."""

        def entries() -> Iterable[tuple[int, str, str]]:
            for number, raw in enumerate(lines, 1):
                line = raw.split("#", 1)[0].strip()
                if line:
                    fields = line.split()
                    yield number, fields[0], fields[1] if len(fields) == 2 else ""

        return self.bind_entries(entries(), reason, every)

    def bind_entries(
        self, entries: Iterable[tuple[int, str, str]], reason: str = "", every: int = 1000
    ) -> BatchReport:
        """Bind each ``(number, "WF/NODE", snapshot id or prefix)`` as `bind_snapshot` would,
        all or nothing per entry: one that fails is reported with its number and the others
        go on. One gc fence for all; progress every ``every`` entries."""
        report = BatchReport()
        ids: dict[str, str] = {}  # reference -> full id, found once per batch
        with self.store.gc_fence():  # taken once: every entry binds under it
            for count, (number, target, ref) in enumerate(entries, 1):
                try:
                    if not ref:
                        raise BadInput(f"{target!r} is not followed by a snapshot id")
                    workflow, node = parse_target(target)
                    if ref not in ids:
                        ids[ref] = self.find_snapshot(ref)
                    rev, appended = self._bind(workflow, node, ids[ref], reason, reread=False)
                except EnvfsError as exc:
                    report.failed.append((number, exc.message))
                    continue
                if appended:
                    report.bound += 1
                    report.revisions.append(rev)
                else:
                    report.unchanged += 1
                if count % every == 0:
                    self._say(f"{count} bound or checked, {len(report.failed)} failed")
        return report

    def refresh_index(self, full: bool = False, every: int = 1000) -> list[tuple[str, str]]:
        """`envfs index refresh` (``full``: `rebuild`): read every binding file now; the
        bindings the index was behind on. Each is logged (``rescanned``), so that every
        node's daemon re-reads it too and invalidates what its kernel cached."""

        def progress(done: int, total: int) -> None:
            if done == total or done % every == 0:
                self._say(f"read {done} of {total} bindings")

        index = self.index
        behind = index.rebuild(progress) if full else index.reconcile(progress)
        for workflow, node in behind:
            self.store.audit("rescanned", self.host, None, workflow=workflow, node=node)
        return behind

    def write_checkpoint(self) -> IndexCheckpoint:
        """`envfs index checkpoint`: this node's index, caught up with the feed now, as the
        store's checkpoint (what a fresh node's index starts from)."""
        self.index.follow_changes()
        with self.store.checkpoint_claim() as mine:
            if not mine:
                raise Busy(
                    f"another node is writing a checkpoint ({self.store.checkpoint_dir}/claim); "
                    "try again in a minute"
                )
            return self.index.write_checkpoint(self.host)

    def rollback(self, workflow: str, node: str, to: int | None) -> Revision:
        """Append a revision naming an earlier revision's snapshot (default: the last other one)."""
        revisions = self.revisions(workflow, node)
        current = revisions[-1]
        if to is None:
            earlier = [r for r in revisions[:-1] if r.snapshot_id != current.snapshot_id]
            if not earlier:
                raise NotFound(f"{workflow}/{node} has no earlier revision to roll back to")
            target = earlier[-1]
        else:
            matches = [r for r in revisions if r.revision == to]
            if not matches:
                raise NotFound(
                    f"{workflow}/{node} has no revision {to}; see `envfs history {workflow}/{node}`"
                )
            target = matches[0]
        return self._append(
            workflow,
            node,
            target.snapshot_id,
            "rolled_back",
            True,
            action="rollback",
            rollback_to=target.revision,
            reason=f"rollback to revision {target.revision}",
        )

    def _append(
        self, workflow: str, node: str, snapshot_id: str, event: str, reread: bool, **fields: Any
    ) -> Revision:
        """Append one revision, audit it, and update the index (with every revision of the
        binding read again, unless not ``reread``: a bulk bind records only its own)."""
        user = self.user or _user()

        def make(number: int) -> Revision:
            return Revision(
                workflow=workflow,
                node=node,
                revision=number,
                snapshot_id=snapshot_id,
                time=node_time(),
                host=self.host,
                user=user,
                **fields,
            )

        with self.store.gc_fence():  # gc must not sweep what this revision names meanwhile
            # readers re-read a binding named by an intent until its change is logged: a
            # writer dying between the two is still seen (envfs.store.feed)
            self.store.audit("binding_intent", self.host, snapshot_id, workflow=workflow, node=node)
            rev, first = self.store.append_revision(make)
        extra = {"to": rev.rollback_to} if rev.rollback_to is not None else {}
        self.store.audit(
            event,
            self.host,
            snapshot_id,
            workflow=workflow,
            node=node,
            revision=rev.revision,
            user=user,
            reason=rev.reason,
            revision_time=rev.time,
            first=first,
            **extra,
        )
        if reread:
            self.index.put_binding(self.store.revisions(workflow, node))
        else:
            self.index.put_binding([rev], first=first)
        return rev

    def revisions(self, workflow: str, node: str) -> list[Revision]:
        """A binding's history: from the index when it has every revision whole (their
        log lines carry them), else from the binding's files (then kept in the index)."""
        found = self.index.revisions(workflow, node)
        current = self.index.current(workflow, node)
        if found and current is not None and found[-1].revision == current.revision:
            return found
        revisions = self.store.revisions(workflow, node)
        if not revisions:
            raise no_binding(workflow, node)
        self.index.put_binding(revisions)
        return revisions

    def remove(self, workflow: str, node: str) -> int:
        """Remove a binding (its revisions go to ``trash/``); the revisions it had. Its files
        are not read: a binding with a corrupt revision can be removed too."""
        revisions = self.store.revision_numbers(workflow, node)
        if not revisions:
            raise no_binding(workflow, node)
        with self.store.gc_fence():
            self.store.audit("binding_intent", self.host, None, workflow=workflow, node=node)
            self.store.trash_binding(workflow, node, self.store.store_now())
            self.store.audit("removed", self.host, None, workflow=workflow, node=node)
            self.index.forget_binding(workflow, node)
        return len(revisions)


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


def no_binding(workflow: str, node: str) -> NotFound:
    return NotFound(f"no binding {workflow}/{node}; create it with `envfs build` or `bind`")
