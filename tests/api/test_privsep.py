"""serve-api as root in two processes: the HTTP side runs as the API user with nothing of
the privileged side's, and the privileged side decides itself what a call may do."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from envfs.api import stream
from envfs.api.backend import Backend, Caller
from envfs.api.link import LocalLink, dispatch
from envfs.api.privsep import api_user
from envfs.api.tokens import Tokens
from envfs.core.config import Settings
from envfs.service.envs import Service
from tests.api.test_api import Server, api, start_server, stop_server  # noqa: F401
from tests.conftest import PY, Env

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the split needs root")


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = _status(int(entry.name))["PPid"]
            except OSError:
                continue
            if ppid == str(pid):
                found.append(int(entry.name))
    return found


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def _http_side(server: Server) -> int:
    (child,) = _children(server.proc.pid)
    return child


def test_the_http_side_runs_as_the_api_user_with_nothing_of_roots(api: Server) -> None:  # noqa: F811
    _name, uid, gid = api_user()
    child = _http_side(api)
    status = _status(child)
    assert status["Uid"].split() == [str(uid)] * 4, status["Uid"]
    assert status["Gid"].split() == [str(gid)] * 4, status["Gid"]
    assert status["Groups"] == ""
    assert status["NoNewPrivs"] == "1"
    assert int(status["CapEff"], 16) == int(status["CapPrm"], 16) == 0
    assert int(status["CapBnd"], 16) != 0  # (bounding set kept: no_new_privs rules it out)
    # no descriptor onto the store, the index or the token file, and no credentials
    env = api.env
    held = [os.readlink(f"/proc/{child}/fd/{fd}") for fd in os.listdir(f"/proc/{child}/fd")]
    private = (str(env.store), str(env.index), str(env.root / "token"))
    assert not [h for h in held if h.startswith(private)], held
    environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
    assert not [e for e in environ if e.startswith((b"ENVFS_", b"UV_"))], environ
    # the privileged side is root and keeps them
    parent = _status(api.proc.pid)
    assert parent["Uid"].split()[0] == "0"
    # and the API works through the split: a bind, a read, the metrics of both sides
    got = api.call("POST", "/envs", {"workflow_id": "wf", "node_id": "a",
                                     "packages": ["extra-a==1.0"], "python": PY})  # fmt: skip
    assert got.code in (200, 202), got.text
    assert api.wait_ready("wf/a")["python_path"] == "/envs/wf/a/bin/python"
    metrics = api.call("GET", "/metrics").text
    assert "envfs_builds_total" in metrics and "envfs_http_requests_total" in metrics


def test_the_http_side_sees_no_closed_directory_of_root(api: Server) -> None:  # noqa: F811
    """An interpreter under a directory the API user cannot search (root's 0700 home on
    this machine) is shown to the HTTP side alone, and nothing else of that directory."""
    child = _http_side(api)
    root_home = Path("/root")
    if root_home.stat().st_mode & 0o001:
        pytest.skip("/root is searchable by others here: nothing to hide")
    seen = set(os.listdir(f"/proc/{child}/root/root"))
    mine = set(os.listdir("/root"))
    interpreter = {
        Path(p).relative_to("/root").parts[0] for p in _python_paths() if p.startswith("/root/")
    }
    assert seen == interpreter, (seen, interpreter)
    assert mine - seen  # root's own files there are out of sight


def _python_paths() -> list[str]:
    import sys

    return [os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, *sys.path) if p]


def test_the_http_side_dies_with_the_privileged_side(local: Env) -> None:
    server = start_server(local)
    child = _http_side(server)
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child}").exists() and _status(child).get("State", "").split()[0] != "Z":
        assert time.monotonic() < deadline, "the HTTP side outlived its parent"
        time.sleep(0.05)


def test_a_stop_stops_both_sides_cleanly(local: Env) -> None:
    server = start_server(local)
    child = _http_side(server)
    stop_server(server)  # exit 0, no traceback
    assert not Path(f"/proc/{child}").exists() or _status(child)["State"].startswith("Z")


@pytest.fixture
def backend(local: Env) -> Iterator[Backend]:
    local.run("build", "wf/a", "extra-a==1.0", "--python", PY)
    spec = local.root / "tokens.toml"
    spec.write_text(
        '[tokens.a]\nsecret = "secret-of-team-a-1234"\nworkflows = ["wf"]\nrole = "read"\n'
        '[tokens.b]\nsecret = "secret-of-team-b-1234"\nworkflows = ["other"]\nrole = "write"\n'
    )
    spec.chmod(0o600)
    ours = Backend(Service(Settings.resolve(local.store, local.index)), Tokens.from_file(spec))
    try:
        yield ours
    finally:
        ours.stop()


def _ask(backend: Backend, op: str, auth: str = "", **args: Any) -> dict[str, Any]:
    request = {"op": op, "caller": {"authorization": auth, "client": "test"}, "args": args}
    answer, fds = dispatch(backend, json.dumps(request).encode())
    for fd in fds:
        os.close(fd)
    result: dict[str, Any] = json.loads(answer)
    return result


def test_the_privileged_side_decides_itself_whoever_asks(backend: Backend) -> None:
    """A taken-over HTTP side that skips its own checks gets no further: each operation
    checks the Authorization header it is given, and only the listed operations exist."""
    read_a, write_b = "Bearer secret-of-team-a-1234", "Bearer secret-of-team-b-1234"
    assert _ask(backend, "get_env", read_a, wf="wf", node="a")["ok"]["workflow_id"] == "wf"
    assert _ask(backend, "get_env", "", wf="wf", node="a")["error"]["status"] == 401
    assert _ask(backend, "get_env", write_b, wf="wf", node="a")["error"]["status"] == 403
    assert _ask(backend, "delete_env", read_a, wf="wf", node="a")["error"]["status"] == 403
    assert _ask(backend, "rollback", "", wf="wf", node="a", to=None)["error"]["status"] == 401
    assert _ask(backend, "export", "", wf="wf", node="a", format="bundle")["error"]["status"] == 401
    page = _ask(backend, "list_envs", write_b, workflow=None, offset=0, limit=10)["ok"]
    assert page["total"] == 0  # only what it may see
    # nothing but the operations, and their arguments as typed
    assert _ask(backend, "stop", read_a)["error"]["status"] == 400
    assert _ask(backend, "_writer", read_a)["error"]["status"] == 400
    assert _ask(backend, "get_env", read_a, wf="wf", node="a", x=1)["error"]["status"] == 422
    bad = _ask(backend, "list_envs", read_a, workflow="wf", offset=-1, limit=10)
    assert bad["error"]["status"] == 422
    path = {"workflow_id": "wf", "node_id": "b", "packages": ["x"], "python": "/bin/sh"}
    assert _ask(backend, "post_env", write_b, req=path)["error"]["status"] == 422
    assert _ask(backend, "get_env", read_a, wf="../x", node="a")["error"]["status"] == 422
    assert json.loads(dispatch(backend, b"{not json")[0])["error"]["status"] == 422
    # still the binding as it was
    assert backend.service.show("wf", "a").revision == 1


def test_the_local_link_is_the_same_calls(backend: Backend) -> None:
    link = LocalLink(backend)
    caller = Caller(authorization="Bearer secret-of-team-a-1234")
    view = link.call("get_env", caller, wf="wf", node="a")
    assert view.workflow_id == "wf" and view.python_path.endswith("/wf/a/bin/python")
    data, status = link.call("export", caller, wf="wf", node="a", format="template")
    assert b"uv.lock" in b"".join(stream.chunks(data, status))


def test_an_export_that_fails_part_way_is_cut_short() -> None:
    def half(out: IO[bytes]) -> None:
        out.write(b"x" * 100_000)
        raise OSError("the store went away")

    (data, status), (w_data, w_status) = stream.pipes()
    import threading

    thread = threading.Thread(target=stream.produce, args=(half, w_data, w_status))
    thread.start()
    got = bytearray()
    with pytest.raises(RuntimeError, match="export failed"):
        for chunk in stream.chunks(data, status):
            got += chunk
    thread.join()
    assert len(got) == 100_000

    (data, status), (w_data, w_status) = stream.pipes()
    stream.produce(lambda out: out.write(b"whole"), w_data, w_status)
    assert b"".join(stream.chunks(data, status)) == b"whole"
