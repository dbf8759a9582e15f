"""Workflow ACLs through a real mount: a member of the ACL's group runs the env, anyone else
gets EACCES on every path into it (current, pinned, kernel-served, ``.snapshots/<id>``),
also right after a member used it, and a change reaches a running daemon."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import PY, Env, reachable_by_all
from tests.node.test_nodes import nodes, wait_for  # noqa: F401  (fixture)
from tests.test_e2e import Mount, fs  # noqa: F401  (fixture)

pytestmark = [
    pytest.mark.fuse,
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse"),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (groupadd, setpriv)"),
]

SITE = "lib/python3.12/site-packages"


@dataclass(frozen=True)
class People:
    group: str  # a real group, and two real users: one in it, one not
    member: str
    stranger: str


@pytest.fixture
def people() -> Iterator[People]:
    """Made with groupadd/useradd, removed after the test."""
    tag = uuid.uuid4().hex[:6]
    made = People(f"envfs-t{tag}", f"envfs-m{tag}", f"envfs-s{tag}")
    subprocess.run(["groupadd", made.group], check=True)
    try:
        subprocess.run(["useradd", "-M", "-G", made.group, made.member], check=True)
        subprocess.run(["useradd", "-M", made.stranger], check=True)
        yield made
    finally:
        for user in (made.member, made.stranger):
            subprocess.run(["userdel", user], check=False, capture_output=True)
        subprocess.run(["groupdel", made.group], check=False, capture_output=True)


def _as(user: str, *cmd: str | Path) -> subprocess.CompletedProcess[str]:
    """``cmd`` as ``user`` with that user's groups (as `su` would give them)."""
    return subprocess.run(
        ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", *map(str, cmd)],
        capture_output=True, text=True, errors="replace", timeout=120, cwd="/",
    )  # fmt: skip


def _denied(done: subprocess.CompletedProcess[str]) -> bool:
    return done.returncode != 0 and "permission denied" in done.stderr.lower()


def test_only_the_group_reads_a_restricted_workflow_on_every_path(
    fs: tuple[Env, Path, list[Mount]],  # noqa: F811
    people: People,
) -> None:
    env, mnt, mounts = fs
    name = people.group
    env.run("build", "team/secret", "extra-a==1.0", "--python", PY)
    env.run("build", "open/x", "extra-b==2.0", "--python", PY)
    sid = env.show("team/secret")["snapshot_id"]
    out = json.loads(env.run("acl", "set", "team", "--group", name, "--json").stdout)
    assert (out["workflow"], out["group"], out["mode"]) == ("team", name, 0o750)
    mounts.append(Mount(env, mnt))
    member, stranger = people.member, people.stranger
    paths = [
        "team/secret/bin/python",
        f"team/secret/{SITE}/extra_a/__init__.py",
        f"team/secret@1/{SITE}/extra_a/__init__.py",
        f".snapshots/{sid}/{SITE}/extra_a/__init__.py",
        f".snapshots/{sid[:12]}/{SITE}/extra_a/__init__.py",
    ]
    with reachable_by_all(mnt):
        ran = _as(member, mnt / "team/secret/bin/python", "-c", "import extra_a")
        assert ran.returncode == 0, ran.stderr
        for path in paths:  # right after the member: no first user's check is kept
            assert _as(member, "head", "-c1", mnt / path).returncode == 0, path
            assert _denied(_as(stranger, "head", "-c1", mnt / path)), path
            assert _denied(_as(stranger, "stat", mnt / path)), path
        assert _denied(_as(stranger, "ls", mnt / "team/secret"))
        # exec'd from a shell: setpriv's own execve still has root's capabilities
        run = ("sh", "-c", 'exec "$0" -c pass', mnt / "team/secret/bin/python")
        assert _denied(_as(stranger, *run))
        assert _as(member, *run).returncode == 0
        opened = _as(stranger, mnt / "open/x/bin/python", "-c", "import extra_b")
        assert opened.returncode == 0, opened.stderr  # no ACL: open to all
        again = _as(member, mnt / "team/secret/bin/python", "-c", "import extra_a")
        assert again.returncode == 0, again.stderr
        listed = {line.split("\t")[0] for line in env.run("acl", "show").stdout.splitlines()}
        assert listed == {"team"}

        # changes reach the running daemon as a bind does: open, then closed again
        env.run("acl", "rm", "team")
        wait_for(lambda: _as(stranger, "head", "-c1", mnt / paths[1]).returncode == 0, 10, "open")
        for path in paths:
            assert _as(stranger, "head", "-c1", mnt / path).returncode == 0, path
        by_id = mnt / ".snapshots" / sid  # open, the id view is handed to the kernel
        wait_for(lambda: os.path.ismount(by_id), 10, "the id view kernel-served")
        env.run("acl", "set", "team", "--group", name, "--mode", "0710")
        wait_for(lambda: all(_denied(_as(stranger, "head", "-c1", mnt / p)) for p in paths),
                 10, "closed again")  # fmt: skip
        assert not os.path.ismount(by_id)  # detached: a bind mount shows the store's bits
        assert _as(member, "head", "-c1", mnt / paths[1]).returncode == 0
        assert os.stat(mnt / "team").st_mode & 0o7777 == 0o710


def test_acl_commands_refuse_what_they_cannot_do(local: Env, people: People) -> None:
    local.run("build", "team/a", "extra-a==1.0", "--python", PY)
    name = people.group
    for args, code, words in [
        (["acl", "set", "team", "--group", "no-such-group-xyz"], 3, "no group"),
        (["acl", "set", "team", "--group", name, "--mode", "0755"], 3, "give others nothing"),
        (["acl", "set", "team", "--group", name, "--mode", "75x"], 3, "not octal"),
        (["acl", "set", "../x", "--group", name], 3, "workflow"),
        (["acl", "rm", "team"], 4, "has no ACL"),
    ]:
        done = local.run(*args, check=False)
        assert done.returncode == code and words in done.stderr, (args, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert json.loads(local.run("acl", "show", "--json").stdout) == []
    assert not (local.store / "acls" / "team.json").exists()  # nothing half-written
    local.run("acl", "set", "team", "--group", name)
    (shown,) = json.loads(local.run("acl", "show", "team", "--json").stdout)
    assert shown["group"] == name and shown["user"]
    events = [e["event"] for e in local.audit()]
    assert events.count("acl_set") == 1
    assert json.loads(local.run("acl", "rm", "team", "--json").stdout)["removed"] is True
    assert "no ACL" in local.run("acl", "show", "team").stdout


def test_the_node_keeps_its_own_files_to_root(
    fs: tuple[Env, Path, list[Mount]],  # noqa: F811
    tmp_path: Path,
    people: People,
) -> None:
    """The index (with the node cache and the API's spool), the status files and the daemon
    logs name the store and what each node serves: no other user reads them."""
    env, mnt, mounts = fs
    env.run("build", "wf/a", "extra-a==1.0", "--python", PY)
    cache = tmp_path / "node-cache"
    mounts.append(Mount(env, mnt, "--cache", str(cache)))
    status_dir = Path(env.vars["XDG_RUNTIME_DIR"]) / "envfs" / "mounts"
    wait_for(lambda: any(status_dir.glob("*.json")), 30, "the daemon's status file")
    (status,) = status_dir.glob("*.json")
    private = {env.index: 0o700, cache: 0o700, status_dir: 0o700, status: 0o600}
    for path, mode in private.items():
        assert os.stat(path).st_mode & 0o777 == mode, path
    with reachable_by_all(env.index), reachable_by_all(status_dir):
        for path in (env.index, cache, status_dir):
            assert _denied(_as(people.stranger, "ls", path)), path
        assert _denied(_as(people.stranger, "head", "-c1", status))


def test_an_acl_set_on_one_node_closes_the_workflow_on_another(
    nodes: tuple[Env, Env, list[Mount]],  # noqa: F811
    people: People,
) -> None:
    a, b, mounts = nodes  # own index and host id each, one store
    a.run("build", "team/x", "extra-a==1.0", "--python", PY)
    mnt = b.root / "mnt"
    mounts.append(Mount(b, mnt))
    target = mnt / f"team/x/{SITE}/extra_a/__init__.py"
    with reachable_by_all(mnt):
        assert _as(people.stranger, "head", "-c1", target).returncode == 0
        a.run("acl", "set", "team", "--group", people.group)
        took = wait_for(lambda: _denied(_as(people.stranger, "head", "-c1", target)), 10, "closed")
        assert took < 10 and _as(people.member, "head", "-c1", target).returncode == 0
