"""The daemon's catalog over the service (the seam ``envfs.fs.catalog`` defines): index
reads inline, store work in threads."""

from __future__ import annotations

from pathlib import Path

from envfs.core.views import BindingView
from envfs.service.access import Permissions
from envfs.service.envs import Service


class StoreCatalog:
    """The daemon's catalog (see catalog.py): index reads inline, store work in threads."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.index = service.index
        self.store = service.store
        self.permissions = Permissions(service.index)

    def workflows(self) -> list[str]:
        return self.index.workflows()

    def nodes(self, workflow: str) -> list[str]:
        return self.index.nodes(workflow)

    def current(self, workflow: str, node: str) -> BindingView | None:
        return self.index.current(workflow, node)

    def at_revision(self, workflow: str, node: str, revision: int) -> BindingView | None:
        return self.index.at_revision(workflow, node, revision)

    def snapshot_dir(self, snapshot_id: str) -> Path | None:
        if self.index.is_ready(snapshot_id):
            return self.store.snapshot_dir(snapshot_id)
        return None

    def workflow_in_store(self, workflow: str) -> bool:
        return self.store.has_workflow(workflow)

    def find_snapshot(self, prefix: str) -> str | None:
        found = [sid for sid in self.store.snapshot_ids() if sid.startswith(prefix)]
        return found[0] if len(found) == 1 and self.store.snapshot_ready(found[0]) else None

    def lookup_store(self, workflow: str, node: str) -> BindingView | None:
        revisions = self.store.revisions(workflow, node)
        if not revisions:
            return None
        self.index.put_binding(revisions)
        if self.store.snapshot_ready(revisions[-1].snapshot_id):
            self.index.mark_ready(revisions[-1].snapshot_id)
        return self.index.current(workflow, node)

    def build(self, snapshot_id: str) -> Path:
        return self.service.ensure_built(snapshot_id)

    def refresh(self) -> list[tuple[str, str]]:
        changed = self.index.follow_changes(sweep=True)
        self.index.checkpoint_when_due(self.service.host)
        return changed

    def workflow_grant(self, workflow: str) -> tuple[int, int] | None:
        grant = self.permissions.workflow(workflow)
        return None if grant is None else (grant.gid, grant.mode)

    def snapshot_grant(self, snapshot_id: str) -> tuple[int, int] | None:
        grant = self.permissions.snapshot(snapshot_id)
        return None if grant is None else (grant.gid, grant.mode)

    def grants_generation(self) -> int:
        return self.permissions.update()

    def hold(self, snapshot_ids: list[str]) -> None:
        self.store.hold_snapshots(snapshot_ids, self.service.host)

    def release(self, snapshot_ids: list[str]) -> None:
        self.store.release_snapshots(snapshot_ids, self.service.host)
