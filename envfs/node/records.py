"""What the index stores and how it keys it: a binding's key, a revision's value (its whole
record, the feed line that told of it, or only its snapshot id), and what the change feed's
lines give it (a revision, a spec). `envfs.node.index` and its sweep share these."""

from __future__ import annotations

import pydantic

from envfs.store import feed
from envfs.store.formats import AuditEvent, Revision, SpecInfo

#: Starts a ``revs`` value that is a ``bound`` / ``rolled_back`` feed line, as an index
#: seeded from the feed keeps it (read into a revision when asked for; snapshot ids are hex).
LINE = b"L"

SCHEMA = b"6"  # 2: per-host logs (meta feed_cursor), file digests; 3: specs, seeded from logs;
#                 4: first revisions, unsettled bindings (what gc may trust); 5: feed lines
#                 as revisions (`LINE`); 6: workflow ACLs
#: Seconds a binding named by a ``binding_intent`` line is re-read until its change is logged.
INTENT_WAIT = 60.0


def binding_key(workflow: str, node: str) -> bytes:
    return f"{workflow}/{node}".encode()


def revision_of(raw: bytes) -> Revision | str:
    """A ``revs`` value: the revision's record, or only its snapshot id. A value that is
    none of the three raises ValueError (the index is then rebuilt)."""
    if raw.startswith(b"{"):
        return Revision.model_validate_json(raw)
    if raw.startswith(LINE):
        event = feed.parse_line(raw[len(LINE) :])
        if event is None:
            raise ValueError("a revision's feed line does not parse")
        return logged_revision(event)
    return raw.decode()


def logged_revision(event: AuditEvent) -> Revision | str:
    """The revision a ``bound`` / ``rolled_back`` line tells of, or only its snapshot id
    when the line lacks part of it (lines from before reasons were logged do)."""
    extra = event.model_extra or {}
    if {"reason", "user", "revision_time"} <= extra.keys() and event.snapshot_id and event.revision:
        return Revision(
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
    return event.snapshot_id or ""


def spec_of(event: AuditEvent) -> SpecInfo | None:
    """The spec a ``spec_written`` line carries (None for other lines, or a bad one)."""
    if event.event != "spec_written" or not event.model_extra:
        return None
    try:
        return SpecInfo.model_validate(event.model_extra.get("spec"))
    except pydantic.ValidationError:
        return None
