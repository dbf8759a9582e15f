"""The seam between the filesystem and the store: what the namespace (vfs.py) needs to know.

The filesystem never reads the store layout itself; it asks a ``Catalog``.  Methods marked
*index-only* answer from the node-local LMDB index (microseconds, safe to call from the event
loop).  Methods marked *blocking* may touch the shared store or run a build: call them in a
worker thread (``trio.to_thread.run_sync``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from envfs.core.views import BindingView


class Catalog(Protocol):
    def workflows(self) -> list[str]:
        """Index-only. Sorted workflow names that have at least one binding."""
        ...

    def nodes(self, workflow: str) -> list[str]:
        """Index-only. Sorted node names of a workflow (empty if unknown)."""
        ...

    def current(self, workflow: str, node: str) -> BindingView | None:
        """Index-only. The current revision of a binding, or None if the index has none."""
        ...

    def at_revision(self, workflow: str, node: str, revision: int) -> BindingView | None:
        """Index-only. A given revision of a binding, or None."""
        ...

    def snapshot_dir(self, snapshot_id: str) -> Path | None:
        """Index-only. The directory of a complete snapshot, or None if it is not built (yet)."""
        ...

    def lookup_store(self, workflow: str, node: str) -> BindingView | None:
        """Blocking. Read one binding from the store (index miss), update the index, answer."""
        ...

    def workflow_in_store(self, workflow: str) -> bool:
        """Blocking. Whether the store has a binding in ``workflow`` (the index may not know
        it yet)."""
        ...

    def find_snapshot(self, prefix: str) -> str | None:
        """Blocking. The one built snapshot whose id starts with ``prefix``, or None (none,
        or more than one)."""
        ...

    def build(self, snapshot_id: str) -> Path:
        """Blocking. Build the snapshot (or wait for whoever builds it, on any node).

        Returns the snapshot directory; raises an ``EnvfsError`` (with ``.errno``) if the build
        fails or times out.  Callers in one process must not call this twice at once for one id:
        dedupe in-process first (the store's lease dedupes across processes and nodes).
        """
        ...

    def refresh(self) -> list[tuple[str, str]]:
        """Blocking. Pull binding changes made by other processes or nodes into the index.

        Returns the ``(workflow, node)`` pairs whose current revision changed since the last call.
        """
        ...

    def workflow_grant(self, workflow: str) -> tuple[int, int] | None:
        """Index-only. (gid, mode) the workflow's directory is shown with when an ACL
        restricts it (`envfs acl`); None: readable by all."""
        ...

    def snapshot_grant(self, snapshot_id: str) -> tuple[int, int] | None:
        """Index-only. (gid, mode) of ``.snapshots/<id>`` when only restricted workflows
        bind the snapshot; None: readable by all."""
        ...

    def grants_generation(self) -> int:
        """Blocking (may read the index at length). Moves whenever a grant changed."""
        ...

    def hold(self, snapshot_ids: list[str]) -> None:
        """Blocking. Mark these snapshots as served by this node (so gc keeps them)."""
        ...

    def release(self, snapshot_ids: list[str]) -> None:
        """Blocking. This node no longer serves these snapshots."""
        ...
