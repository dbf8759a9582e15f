"""Scoped API tokens (`serve-api --tokens FILE`): each team's token reaches its own
workflows only, lists are filtered, anonymous calls get 401, a read token changes nothing,
the store's lines and the audit rows name the token, and a tokens file others can read
keeps the server from starting."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.api.test_api import TOKEN, Server, _bindings, start_server, stop_server
from tests.conftest import PY, Env

TEAM, READER, ADMIN = "teama-secret-0123456789", "reader-secret-0123456789", "admin-secret-01234567"
TOKENS = f"""
[tokens.teama]
secret = "{TEAM}"
workflows = ["teama*"]
role = "write"

[tokens.reader]
secret_file = "reader.secret"
workflows = ["teama*"]
role = "read"

[tokens.admin]
secret = "{ADMIN}"
workflows = ["*"]
role = "write"
"""


def _tokens_file(env: Env, text: str = TOKENS, mode: int = 0o600) -> Path:
    secret = env.root / "reader.secret"
    secret.write_text(READER + "\n")
    secret.chmod(0o600)
    path = env.root / "tokens.toml"
    path.write_text(text.replace('"reader.secret"', f'"{secret}"'))
    path.chmod(mode)
    return path


@pytest.fixture
def scoped(local: Env) -> Iterator[Server]:
    server = start_server(local, auth=("--tokens", str(_tokens_file(local))))
    try:
        yield server
    finally:
        stop_server(server)


def _body(workflow: str, node: str = "n1") -> dict[str, object]:
    return {"workflow_id": workflow, "node_id": node, "packages": ["extra-a==1.0"],
            "python": PY, "build": "lazy"}  # fmt: skip


def test_a_team_token_reaches_its_own_workflows_only(scoped: Server) -> None:
    api = scoped
    assert api.call("POST", "/envs", _body("teama-x"), token=TEAM).code in (200, 202)
    assert api.call("POST", "/envs", _body("teamb"), token=ADMIN).code in (200, 202)
    before = _bindings(api.env)
    for method, path, body in [
        ("POST", "/envs", _body("teamb", "n2")),
        ("POST", "/envs:batch", {"bindings": [
            {"workflow_id": "teama-x", "node_id": "n9", "snapshot_id": "0" * 12},
            {"workflow_id": "teamb", "node_id": "n9", "snapshot_id": "0" * 12}]}),
        ("GET", "/envs/teamb/n1", None),
        ("GET", "/envs/teamb/n1/history", None),
        ("GET", "/envs/teamb/n1/sbom", None),
        ("GET", "/envs/teamb/n1/export", None),
        ("GET", "/envs?workflow=teamb", None),
        ("POST", "/envs/teamb/n1/rollback", {}),
        ("DELETE", "/envs/teamb/n1", None),
    ]:  # fmt: skip
        got = api.call(method, path, body, token=TEAM)
        assert got.code == 403, (method, path, got.text)
    assert _bindings(api.env) == before  # refused: nothing written, not even the half in reach
    listed = api.call("GET", "/envs?limit=1000", token=TEAM).body
    assert {i["workflow_id"] for i in listed["items"]} == {"teama-x"} and listed["total"] == 1
    everything = api.call("GET", "/envs?limit=1000", token=ADMIN).body
    assert {i["workflow_id"] for i in everything["items"]} == {"teama-x", "teamb"}
    assert api.call("GET", "/envs/teama-x/n1", token=TEAM).code == 200
    # the store's log names the token that bound
    users = {e.get("user") for e in api.env.audit() if e["event"] == "bound"}
    assert users == {"api:teama", "api:admin"}


def test_without_a_token_only_health_and_metrics_answer(scoped: Server) -> None:
    api = scoped
    for token in (None, "not-a-token-at-all-0000"):
        for method, path in [("GET", "/envs"), ("GET", "/envs/teama-x/n1"),
                             ("GET", "/openapi.json"), ("POST", "/envs")]:  # fmt: skip
            got = api.call(method, path, _body("teama-x") if method == "POST" else None,
                           token=token)  # fmt: skip
            assert got.code == 401, (method, path, token, got.text)
    assert api.call("GET", "/healthz", token=None).code == 200
    assert api.call("GET", "/metrics", token=None).code == 200
    assert _bindings(api.env) == set()


def test_a_read_token_reads_and_changes_nothing(scoped: Server) -> None:
    api = scoped
    assert api.call("POST", "/envs", _body("teama-x"), token=TEAM).code in (200, 202)
    assert api.call("GET", "/envs/teama-x/n1", token=READER).code == 200
    for method, path, body in [("POST", "/envs", _body("teama-x", "n2")),
                               ("POST", "/envs/teama-x/n1/rollback", {}),
                               ("DELETE", "/envs/teama-x/n1", None)]:  # fmt: skip
        got = api.call(method, path, body, token=READER)
        assert got.code == 403 and "only read" in got.text, (method, path, got.text)
    assert _bindings(api.env) == {"teama-x/n1"}


@pytest.mark.parametrize(
    ("text", "mode", "words"),
    [
        (TOKENS, 0o644, "can be read by other users"),
        (TOKENS, 0o640, "can be read by other users"),
        (TOKENS.replace('role = "read"', 'role = "admin"'), 0o600, "role"),
        (TOKENS.replace(ADMIN, "short"), 0o600, "shorter than"),
        (TOKENS.replace(ADMIN, TEAM), 0o600, "share a secret"),
        ("[tokens.x]\nworkflows = ['*']\nrole = 'read'\n", 0o600, "secret or secret_file"),
        ("tokens = [", 0o600, "not TOML"),
    ],
)
def test_a_tokens_file_that_cannot_serve_stops_the_server_in_one_line(
    local: Env, text: str, mode: int, words: str
) -> None:
    path = _tokens_file(local, text, mode)
    out = local.run("serve-api", "--port", "1", "--tokens", str(path), check=False, timeout=60)
    assert out.returncode == 3 and words in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert os.stat(path).st_mode & 0o777 == mode  # refused, not "fixed"


def test_a_world_readable_secret_file_is_refused(local: Env) -> None:
    path = _tokens_file(local)
    (local.root / "reader.secret").chmod(0o644)
    out = local.run("serve-api", "--port", "1", "--tokens", str(path), check=False, timeout=60)
    assert out.returncode == 3 and "reader.secret can be read by other users" in out.stderr


def test_the_admin_token_file_is_made_private_when_ours_and_refused_when_not(
    local: Env,
) -> None:
    path = local.root / "admin-token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o644)
    server = start_server(local, auth=("--token-file", str(path)))
    try:
        assert server.call("GET", "/healthz").code == 200
    finally:
        stop_server(server)
    assert os.stat(path).st_mode & 0o777 == 0o600  # ours: fixed, and said
    assert f"{path} was readable by other users; made it 0600" in server.log.read_text()
    path.chmod(0o644)
    os.chown(path, 65534, 65534)  # not ours to fix: refused in one line, left as it was
    out = local.run("serve-api", "--port", "1", "--token-file", str(path), check=False)
    assert out.returncode == 3 and "can be read by other users" in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert os.stat(path).st_mode & 0o777 == 0o644
