"""The whole product through the kernel: `envfs mount` over a real store, real uv builds.

Every daemon here is a real `envfs mount --foreground` process; every test unmounts and
stops it by pid even when it fails, and every wait has a deadline.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from envfs.build.uv import uv_binary
from envfs.fs.mounted import is_stale_mount
from tests.conftest import ENVFS, PY, Env, make_env, reachable_by_all
from tests.fusehelpers import force_unmount, is_mounted, stat_errno, stop_daemon

pytestmark = [
    pytest.mark.fuse,
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse"),
]


class Mount:
    """One `envfs mount --foreground` daemon of an Env, at ``path``."""

    def __init__(self, env: Env, path: Path, *args: str) -> None:
        self.env, self.path = env, path
        path.mkdir(parents=True, exist_ok=True)
        self.log_path = env.root / f"daemon-{path.name}-{time.monotonic_ns()}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [*ENVFS, "mount", str(path), "--foreground", *args],
                env=env.vars,
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + 30
        while not (is_mounted(path) and not is_stale_mount(path)):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"mount did not come up:\n{self.log()}")
            time.sleep(0.05)

    killed = False  # set by tests that kill the daemon on purpose

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        stop_daemon(self.proc, self.path)

    def check_clean_exit(self) -> None:
        """A daemon a test started must exit 0 with no traceback in its log."""
        if self.killed:
            return
        assert self.proc.returncode == 0, f"daemon exited {self.proc.returncode}:\n{self.log()}"
        assert "Traceback" not in self.log(), self.log()


@pytest.fixture
def fs(local: Env, tmp_path: Path) -> Iterator[tuple[Env, Path, list[Mount]]]:
    """A local-wheel store plus a place to mount; every daemon started is stopped."""
    local.vars["XDG_RUNTIME_DIR"] = str(tmp_path / "run")
    mounts: list[Mount] = []
    yield local, tmp_path / "envs", mounts
    for m in reversed(mounts):  # the live daemon first: stopping a dead one unmounts the path
        m.stop()
    force_unmount(tmp_path / "envs")
    for m in mounts:
        m.check_clean_exit()


def py(mnt: Path, target: str, code: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [mnt / target / "bin/python", "-c", code], capture_output=True, text=True, timeout=timeout
    )


def spawn_python(python: Path, code: str) -> subprocess.Popen[str]:
    """Start ``python -c code`` without waiting for its exec (which may await a build)."""
    return subprocess.Popen(
        ["sh", "-c", 'exec "$0" -c "$1"', str(python), code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_env_runs_from_the_mount(fs: tuple[Env, Path, list[Mount]]) -> None:
    env, mnt, mounts = fs
    env.run("build", "wf/a", "extra-a==1.0", "tool-pkg==0.1", "--python", PY)
    mounts.append(Mount(env, mnt))
    assert sorted(os.listdir(mnt)) == [".snapshots", "wf"] and os.listdir(mnt / "wf") == ["a"]
    code = (
        "import sys, subprocess, importlib.metadata as md, base_lib\n"
        "print(sys.prefix)\nprint(md.version('extra-a'))\nprint(base_lib.hello())\n"
        "print(subprocess.run([sys.executable, '-c', 'import extra_a, sys; print(sys.prefix)'],"
        " capture_output=True, text=True, check=True).stdout.strip())\n"
    )
    out = py(mnt, "wf/a", code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:4] == [
        str(mnt / "wf/a@1"),  # started as wf/a, pinned to its revision
        "1.0",
        "hello from base_lib",
        str(mnt / "wf/a@1"),
    ]
    tool = subprocess.run(
        [mnt / "wf/a/bin/envfs-demo-tool"], capture_output=True, text=True, timeout=60
    )
    assert tool.returncode == 0 and tool.stdout.strip() == f"tool {mnt / 'wf/a@1'}", tool.stderr
    assert ".envfs" not in os.listdir(mnt / "wf/a")


def test_env_runs_with_the_store_hidden(fs: tuple[Env, Path, list[Mount]]) -> None:
    env, mnt, mounts = fs
    env.run("build", "wf/a", "extra-a==1.0", "--python", PY)
    mounts.append(Mount(env, mnt))
    script = (
        f'mount -t tmpfs none {env.store} && test -z "$(ls {env.store})" && '
        f"{mnt}/wf/a/bin/python -c 'import extra_a, base_lib, sys; print(sys.prefix)'"
    )
    out = subprocess.run(
        ["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(mnt / "wf/a@1")


def test_writes_and_uv_pip_install_fail_read_only(fs: tuple[Env, Path, list[Mount]]) -> None:
    env, mnt, mounts = fs
    env.run("build", "wf/a", "extra-a==1.0", "--python", PY)
    mounts.append(Mount(env, mnt))
    for op in (
        lambda: (mnt / "wf/a/new").write_text("x"),
        lambda: (mnt / "wf/a/bin/newdir").mkdir(),
        lambda: (mnt / "wf/a/bin/python3.12").unlink(),
        lambda: os.rename(mnt / "wf/a/bin/python3.12", mnt / "wf/a/x"),
        lambda: os.chmod(mnt / "wf/a/bin/python3.12", 0o777),
        lambda: os.setxattr(mnt / "wf/a/bin/python3.12", "user.x", b"1"),
    ):
        with pytest.raises(OSError) as err:
            op()
        assert err.value.errno == errno.EROFS
    out = subprocess.run(
        [uv_binary(), "pip", "install", "--python", str(mnt / "wf/a/bin/python"), "extra-b==2.0"],
        capture_output=True,
        text=True,
        env=env.vars,
        timeout=120,
    )
    assert out.returncode != 0
    assert "read-only" in (out.stdout + out.stderr).lower()
    assert env.run("verify", "wf/a").returncode == 0  # the snapshot is untouched


def test_sixteen_first_accesses_build_once_while_others_answer(
    fs: tuple[Env, Path, list[Mount]],
) -> None:
    env, mnt, mounts = fs
    env.run("build", "wf/other", "extra-a==1.0", "--python", PY)
    env.run("bind", "wf/lazy", "slow-pkg==1.0", "--python", PY)
    sid = env.show("wf/lazy")["snapshot_id"]
    mounts.append(Mount(env, mnt))
    # Popen returns only once exec() of the FUSE path succeeded, i.e. after the build:
    # start each access through sh so that all 16 are in flight at once
    procs = [spawn_python(mnt / "wf/lazy/bin/python", "import slow_pkg.pad.m7") for _ in range(16)]
    try:
        # wait until the build holds its lease, then use another env meanwhile
        deadline = time.monotonic() + 60
        while not (env.store / "locks" / f"{sid}.lease").exists():
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                done = [p.communicate()[1] for p in procs if p.poll() is not None]
                raise AssertionError(f"the lazy build never started: {done[:1]}\n{mounts[0].log()}")
            time.sleep(0.01)
        other = py(mnt, "wf/other", "import extra_a", timeout=60)
        assert other.returncode == 0, other.stderr
        assert all(p.poll() is None for p in procs), "the build ended before the other env ran"
        assert env.show("wf/lazy")["state"] == "building"
        deadline = time.monotonic() + 10  # status names the build by the env it is for
        while f"building {sid[:12]} (wf/lazy" not in env.run("status").stdout:
            assert time.monotonic() < deadline, env.run("status").stdout
            time.sleep(0.2)
    finally:
        results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0] * 16, results[0][1]
    assert env.built_events(sid) == 1
    assert env.show("wf/lazy")["state"] == "ready"


def test_failed_build_gives_errno_and_reason_then_fixed_spec_builds(
    fs: tuple[Env, Path, list[Mount]], tmp_path: Path, wheelhouse: Path
) -> None:
    env, mnt, mounts = fs
    house = tmp_path / "house"
    shutil.copytree(wheelhouse, house)
    env.vars["UV_FIND_LINKS"] = str(house)
    env.run("bind", "wf/bad", "extra-b==2.0", "--python", PY)  # locks while the wheel exists
    (house / "extra_b-2.0-py3-none-any.whl").unlink()  # ...so the build fails
    mounts.append(Mount(env, mnt))
    assert stat_errno(mnt / "wf/bad/bin/python", timeout=120) == errno.EIO
    status = json.loads(env.run("status", "--json").stdout)
    failed = status["mounts"][0]["builds"]["failed"]
    assert failed and "extra_b-2.0" in json.dumps(failed), status
    assert "extra_b-2.0" in mounts[0].log()
    assert env.show("wf/bad")["state"] == "failed"
    env.run("bind", "wf/bad", "extra-a==1.0", "--python", PY)  # the fixed spec
    deadline = time.monotonic() + 120
    while True:  # until the daemon sees the rebind (~0.5 s), exec may still hit the EIO view
        try:
            out = py(mnt, "wf/bad", "import extra_a")
        except OSError as exc:
            assert exc.errno == errno.EIO and time.monotonic() < deadline, exc
            time.sleep(0.5)
            continue
        if out.returncode == 0:
            break
        assert time.monotonic() < deadline, out.stderr
        time.sleep(0.5)


def test_binding_change_is_seen_and_old_revision_stays(fs: tuple[Env, Path, list[Mount]]) -> None:
    env, mnt, mounts = fs
    env.run("build", "wf/a", "extra-a==1.0", "--python", PY)
    mounts.append(Mount(env, mnt))
    assert py(mnt, "wf/a", "import extra_a").returncode == 0
    env.run("build", "wf/a", "extra-b==2.0", "--python", PY)  # another process changes it
    deadline = time.monotonic() + 1.5
    while py(mnt, "wf/a", "import extra_b").returncode != 0:
        assert time.monotonic() < deadline, "the new revision was not visible within 1.5 s"
        time.sleep(0.1)
    assert py(mnt, "wf/a", "import extra_a").returncode != 0
    assert py(mnt, "wf/a@1", "import extra_a").returncode == 0
    sid = env.show("wf/a@1")["snapshot_id"]
    assert py(mnt, f".snapshots/{sid}", "import extra_a").returncode == 0
    assert os.getxattr(mnt / "wf/a", "user.envfs.rev") == b"2"


def test_one_corrupt_binding_file_stops_nothing_else(fs: tuple[Env, Path, list[Mount]]) -> None:
    env, mnt, mounts = fs
    env.run("build", "wf/a", "extra-a==1.0", "--python", PY)
    env.run("build", "wf/b", "extra-b==2.0", "--python", PY)
    bad = env.store / "bindings/wf/b/1.json"
    os.chmod(bad, 0o644)
    bad.write_bytes(b"garbage{{\x00\xff")
    env.vars["ENVFS_INDEX"] = str(env.root / "fresh-index")  # a new node: seeded from the logs
    listed = json.loads(env.run("ls", "--json").stdout)  # no binding file read: as logged
    assert [b["node"] for b in listed] == ["a", "b"]
    history = json.loads(env.run("history", "wf/b", "--json").stdout)  # the log's record
    assert [(r["revision"], r["snapshot_id"]) for r in history] == [(1, listed[1]["snapshot_id"])]
    rebuilt = env.run("index", "rebuild")  # every binding file read
    (line,) = rebuilt.stderr.strip().splitlines()  # said once, in one line, without its bytes
    assert str(bad) in line and "corrupt" in line and "garbage" not in line, line
    assert env.show("wf/a")["state"] == "ready"
    env.run("build", "wf/c", "extra-a==1.0", "--python", PY)
    env.run("index", "rebuild")
    verify = env.run("verify", check=False)
    assert verify.returncode == 5 and f"{bad} is corrupt" in verify.stdout, verify.stdout
    mounts.append(Mount(env, mnt))
    assert py(mnt, "wf/a", "import extra_a").returncode == 0
    assert env.run("rm", "wf/b").returncode == 0  # and the broken binding can be removed
    assert env.run("verify").returncode == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="runs envfs as another user (setpriv)")
def test_a_user_who_did_not_mount_it_is_told_permission_denied(
    fs: tuple[Env, Path, list[Mount]],
) -> None:
    env, mnt, mounts = fs
    env.run("build", "wf/a", "extra-a==1.0", "--python", PY)
    mounts.append(Mount(env, mnt))
    with reachable_by_all(mnt):  # by `nobody`
        nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        out = subprocess.run(
            [*nobody, *ENVFS, "umount", str(mnt)], capture_output=True, text=True, timeout=60,
            env={k: v for k, v in env.vars.items() if k not in ("ENVFS_INDEX", "ENVFS_STORE")}
            | {"HOME": "/nonexistent"}, cwd="/",
        )  # fmt: skip
    assert out.returncode == 8, out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert "permission denied" in line and "uid 0" in line and "mtab" not in line, line
    assert is_mounted(mnt)


def test_sigterm_unmounts_and_sigkill_recovers(fs: tuple[Env, Path, list[Mount]]) -> None:
    env, mnt, mounts = fs
    env.run("build", "wf/a", "extra-a==1.0", "--python", PY)
    first = Mount(env, mnt)
    mounts.append(first)
    first.proc.send_signal(signal.SIGTERM)
    assert first.proc.wait(timeout=15) == 0
    assert not is_mounted(mnt)
    second = Mount(env, mnt)
    mounts.append(second)
    assert py(mnt, "wf/a", "import extra_a").returncode == 0
    second.killed = True
    second.proc.kill()
    second.proc.wait(timeout=10)
    # cached attributes may still answer; anything that needs the daemon gets ENOTCONN
    assert stat_errno(mnt / "wf/a/never-looked-up") == errno.ENOTCONN
    third = Mount(env, mnt)  # cleans the stale mount and serves
    mounts.append(third)
    assert py(mnt, "wf/a", "import extra_a").returncode == 0


def test_background_mount_status_and_umount(fs: tuple[Env, Path, list[Mount]]) -> None:
    env, mnt, _ = fs
    env.run("build", "wf/a", "extra-a==1.0", "--python", PY)
    try:
        out = env.run("mount", str(mnt), timeout=60)
        assert "mounted" in out.stdout and is_mounted(mnt)
        assert py(mnt, "wf/a", "import extra_a").returncode == 0
        status = json.loads(env.run("status", "--json").stdout)["mounts"]
        assert [m["mountpoint"] for m in status] == [str(mnt)] and status[0]["alive"]
        pid = status[0]["pid"]
        deadline = time.monotonic() + 5
        while "wf/a@1 -> " not in (text := env.run("status").stdout):  # written within ~1 s
            assert time.monotonic() < deadline, text
            time.sleep(0.2)
        assert "envs served: " in text and "builds: 0 running, 0 failed" in text
        env.run("umount", str(mnt))
        assert not is_mounted(mnt)
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{pid}"):
            assert time.monotonic() < deadline, "daemon did not exit after umount"
            time.sleep(0.05)
        again = env.run("umount", str(mnt), check=False)
        assert again.returncode == 4 and "not mounted" in again.stderr
    finally:
        force_unmount(mnt)


def test_two_nodes_share_one_store_and_build_once(tmp_path: Path, wheelhouse: Path) -> None:
    """Two daemons (own index, own host id, own mountpoint) over one store."""
    a = make_env(tmp_path / "a", wheelhouse, host="node-a")
    b = make_env(tmp_path / "b", wheelhouse, host="node-b")
    b.vars["ENVFS_STORE"] = a.vars["ENVFS_STORE"]
    for e in (a, b):
        e.vars["XDG_RUNTIME_DIR"] = str(e.root / "run")
    a.run("bind", "wf/lazy", "slow-pkg==1.0", "--python", PY)
    sid = a.show("wf/lazy")["snapshot_id"]
    ma, mb = Mount(a, tmp_path / "mnt-a"), Mount(b, tmp_path / "mnt-b")
    try:
        procs = [
            spawn_python(m.path / "wf/lazy/bin/python", "import slow_pkg")
            for m in (ma, mb)
            for _ in range(4)
        ]
        for p in procs:
            _, err = p.communicate(timeout=300)
            assert p.returncode == 0, err
    finally:
        ma.stop()
        mb.stop()
    ma.check_clean_exit()
    mb.check_clean_exit()
    assert a.built_events(sid) == 1
    hosts = {e["host"] for e in a.audit() if e["event"] in ("built", "build_started")}
    assert len(hosts) == 1
