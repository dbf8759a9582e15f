"""Who may read which workflow's envs: `envfs acl` over the store's ACLs (`Access`), and
what a node makes of them (`Permissions`): the owner, group and mode the mount gives a
restricted workflow's directory and a snapshot that only restricted workflows bind."""

from __future__ import annotations

import grp
import logging
import threading
from dataclasses import dataclass

from envfs.core.config import node_time
from envfs.core.errors import BadInput
from envfs.core.names import validate_name
from envfs.node.index import Index
from envfs.service.base import ServiceBase
from envfs.service.binding import _user
from envfs.store.formats import DEFAULT_ACL_MODE, WorkflowAcl

log = logging.getLogger(__name__)

DEFAULT_MODE = DEFAULT_ACL_MODE


def check_mode(mode: int) -> int:
    """A workflow directory's mode: nothing for others, read and search for its owner."""
    if mode & ~0o770 or mode & 0o500 != 0o500 or mode & 0o050 == 0:
        raise BadInput(
            f"mode {mode:04o} is not a workflow ACL's: it must give others nothing, its owner "
            "read and search, its group search at least (e.g. 0750, 0710)"
        )
    return mode


class Access(ServiceBase):
    """Workflow ACLs, set and read through the store; every node learns them from the feed."""

    def set_acl(self, workflow: str, group: str, mode: int = DEFAULT_MODE) -> WorkflowAcl:
        validate_name(workflow, "workflow")
        check_mode(mode)
        try:
            grp.getgrnam(group)
        except KeyError:
            raise BadInput(
                f"no group {group!r} on this node; create it (groupadd) with the same name "
                "on every node, or name one that exists"
            ) from None
        self.require_store()
        acl = WorkflowAcl(
            workflow=workflow, group=group, mode=mode, user=self.user or _user(), time=node_time()
        )
        self.store.write_acl(acl)
        self.store.audit("acl_set", self.host, None, workflow=workflow, group=group, mode=mode)
        self.index.follow_changes()
        return acl

    def remove_acl(self, workflow: str) -> bool:
        """Open a workflow to all again; whether it had an ACL."""
        validate_name(workflow, "workflow")
        self.require_store()
        if not self.store.remove_acl(workflow):
            return False
        self.store.audit("acl_removed", self.host, None, workflow=workflow)
        self.index.follow_changes()
        return True

    def list_acls(self, workflow: str | None = None) -> list[WorkflowAcl]:
        acls = self.index.acls()
        return [a for a in acls if workflow in (None, a.workflow)]


@dataclass(frozen=True, slots=True)
class Grant:
    """What the mount shows for a restricted directory: root's, this group's, this mode."""

    gid: int
    mode: int


#: A grant for what no single group may read: root only (reached through its workflows).
ROOT_ONLY = Grant(0, 0o700)


class Permissions:
    """A node's reading of the ACLs in its index (index-only), recomputed when the index's
    ``acl_serial`` moved (an ACL, or a restricted workflow's bindings, changed); `generation`
    moves whenever a grant did, so the mount knows to re-apply them.

    A snapshot that any restricted workflow binds (any revision) is readable under
    ``.snapshots/<id>`` by that workflow's group, or by root only when restricted workflows
    of different groups bind it: a snapshot is readable by its workflows' groups, "or
    only through them". Users of an open workflow that binds it too reach it through that
    workflow (knowing whether one does would mean reading every binding)."""

    def __init__(self, index: Index) -> None:
        self.index = index
        self._lock = threading.Lock()
        self._seen = -1  # the index's acl_serial last read
        self.generation = 0
        self._workflows: dict[str, Grant] = {}
        self._snapshots: dict[str, Grant] = {}
        self._unknown: set[str] = set()  # groups this node lacks (said once)

    def workflow(self, workflow: str) -> Grant | None:
        """Index-free once read: the mount asks on every lookup of a workflow; `update`
        (the daemon's refresh loop) takes in changes."""
        if self._seen < 0:
            self.update()
        return self._workflows.get(workflow)

    def snapshot(self, snapshot_id: str) -> Grant | None:
        if self._seen < 0:
            self.update()
        return self._snapshots.get(snapshot_id)

    def _gid(self, group: str) -> int | None:
        try:
            return grp.getgrnam(group).gr_gid
        except KeyError:
            if group not in self._unknown:
                log.error("no group %r on this node: its workflows are root's only", group)
                self._unknown.add(group)
            return None

    def update(self) -> int:
        """Re-read the grants if the index's changed; the generation."""
        with self._lock:
            serial = self.index.acl_serial()
            if serial != self._seen:
                workflows: dict[str, Grant] = {}
                for acl in self.index.acls():
                    gid = self._gid(acl.group)
                    workflows[acl.workflow] = ROOT_ONLY if gid is None else Grant(gid, acl.mode)
                readers: dict[str, set[Grant]] = {}
                for wf, grant in workflows.items():
                    for sid in self.index.snapshots_of(wf):
                        readers.setdefault(sid, set()).add(grant)
                snapshots = {
                    sid: next(iter(g)) if len(g) == 1 else ROOT_ONLY for sid, g in readers.items()
                }
                if (workflows, snapshots) != (self._workflows, self._snapshots):
                    self._workflows, self._snapshots = workflows, snapshots
                    self.generation += 1
                self._seen = serial
            return self.generation
