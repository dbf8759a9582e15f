"""Workflow ACLs in the store: ``acls/<workflow>.json`` (`envfs.store.formats.WorkflowAcl`),
one file per restricted workflow, replaced atomically. The service logs each change
(``acl_set``, ``acl_removed``), so every node's index learns it as it learns a bind."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from envfs.core.names import validate_name
from envfs.store.base import StoreBase
from envfs.store.formats import WorkflowAcl


class Acls(StoreBase):
    @property
    def acl_dir(self) -> Path:
        return self.root / "acls"

    def acl_path(self, workflow: str) -> Path:
        return self.acl_dir / f"{validate_name(workflow, 'workflow')}.json"

    def read_acl(self, workflow: str) -> WorkflowAcl | None:
        try:
            return self.read_model(self.acl_path(workflow), WorkflowAcl)
        except FileNotFoundError:
            return None

    def write_acl(self, acl: WorkflowAcl) -> None:
        self.acl_dir.mkdir(exist_ok=True)
        self.replace_file(self.acl_path(acl.workflow), acl.model_dump_json(indent=2).encode())

    def remove_acl(self, workflow: str) -> bool:
        """Drop a workflow's ACL (its envs readable by all again); whether it had one."""
        try:
            os.unlink(self.acl_path(workflow))
        except FileNotFoundError:
            return False
        return True

    def acls(self) -> list[WorkflowAcl]:
        """Every workflow ACL, by workflow name."""
        out = []
        with contextlib.suppress(FileNotFoundError):
            for name in sorted(os.listdir(self.acl_dir)):
                if name.endswith(".json") and not name.startswith("."):
                    with contextlib.suppress(FileNotFoundError):
                        out.append(self.read_model(self.acl_dir / name, WorkflowAcl))
        return out
