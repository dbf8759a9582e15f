"""The API's audit trail in PostgreSQL (`serve-api --audit-dsn`), and the node-local spool
that makes it lossless: this module owns both formats (`AuditRow`).

A mutation's row is appended to ``<spool>/pending.jsonl`` (fsynced) before the request
answers, then a background thread moves the file aside (``flushing.jsonl``, one rename),
inserts its rows in one transaction and deletes it. Rows carry their own id, and the
insert skips ids already there, so a flush cut short between commit and delete repeats
nothing. While PostgreSQL is down mutations still succeed, rows wait in the spool, and the
thread retries every few seconds; the first failure and the recovery are logged once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import uuid
from pathlib import Path
from typing import Any, Literal

import psycopg
import pydantic

from envfs.core.config import node_time

log = logging.getLogger("envfs.api")

#: Seconds between flush attempts while rows wait (a new row wakes the thread at once).
RETRY_EVERY = 2.0

TABLE = """
CREATE TABLE IF NOT EXISTS envfs_audit (
    id text PRIMARY KEY,
    time timestamptz NOT NULL,
    host text NOT NULL,
    actor text NOT NULL,
    action text NOT NULL,
    workflow text NOT NULL,
    node text NOT NULL,
    revision integer,
    snapshot_id text,
    status integer NOT NULL,
    detail jsonb NOT NULL DEFAULT '{}'
)
"""
INSERT = """
INSERT INTO envfs_audit
    (id, time, host, actor, action, workflow, node, revision, snapshot_id, status, detail)
VALUES (%s, to_timestamp(%s), %s, %s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (id) DO NOTHING
"""


class AuditRow(pydantic.BaseModel):
    """One API mutation: a line of the spool and a row of ``envfs_audit``."""

    model_config = pydantic.ConfigDict(frozen=True)

    id: str = pydantic.Field(default_factory=lambda: uuid.uuid4().hex)
    time: float = pydantic.Field(default_factory=node_time)
    host: str
    actor: str  # who asked: "api:<token name>@<client address>"
    action: Literal["post_env", "rollback", "delete"]
    workflow: str
    node: str
    revision: int | None = None
    snapshot_id: str | None = None
    status: int
    detail: dict[str, Any] = {}

    def values(self) -> tuple[Any, ...]:
        return (
            self.id,
            self.time,
            self.host,
            self.actor,
            self.action,
            self.workflow,
            self.node,
            self.revision,
            self.snapshot_id,
            self.status,
            json.dumps(self.detail),
        )


class PgAudit:
    """Rows to PostgreSQL at ``dsn`` through the spool in ``spool``."""

    def __init__(self, dsn: str, spool: Path, retry_every: float = RETRY_EVERY) -> None:
        self.dsn = dsn
        self.spool = spool
        self.pending = spool / "pending.jsonl"
        self.flushing = spool / "flushing.jsonl"
        self.retry_every = retry_every
        spool.mkdir(parents=True, exist_ok=True)
        self._append = threading.Lock()  # appends and the rename that starts a flush
        self._flush = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._down = False
        self._thread = threading.Thread(target=self._loop, name="envfs-audit", daemon=True)
        self._thread.start()

    def record(self, row: AuditRow) -> None:
        """Spool ``row`` durably (raises only if the local disk fails), then wake the flusher."""
        data = (row.model_dump_json() + "\n").encode()
        with self._append:
            fd = os.open(self.pending, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
        self._wake.set()

    def queued(self) -> int:
        """Rows in the spool, not yet in PostgreSQL."""
        return sum(len(_read(p)) for p in (self.flushing, self.pending))

    def flush(self) -> int:
        """Move every spooled row to PostgreSQL; the number written. Raises
        ``psycopg.Error``/``OSError`` if the database cannot take them (they stay spooled)."""
        written = 0
        with self._flush:
            while True:
                with self._append:
                    if not self.flushing.exists():
                        if not self.pending.exists():
                            return written
                        os.rename(self.pending, self.flushing)
                rows = _read(self.flushing)
                if rows:
                    with psycopg.connect(self.dsn, connect_timeout=3) as conn:
                        conn.execute(TABLE)
                        with conn.cursor() as cur:
                            cur.executemany(INSERT, [r.values() for r in rows])
                os.unlink(self.flushing)
                written += len(rows)

    def _loop(self) -> None:
        while not self._stop:
            self._wake.wait(self.retry_every)
            self._wake.clear()
            try:
                written = self.flush()
            except (psycopg.Error, OSError) as exc:
                if not self._down:
                    log.warning(
                        "audit database unreachable (%s); rows wait in %s",
                        str(exc).strip().splitlines()[0]
                        if str(exc).strip()
                        else type(exc).__name__,
                        self.spool,
                    )
                self._down = True
                continue
            if self._down and written:
                log.warning("audit database back: %d queued row(s) written", written)
            self._down = False

    def close(self, timeout: float = 5.0) -> None:
        """Stop the flusher after one last attempt; rows it could not write stay spooled."""
        self._stop = True
        self._wake.set()
        self._thread.join(timeout)
        with contextlib.suppress(psycopg.Error, OSError):
            self.flush()


def _read(path: Path) -> list[AuditRow]:
    """The rows of a spool file; a line cut short by a crash mid-append is skipped."""
    try:
        lines = path.read_bytes().splitlines()
    except FileNotFoundError:
        return []
    rows = []
    for line in lines:
        try:
            rows.append(AuditRow.model_validate_json(line))
        except pydantic.ValidationError:
            log.warning("skipping an unreadable audit spool line in %s", path)
    return rows
