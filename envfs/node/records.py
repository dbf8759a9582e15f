"""What the index stores and how it keys it: a binding's key, a revision's value (its whole
record, or only its snapshot id), and what the change feed's lines give it (a revision, a
spec). `envfs.node.index` and its sweep share these."""

from __future__ import annotations

import pydantic

from envfs.store.formats import AuditEvent, Revision, SpecInfo


def binding_key(workflow: str, node: str) -> bytes:
    return f"{workflow}/{node}".encode()


def revision_of(raw: bytes) -> Revision | str:
    """A ``revs`` value: the revision's record, or only its snapshot id."""
    if raw.startswith(b"{"):
        return Revision.model_validate_json(raw)
    return raw.decode()


def logged_revision(event: AuditEvent) -> bytes:
    """The ``revs`` value a ``bound`` / ``rolled_back`` line gives: the whole revision when
    the line has everything of it (lines from before reasons were logged do not)."""
    extra = event.model_extra or {}
    if {"reason", "user", "revision_time"} <= extra.keys() and event.snapshot_id and event.revision:
        rev = Revision(
            workflow=event.workflow or "",
            node=event.node or "",
            revision=event.revision,
            snapshot_id=event.snapshot_id,
            action="rollback" if event.event == "rolled_back" else "bind",
            rollback_to=extra.get("to"),
            time=float(extra["revision_time"]),
            host=event.host,
            user=str(extra["user"]),
            reason=str(extra["reason"]),
        )
        return rev.model_dump_json().encode()
    return (event.snapshot_id or "").encode()


def spec_of(event: AuditEvent) -> SpecInfo | None:
    """The spec a ``spec_written`` line carries (None for other lines, or a bad one)."""
    if event.event != "spec_written" or not event.model_extra:
        return None
    try:
        return SpecInfo.model_validate(event.model_extra.get("spec"))
    except pydantic.ValidationError:
        return None
