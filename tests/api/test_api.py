"""The HTTP API through a real `envfs serve-api` (uvicorn) on loopback, against a real store."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ENVFS, PY, Env

TOKEN = "test-token-123456"


@dataclass
class Reply:
    code: int
    body: Any
    text: str


@dataclass
class Server:
    env: Env
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        token: str | None = TOKEN,
        data: bytes | None = None,
        content_type: str = "application/json",
    ) -> Reply:
        if body is not None:
            data = json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", content_type)
        if token is not None:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                code, raw = resp.status, resp.read()
        except urllib.error.HTTPError as err:
            code, raw = err.code, err.read()
        text = raw.decode()
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = None
        return Reply(code, parsed, text)

    def wait_ready(self, target: str, timeout: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            got = self.call("GET", f"/envs/{target}")
            if got.code == 200 and got.body["state"] in ("ready", "failed"):
                assert got.body["state"] == "ready", got.body
                return dict(got.body)
            assert time.monotonic() < deadline, f"{target} not ready: {got.text}"
            time.sleep(0.2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(env: Env, *args: str, auth: tuple[str, ...] = ()) -> Server:
    """serve-api over ``env``'s store: with one admin token (`TOKEN`), or ``auth``."""
    if not auth:
        (env.root / "token").write_text(TOKEN + "\n")
        auth = ("--token-file", str(env.root / "token"))
    port = _free_port()
    log = env.root / f"api-{port}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*ENVFS, "serve-api", "--port", str(port), *auth, "--mount-path", "/envs", *args],
            env=env.vars, stdout=out, stderr=out, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    server = Server(env, f"http://127.0.0.1:{port}", proc, log)
    deadline = time.monotonic() + 30
    while True:
        try:
            if server.call("GET", "/healthz").code == 200:
                return server
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"serve-api did not come up:\n{log.read_text()}")
        time.sleep(0.1)


def stop_server(server: Server) -> None:
    server.proc.send_signal(signal.SIGTERM)
    try:
        code = server.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        raise AssertionError("serve-api did not stop on SIGTERM") from None
    log = server.log.read_text()
    assert code == 0, log
    assert "Traceback" not in log, log


@pytest.fixture
def api(local: Env) -> Iterator[Server]:
    server = start_server(local)
    try:
        yield server
    finally:
        stop_server(server)


def _bindings(env: Env) -> set[str]:
    root = env.store / "bindings"
    return (
        {f"{w.name}/{n.name}" for w in root.glob("*") for n in w.glob("*")}
        if root.exists()
        else set()
    )


def test_mutations_need_the_token_and_write_nothing_without_it(api: Server) -> None:
    body = {"workflow_id": "wf", "node_id": "a", "packages": ["extra-a==1.0"], "python": PY}
    for token in (None, "wrong-token-xyz"):
        for method, path, payload in (
            ("POST", "/envs", body),
            ("POST", "/envs/wf/a/rollback", {}),
            ("DELETE", "/envs/wf/a", None),
        ):
            got = api.call(method, path, payload, token=token)
            assert got.code == 401, (method, path, got.text)
    assert not (api.env.store / "specs").exists()  # nothing resolved, nothing written
    assert _bindings(api.env) == set()
    assert api.call("GET", "/healthz", token=None).body["ok"] is True


def test_post_builds_in_the_background_then_reuses(api: Server) -> None:
    body = {"workflow_id": "wf", "node_id": "a", "packages": ["extra-a==1.0"], "python": PY}
    first = api.call("POST", "/envs", body)
    assert first.code == 202, first.text
    assert first.body["env_path"] == "/envs/wf/a"
    assert first.body["python_path"] == "/envs/wf/a/bin/python"
    assert first.body["pinned_path"] == "/envs/wf/a@1"
    ready = api.wait_ready("wf/a")
    assert ready["snapshot_id"] == first.body["snapshot_id"]
    assert ready["python_version"].startswith(PY)
    again = api.call("POST", "/envs", dict(body, node_id="b"))
    assert again.code == 200 and again.body["state"] == "ready"  # the snapshot is reused
    lazy = api.call(
        "POST", "/envs", dict(body, node_id="c", packages=["extra-b==2.0"], build="lazy")
    )
    assert lazy.code == 202 and lazy.body["state"] == "bound"
    time.sleep(1)
    assert api.call("GET", "/envs/wf/c").body["state"] == "bound"  # lazy: no build started
    metrics = api.call("GET", "/metrics").text
    assert 'envfs_builds_total{result="ok"} 1.0' in metrics
    assert "envfs_reuse_hits_total 1.0" in metrics
    assert "envfs_bindings 3.0" in metrics
    assert 'envfs_http_requests_total{code="202",method="POST",route="/envs"} 2.0' in metrics
    # the snapshot runs (no mount here: from the store)
    snap = api.env.store / "snapshots" / ready["snapshot_id"] / "bin/python"
    out = subprocess.run([snap, "-c", "import extra_a; print(extra_a.VERSION)"],
                         capture_output=True, text=True, check=True)  # fmt: skip
    assert out.stdout == "1.0\n"


def _multipart(fields: list[tuple[str, str, str | None]]) -> tuple[bytes, str]:
    """(name, value, filename) parts as multipart/form-data."""
    boundary = uuid.uuid4().hex
    out = b""
    for name, value, filename in fields:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode()
        out += value.encode() + b"\r\n"
    return out + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_form_fields_and_project_files(api: Server, tmp_path: Path) -> None:
    data, kind = _multipart([
        ("workflow_id", "wf", None), ("node_id", "form", None), ("python", PY, None),
        ("packages", "extra-a==1.0", None), ("packages", "tool-pkg==0.1", None),
    ])  # fmt: skip
    got = api.call("POST", "/envs", data=data, content_type=kind)
    assert got.code in (200, 202), got.text
    api.wait_ready("wf/form")
    shown = json.loads(api.env.run("show", "wf/form", "--packages", "--json").stdout)
    assert {"extra-a", "tool-pkg", "base-lib"} == {p["name"] for p in shown["packages"]}
    # a uv project's two files as file parts
    project = tmp_path / "proj"
    project.mkdir()
    (project / "pyproject.toml").write_text(
        '[project]\nname = "p"\nversion = "0"\nrequires-python = ">=3.11"\n'
        'dependencies = ["extra-b==2.0"]\n[tool.uv]\npackage = false\n'
    )
    from envfs.build import interpreters

    subprocess.run(["uv", "lock", "-q", "--project", str(project), "--python",
                    interpreters.find(PY).path], env=api.env.vars, check=True)  # fmt: skip
    data, kind = _multipart([
        ("workflow_id", "wf", None), ("node_id", "proj", None), ("python", PY, None),
        ("pyproject", (project / "pyproject.toml").read_text(), "pyproject.toml"),
        ("uv_lock", (project / "uv.lock").read_text(), "uv.lock"),
    ])  # fmt: skip
    got = api.call("POST", "/envs", data=data, content_type=kind)
    assert got.code == 202, got.text
    api.wait_ready("wf/proj")
    info = api.env.show("wf/proj")
    assert info["snapshot_id"] == got.body["snapshot_id"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"workflow_id": "../x", "node_id": "a", "packages": ["six"]}, "workflow_id: workflow"),
        ({"workflow_id": "wf", "node_id": "", "packages": ["six"]}, "empty node"),
        ({"workflow_id": "wf", "node_id": "a", "packages": ["x @ file:///etc"]}, "URL or path"),
        ({"workflow_id": "wf", "node_id": "a", "packages": ["x @ git+file:///x"]}, "URL or path"),
        ({"workflow_id": "wf", "node_id": "a", "requirements": "x @ git+https://h/x"}, "index"),
        ({"workflow_id": "wf", "node_id": "a"}, "give packages"),
        ({"workflow_id": "wf", "node_id": "a", "packages": ["six"], "pyproject": "x"}, "both"),
        ({"workflow_id": "wf", "node_id": "a", "packages": ["six"], "shell": "rm"}, "shell"),
        ({"workflow_id": "wf", "node_id": "a", "packages": ["-e ."]}, "not a requirement"),
        (["not", "an", "object"], "JSON object"),
    ],
)
def test_bad_bodies_are_422_with_a_message_and_write_nothing(
    api: Server, body: Any, message: str
) -> None:
    got = api.call("POST", "/envs", body)
    assert got.code == 422, got.text
    assert message in json.dumps(got.body["detail"]), got.text
    assert _bindings(api.env) == set()


def test_python_is_a_version_never_a_path_that_would_run(api: Server) -> None:
    ran = api.env.root / "ran"
    script = api.env.root / "evil.sh"
    script.write_text(f"#!/bin/sh\ntouch {ran}\n")
    script.chmod(0o755)
    missing = api.env.root / "missing" / "python"
    details = []
    for python in (str(script), str(missing), "3.12\n", " 3.12", "3.\uff11\uff12", "python"):
        body = {"workflow_id": "wf", "node_id": "a", "packages": ["six"], "python": python}
        got = api.call("POST", "/envs", body)
        assert got.code == 422, (python, got.text)
        details.append(got.body["detail"])
    assert not ran.exists(), "the server ran the file named in python"
    # the answer is the same whether the path exists or not, and names no path
    assert details[0] == details[1], details
    assert str(api.env.root) not in json.dumps(details)
    assert _bindings(api.env) == set()


def test_a_list_form_path_source_is_refused_before_uv_runs_it(api: Server) -> None:
    evil = api.env.root / "evil"
    evil.mkdir()
    ran = api.env.root / "ran-setup"
    (evil / "setup.py").write_text(
        f"import pathlib\npathlib.Path({str(ran)!r}).touch()\n"
        "from setuptools import setup\nsetup(name='six', version='9.9')\n"
    )
    pyproject = (
        '[project]\nname = "p"\nversion = "0"\ndependencies = ["six"]\n'
        f'[tool.uv.sources]\nsix = [{{ path = "{evil}", marker = "sys_platform == \'linux\'" }}]\n'
    )
    lock = 'version = 1\n[[package]]\nname = "p"\nversion = "0"\nsource = { virtual = "." }\n'
    body = {"workflow_id": "wf", "node_id": "a", "pyproject": pyproject, "uv_lock": lock}
    got = api.call("POST", "/envs", {**body, "python": PY})
    assert got.code == 422 and "not a package index" in got.body["detail"], got.text
    time.sleep(1)
    assert not ran.exists(), "resolving the path source ran its setup.py on the server"
    assert _bindings(api.env) == set()


def test_hostile_edges_are_4xx_and_name_no_server_path(local: Env) -> None:
    local.vars["ENVFS_API_HEADER_TIMEOUT"] = "1"
    server = start_server(local)
    try:
        token = local.root / "token"
        assert token.stat().st_mode & 0o777 == 0o600  # it was 0644: made private at start
        port = int(server.url.rsplit(":", 1)[1])

        def raw(request: bytes) -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
                conn.sendall(request)
                return conn.recv(4096).split(b"\r\n")[0]

        # a non-ASCII token (Latin-1 and UTF-8 bytes alike) is a wrong token, not a 500
        for bearer in ("caf\u00e9".encode("latin-1"), "caf\u00e9".encode()):
            head = b"POST /envs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + bearer
            got = raw(head + b"\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
            assert got == b"HTTP/1.1 401 Unauthorized", got
        # a mutation's body is not even parsed without the token
        rollback = server.call("POST", "/envs/wf/a/rollback", data=b"{bad", token=None)
        assert rollback.code == 401, rollback.text
        deep = b"[" * 20000 + b"]" * 20000
        nested = server.call("POST", "/envs", data=deep)
        assert nested.code == 422, nested.text
        # errors and unauthenticated reads name no server path
        broken = {"workflow_id": "wf", "node_id": "a", "pyproject": "[project", "uv_lock": "x"}
        answers = [server.call("POST", "/envs", broken), server.call("GET", "/healthz")]
        assert answers[0].code == 422, answers[0].text
        for answer in answers:
            for secret in (str(local.store), str(local.root), "/tmp/"):
                assert secret not in answer.text, answer.text
        # a client that never finishes its headers is cut off
        with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
            conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            started = time.monotonic()
            assert conn.recv(4096) == b""  # closed by the server
            assert time.monotonic() - started < 20
    finally:
        stop_server(server)
    assert _bindings(local) == set()


def test_local_paths_oversized_and_non_json_bodies_are_refused(api: Server) -> None:
    lock = '[[package]]\nname = "mine"\nversion = "1"\nsource = { path = "/etc/passwd" }\n'
    pyproject = '[project]\nname = "p"\nversion = "0"\ndependencies = ["mine"]\n'
    body = {"workflow_id": "wf", "node_id": "a", "pyproject": pyproject, "uv_lock": lock}
    got = api.call("POST", "/envs", body)
    assert got.code == 422 and "from a path" in got.body["detail"], got.text
    # a body over the limit is refused from its Content-Length, before it is read
    port = int(api.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.sendall(
            b"POST /envs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {TOKEN}\r\nContent-Length: {5 << 20}\r\n\r\n".encode()
            + b"{" * 1024
        )
        assert conn.recv(4096).split(b"\r\n")[0] == b"HTTP/1.1 413 Request Entity Too Large"
    assert api.call("POST", "/envs", data=b"{not json").code == 422
    assert api.call("POST", "/envs", data=b"six", content_type="text/plain").code == 415
    assert _bindings(api.env) == set()


def test_twenty_concurrent_posts_of_one_spec_build_once(api: Server) -> None:
    body = {"workflow_id": "wf", "packages": ["extra-a==1.0", "tool-pkg==0.1"], "python": PY}
    codes: list[int] = []

    def post(i: int) -> None:
        codes.append(api.call("POST", "/envs", dict(body, node_id=f"n{i}")).code)

    threads = [threading.Thread(target=post, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert len(codes) == 20 and set(codes) <= {200, 202}, codes
    ids = {api.wait_ready(f"wf/n{i}")["snapshot_id"] for i in range(20)}
    assert len(ids) == 1
    assert api.env.built_events(ids.pop()) == 1


def test_cli_and_api_see_each_others_changes(api: Server) -> None:
    env = api.env
    env.run("build", "wf/cli", "extra-a==1.0", "--python", PY)
    got = api.call("GET", "/envs/wf/cli")
    assert got.code == 200 and got.body["state"] == "ready" and got.body["revision"] == 1
    body = {"workflow_id": "wf", "node_id": "cli", "packages": ["extra-b==2.0"], "python": PY}
    assert api.call("POST", "/envs", body).code == 202
    assert env.show("wf/cli")["revision"] == 2
    history = api.call("GET", "/envs/wf/cli/history").body
    assert [r["revision"] for r in history] == [1, 2] and history[1]["user"] == "api:admin"
    back = api.call("POST", "/envs/wf/cli/rollback", {"to": 1})
    assert back.code == 200 and back.body["revision"] == 3
    assert env.show("wf/cli")["snapshot_id"] == history[0]["snapshot_id"]
    # another node rebinds (its own index): the server follows the store and sees it
    other = dict(env.vars, ENVFS_INDEX=str(env.root / "index-b"), ENVFS_HOST="node-b")
    subprocess.run([*ENVFS, "build", "wf/cli", "tool-pkg==0.1", "--python", PY],
                   env=other, check=True, capture_output=True)  # fmt: skip
    deadline = time.monotonic() + 10
    while api.call("GET", "/envs/wf/cli").body["revision"] != 4:
        assert time.monotonic() < deadline, "the API never saw the CLI's revision 4"
        time.sleep(0.1)
    page = api.call("GET", "/envs?workflow=wf&limit=1").body
    assert page["total"] == 1 and len(page["items"]) == 1
    assert api.call("GET", "/envs?workflow=other").body["total"] == 0
    assert api.call("DELETE", "/envs/wf/cli").body == {"revisions_removed": 4}
    assert env.run("show", "wf/cli", check=False).returncode == 4
    assert api.call("GET", "/envs/wf/cli").code == 404
    assert api.call("GET", "/envs/wf/..x").code == 422
    audit = [e["event"] for e in env.audit() if e.get("node") == "cli"]
    assert audit.count("bound") == 3 and "rolled_back" in audit and "removed" in audit


def test_batch_binds_many_each_all_or_nothing(api: Server) -> None:
    api.env.run("build", "s/a", "extra-a==1.0", "--python", PY)
    sid = api.env.show("s/a")["snapshot_id"]
    rows = [{"workflow_id": "bulk", "node_id": f"n{i}", "snapshot_id": sid[:10]} for i in range(50)]
    rows[3]["snapshot_id"] = "f" * 12  # no such snapshot
    body = {"bindings": rows, "reason": "roll-out"}
    assert api.call("POST", "/envs:batch", body, token=None).code == 401
    assert not any(b.startswith("bulk/") for b in _bindings(api.env))  # nothing written
    got = api.call("POST", "/envs:batch", body)
    assert got.code == 200, got.text
    assert got.body["bound"] == 49 and got.body["unchanged"] == 0
    assert [f["index"] for f in got.body["failed"]] == [3]
    assert "no snapshot" in got.body["failed"][0]["error"]
    assert str(api.env.store) not in got.text
    assert api.call("GET", "/envs/bulk/n49").body["snapshot_id"] == sid
    assert api.call("GET", "/envs/bulk/n3").code == 404
    again = api.call("POST", "/envs:batch", body)
    assert again.body["bound"] == 0 and again.body["unchanged"] == 49
    bad = {"bindings": [{"workflow_id": ".x", "node_id": "n", "snapshot_id": sid}]}
    assert api.call("POST", "/envs:batch", bad).code == 422
    assert api.call("POST", "/envs:batch", {"bindings": "x" * 10}).code == 422


def test_openapi_document_is_served(api: Server) -> None:
    doc = api.call("GET", "/openapi.json").body
    assert {"/envs", "/envs/{wf}/{node}", "/envs/{wf}/{node}/history", "/metrics"} <= set(
        doc["paths"]
    )
    content = doc["paths"]["/envs"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(content)
    assert "EnvRequest" in doc["components"]["schemas"]


def test_serve_api_refuses_to_start_without_a_token(local: Env) -> None:
    out = local.run("serve-api", "--port", "1", check=False)
    assert out.returncode == 3 and "--token-file" in out.stderr and "--tokens" in out.stderr


def test_export_streams_what_the_cli_writes_with_a_token_and_sbom_answers(
    api: Server, tmp_path: Path
) -> None:
    import io
    import tarfile

    env = api.env
    env.run("build", "wf/t", "extra-a==1.0", "--python", PY)

    def get(path: str, token: str | None = TOKEN) -> tuple[int, bytes, str]:
        req = urllib.request.Request(api.url + path)
        if token is not None:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=300) as resp:
                return resp.status, resp.read(), resp.headers.get("Content-Type", "")
        except urllib.error.HTTPError as err:
            return err.code, err.read(), ""

    bundle, archive = tmp_path / "cli.envfs", tmp_path / "cli.oci.tar"
    env.run("export", "wf/t", "-o", str(bundle))
    env.run("export", "wf/t", "--oci-archive", str(archive))
    code, body, media = get("/envs/wf/t/export")
    assert code == 200 and media == "application/zstd" and body == bundle.read_bytes()
    code, body, _media = get("/envs/wf/t/export?format=oci-archive")
    assert code == 200 and body == archive.read_bytes()
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        assert {"oci-layout", "index.json"} <= set(tar.getnames())
    code, body, _media = get("/envs/wf/t/export?format=template")
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        assert sorted(tar.getnames()) == [".python-version", "pyproject.toml", "uv.lock"]
    assert get("/envs/wf/t/export", token=None)[0] == 401  # every byte of an env: a token
    assert get("/envs/wf/t/export", token="wrong")[0] == 401
    assert get("/envs/wf/nope/export")[0] == 404
    assert get("/envs/wf/t/export?format=zip")[0] == 422
    code, body, media = get("/envs/wf/t/sbom", token=None)
    assert code == 200 and media == "application/vnd.cyclonedx+json"
    assert body.decode() == env.run("sbom", "wf/t").stdout


def test_the_server_locks_requirement_lists_from_its_own_index(
    tmp_path: Path, wheelhouse: Path
) -> None:
    """serve-api --index-url: a platform's private index serves every build the API runs
    (here a real local PEP 503 index holding the test wheels, and no PyPI)."""
    from tests.conftest import make_env, served_index
    from tests.test_build import _local_index

    simple = _local_index(tmp_path / "index", wheelhouse)
    env = make_env(tmp_path / "node", None)
    with served_index(simple, "extra-a/") as url:
        server = start_server(env, "--index-url", url)
        try:
            body = {"workflow_id": "p", "node_id": "n", "packages": ["extra-a==1.0"], "python": PY}
            got = server.call("POST", "/envs", body)
            assert got.code in (200, 202), got.text
            server.wait_ready("p/n")
        finally:
            stop_server(server)
        sid = env.show("p/n")["snapshot_id"]
        info = json.loads((env.store / "specs" / sid / "spec.json").read_text())
        assert info["index_url"] == url
        assert (env.store / "snapshots" / sid / "lib/python3.12/site-packages/extra_a").is_dir()
