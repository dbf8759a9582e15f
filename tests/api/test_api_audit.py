"""The API's PostgreSQL audit against a real server (scripts/pg-local): every mutation is a
row; with the server down mutations still succeed, rows wait on local disk, and all of them
arrive, once each, when it is back."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.api.test_api import Server, start_server, stop_server
from tests.conftest import PY, Env

ROOT = Path(__file__).resolve().parents[2]
PG_LOCAL = ROOT / "scripts/pg-local"

pytestmark = pytest.mark.skipif(
    not glob.glob("/usr/lib/postgresql/*/bin/initdb"), reason="needs PostgreSQL (scripts/setup)"
)


@dataclass
class Postgres:
    dir: Path
    port: int
    dsn: str = ""

    def start(self) -> None:
        out = subprocess.run([PG_LOCAL, "start", self.dir, str(self.port)], capture_output=True,
                             text=True, timeout=60)  # fmt: skip
        assert out.returncode == 0, out.stderr
        self.dsn = out.stdout.strip()

    def stop(self) -> None:
        subprocess.run([PG_LOCAL, "stop", self.dir], check=True, timeout=60)

    def rows(self) -> list[dict[str, Any]]:
        import psycopg
        from psycopg.rows import dict_row

        with psycopg.connect(self.dsn, row_factory=dict_row) as conn:
            try:
                return list(conn.execute("SELECT * FROM envfs_audit ORDER BY time"))
            except psycopg.errors.UndefinedTable:  # no row written yet
                return []


@pytest.fixture
def postgres() -> Iterator[Postgres]:
    # under /tmp and searchable: the server runs as the postgres user
    base = Path(tempfile.mkdtemp(prefix="envfs-pg-", dir="/tmp"))
    os.chmod(base, 0o755)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    pg = Postgres(base / "pg", port)
    pg.start()
    try:
        yield pg
    finally:
        subprocess.run([PG_LOCAL, "stop", pg.dir], capture_output=True, timeout=60)
        shutil.rmtree(base, ignore_errors=True)


def _wait(what: str, check: Any, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.fixture
def audited(local: Env, postgres: Postgres) -> Iterator[tuple[Server, Postgres]]:
    server = start_server(local, "--audit-dsn", postgres.dsn)
    try:
        yield server, postgres
    finally:
        stop_server(server)


def test_mutations_reach_postgres_and_survive_an_outage(audited: tuple[Server, Postgres]) -> None:
    api, pg = audited
    body = {"workflow_id": "wf", "node_id": "a", "packages": ["extra-a==1.0"], "python": PY}
    assert api.call("POST", "/envs", body).code == 202
    _wait("the first row", lambda: len(pg.rows()) == 1)
    row = pg.rows()[0]
    assert (row["action"], row["workflow"], row["node"], row["status"]) == (
        "post_env",
        "wf",
        "a",
        202,
    )
    assert row["actor"] == "api:admin@127.0.0.1" and row["revision"] == 1

    pg.stop()
    during = [
        api.call("POST", "/envs", dict(body, node_id="b")),
        api.call("POST", "/envs", dict(body, packages=["extra-b==2.0"])),
        api.call("POST", "/envs/wf/a/rollback", {}),
        api.call("DELETE", "/envs/wf/b"),
    ]
    assert all(r.code in (200, 202) for r in during), [r.text for r in during]
    health = api.call("GET", "/healthz").body
    assert health["audit_queued"] == 4  # on local disk, waiting
    spool = api.env.index / "audit-spool"
    assert sum(len(p.read_text().splitlines()) for p in spool.glob("*.jsonl")) == 4

    pg.start()
    _wait("the queued rows", lambda: len(pg.rows()) == 5)
    rows = pg.rows()
    assert [r["action"] for r in rows] == ["post_env", "post_env", "post_env", "rollback", "delete"]
    assert len({r["id"] for r in rows}) == 5
    _wait("an empty spool", lambda: api.call("GET", "/healthz").body["audit_queued"] == 0)
    assert "audit database unreachable" in api.log.read_text()
    # the store's own log has every mutation too
    events = [e["event"] for e in api.env.audit() if e.get("workflow") == "wf"]
    assert events.count("bound") == 3 and "rolled_back" in events and "removed" in events


def test_serve_api_starts_with_postgres_down_and_catches_up(local: Env, postgres: Postgres) -> None:
    postgres.stop()
    server = start_server(local, "--audit-dsn", postgres.dsn)
    try:
        body = {"workflow_id": "wf", "node_id": "a", "packages": ["extra-a==1.0"], "python": PY}
        assert server.call("POST", "/envs", body).code == 202
        assert server.call("GET", "/healthz").body["audit_queued"] == 1
    finally:
        stop_server(server)  # rows still queued stay on disk for the next server
    postgres.start()
    server = start_server(local, "--audit-dsn", postgres.dsn)
    try:
        _wait("the row from before the restart", lambda: len(postgres.rows()) == 1)
    finally:
        stop_server(server)
