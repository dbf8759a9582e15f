"""Bindings on the store: ``bindings/<wf>/<node>/<rev>.json``, append-only revisions
created with ``link()`` (which fails if the file exists, so two writers never overwrite each
other), and ``retired/<wf>/<node>/<rev>``, the last number of a removed binding."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from envfs.core import crashpoints
from envfs.core.names import parse_revision
from envfs.store.base import StoreBase
from envfs.store.formats import Revision


def _revision_files(names: list[str]) -> list[int]:
    """The revision numbers of ``<n>.json`` names, ascending; other names ignored."""
    numbers = (parse_revision(n[:-5]) for n in names if n.endswith(".json"))
    return sorted(n for n in numbers if n is not None)


class Bindings(StoreBase):
    """Binding revisions: read, appended, retired."""

    def binding_dir(self, workflow: str, node: str) -> Path:
        return self.bindings / workflow / node

    def revision_numbers(self, workflow: str, node: str) -> list[int]:
        """The numbers of a binding's revision files, ascending, without reading them."""
        try:
            names = os.listdir(self.binding_dir(workflow, node))
        except FileNotFoundError:
            return []
        return _revision_files(names)

    def revisions(self, workflow: str, node: str) -> list[Revision]:
        """All revisions of a binding, oldest first (empty if it does not exist);
        `CorruptRecord` if one of them cannot be read."""
        d = self.binding_dir(workflow, node)
        numbers = self.revision_numbers(workflow, node)
        return [self.read_model(d / f"{n}.json", Revision) for n in numbers]

    def retired_revision(self, workflow: str, node: str) -> int:
        """The highest revision a removed binding of this name had (0: never removed).
        ``retired/<wf>/<node>/<n>``: empty files, created exclusively, never rewritten."""
        try:
            names = os.listdir(self.retired / workflow / node)
        except FileNotFoundError:
            return 0
        return max((n for n in map(parse_revision, names) if n is not None), default=0)

    def _retire(self, workflow: str, node: str, numbers: list[int]) -> None:
        if numbers:
            d = self.retired / workflow / node
            d.mkdir(parents=True, exist_ok=True)
            self.create_file(d / str(max(numbers)), b"")

    def append_revision(self, make: Any) -> tuple[Revision, int]:
        """Append a revision: ``make(number) -> Revision``; retried if another writer won.
        Numbers go on after those of a removed binding of the same name: ``wf/node@3``
        names one revision, ever. Returns it and the binding's lowest revision number: a
        binding's files are ``first..revision``, every number between (each is the highest
        before it plus one, created exclusively; only a removal takes them, all at once)."""
        draft = make(0)
        d = self.binding_dir(draft.workflow, draft.node)
        d.mkdir(parents=True, exist_ok=True)
        while True:
            numbers = self.revision_numbers(draft.workflow, draft.node)
            retired = self.retired_revision(draft.workflow, draft.node)
            number = max([*numbers, retired]) + 1
            rev: Revision = make(number)
            if self.create_file(d / f"{number}.json", rev.model_dump_json(indent=2).encode()):
                with contextlib.suppress(OSError):  # the sweep's cue (envfs.node.index)
                    os.utime(d.parent)
                crashpoints.reached("bind")
                return rev, numbers[0] if numbers else number

    def has_workflow(self, workflow: str) -> bool:
        """Whether any node of ``workflow`` has a binding directory."""
        try:
            with os.scandir(self.bindings / workflow) as entries:
                return any(e.is_dir() for e in entries)
        except (FileNotFoundError, NotADirectoryError):
            return False

    def workflow_names(self) -> list[str]:
        try:
            return sorted(os.listdir(self.bindings))
        except FileNotFoundError:
            return []

    def binding_names(self) -> Iterator[tuple[str, str]]:
        for wf in self.workflow_names():
            try:
                nodes = sorted(os.listdir(self.bindings / wf))
            except NotADirectoryError:
                continue
            for node in nodes:
                yield wf, node

    def trash_binding(self, workflow: str, node: str, now: float) -> Path:
        """Move a binding's revisions to ``trash/`` (one rename), its highest revision number
        kept in ``retired/`` first (and again after, for one appended meanwhile), so that
        a new binding of the name goes on from there and never reuses a number."""
        self._retire(workflow, node, self.revision_numbers(workflow, node))
        dest = self.trash / f"binding-{workflow}-{node}.{int(now)}.{uuid.uuid4().hex[:8]}"
        os.rename(self.binding_dir(workflow, node), dest)
        self._retire(workflow, node, _revision_files(os.listdir(dest)))
        return dest
