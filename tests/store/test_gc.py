"""Garbage collection, one revision per process, and no accidents (real CLI, real mounts)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import PY, Env
from tests.fusehelpers import force_unmount
from tests.node.test_nodes import wait_for
from tests.test_e2e import Mount, fs, py  # noqa: F401  (fixture)

pytestmark = [
    pytest.mark.fuse,
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse"),
]


def _sid(env: Env, target: str) -> str:
    return str(env.show(target)["snapshot_id"])


def test_gc_sweeps_what_no_binding_keeps_and_dry_run_changes_nothing(local: Env) -> None:
    local.run("build", "wf/g", "extra-a==1.0", "--python", PY)
    first = _sid(local, "wf/g")
    local.run("build", "wf/g", "extra-b==2.0", "--python", PY)
    second = _sid(local, "wf/g")
    local.run("build", "wf/g", "tool-pkg==0.1", "--python", PY)
    current = _sid(local, "wf/g")
    snapshots = local.store / "snapshots"

    dry = json.loads(local.run("gc", "--keep", "1", "--min-age", "0", "--dry-run", "--json").stdout)
    assert dry["dry_run"] and dry["swept"] == [first] and dry["freed_bytes"] > 0
    assert {first, second, current} <= set(os.listdir(snapshots))  # nothing moved

    young = json.loads(local.run("gc", "--keep", "0", "--json").stdout)  # default min-age 1h
    assert young["swept"] == [] and "younger" in young["kept"][first]

    done = json.loads(local.run("gc", "--keep", "1", "--min-age", "0", "--json").stdout)
    assert done["swept"] == [first]
    assert set(os.listdir(snapshots)) == {second, current}
    assert any(n.startswith(f"snapshot-{first}") for n in local.listing("trash"))
    assert local.run("verify", "--all").returncode == 0
    assert "gc_swept" in [e["event"] for e in local.audit()]

    # past the quarantine, trash is deleted and pool objects nothing links any more go
    out = json.loads(local.run("gc", "--keep", "0", "--min-age", "0", "--quarantine", "0",
                               "--json").stdout)  # fmt: skip
    assert out["swept"] == [second] and out["trash_deleted"] == 2 and out["objects_deleted"] > 0
    assert local.listing("trash") == set()
    for dirpath, _dirs, files in os.walk(local.store / "objects"):
        for name in files:
            assert os.lstat(os.path.join(dirpath, name)).st_nlink > 1
    # a swept revision comes back on demand: its spec stays, so a rollback rebuilds it
    local.run("rollback", "wf/g", "--to", "1")
    local.run("build", "wf/g2", "extra-a==1.0", "--python", PY)
    assert _sid(local, "wf/g2") == first


def test_rm_removes_a_binding_and_gc_then_sweeps_its_snapshot(local: Env) -> None:
    local.run("build", "wf/r", "extra-a==1.0", "--python", PY)
    sid = _sid(local, "wf/r")
    assert "removed wf/r" in local.run("rm", "wf/r").stdout
    assert local.run("show", "wf/r", check=False).returncode == 4
    assert json.loads(local.run("ls", "--json").stdout) == []
    out = json.loads(local.run("gc", "--min-age", "0", "--json").stdout)
    assert out["swept"] == [sid]


def test_a_binding_bound_again_after_rm_never_reuses_a_revision_number(local: Env) -> None:
    local.run("build", "wf/r", "extra-a==1.0", "--python", PY)
    local.run("build", "wf/r", "extra-b==2.0", "--python", PY)
    first = _sid(local, "wf/r")
    local.run("rm", "wf/r")
    local.run("bind", "wf/r", "extra-b==2.0", "tool-pkg==0.1", "--python", PY)
    assert local.show("wf/r")["revision"] == 3  # @1 and @2 named other envs: not again
    assert local.run("show", "wf/r@1", check=False).returncode == 4
    history = json.loads(local.run("history", "wf/r", "--json").stdout)
    assert [h["revision"] for h in history] == [3] and history[0]["snapshot_id"] != first


def test_a_served_snapshot_survives_gc_and_a_process_keeps_its_revision(
    fs: tuple[Env, Path, list[Mount]],  # noqa: F811
) -> None:
    env, mnt, mounts = fs
    env.run("build", "wf/u", "extra-a==1.0", "--python", PY)
    old = _sid(env, "wf/u")
    mounts.append(Mount(env, mnt))
    code = (
        "import sys, time, base_lib; print(sys.prefix, flush=True); "
        "time.sleep(4); import extra_a; print('late import ok', flush=True)"
    )
    proc = subprocess.Popen(
        [mnt / "wf/u/bin/python", "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().decode().strip() == str(mnt / "wf/u@1")  # pinned
    leases = env.store / "leases" / old  # written before the first look into the env returned
    assert leases.is_dir() and os.listdir(leases), "the snapshot a process runs is not leased"
    env.run("build", "wf/u", "extra-b==2.0", "--python", PY)  # a flip while it runs
    out = json.loads(env.run("gc", "--keep", "0", "--min-age", "0", "--json").stdout)
    assert old not in out["swept"] and out["kept"][old].startswith("served by")
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr.decode()
    assert stdout.decode().strip() == "late import ok"
    assert py(mnt, "wf/u", "import extra_b").returncode == 0  # new processes: new revision
    mounts[0].stop()
    assert not leases.exists() or not os.listdir(leases)  # released on a clean exit


def test_read_commands_and_mount_never_create_a_store(tmp_path: Path, local: Env) -> None:
    typo = tmp_path / "typo" / "store"
    for args in (["ls"], ["show", "wf/x"], ["verify"], ["du"], ["gc", "--dry-run"]):
        out = local.run("--store", str(typo), *args, check=False)
        assert out.returncode == 4, (args, out.stderr)
        assert len(out.stderr.strip().splitlines()) == 1 and "no envfs store" in out.stderr
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    out = local.run("--store", str(typo), "mount", str(mnt), "--foreground", check=False)
    assert out.returncode == 4 and not os.path.ismount(mnt)
    assert not (tmp_path / "typo").exists()


def test_umount_refuses_a_mount_that_is_not_envfs(tmp_path: Path, local: Env) -> None:
    target = tmp_path / "tfs"
    target.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "none", str(target)], check=True)
    try:
        out = local.run("umount", str(target), check=False)
        assert out.returncode == 3 and "not envfs" in out.stderr
        assert os.path.ismount(target)
    finally:
        subprocess.run(["umount", str(target)], check=False)
        force_unmount(target)


def test_mounting_twice_at_one_path_is_refused(fs: tuple[Env, Path, list[Mount]]) -> None:  # noqa: F811
    env, mnt, mounts = fs
    env.run("build", "wf/a", "extra-a==1.0", "--python", PY)
    mounts.append(Mount(env, mnt))
    again = env.run("mount", str(mnt), check=False)
    assert again.returncode == 8 and "already a mount point" in again.stderr
    foreground = env.run("mount", str(mnt), "--foreground", check=False)
    assert foreground.returncode == 8 and "already a mount point" in foreground.stderr
    assert py(mnt, "wf/a", "import extra_a").returncode == 0  # the first one still serves


def test_a_dead_daemons_reused_pid_is_not_taken_for_it(
    fs: tuple[Env, Path, list[Mount]],  # noqa: F811
) -> None:
    env, mnt, mounts = fs
    env.run("python", "add", PY)  # makes the store
    mounts.append(Mount(env, mnt))
    status_dir = Path(env.vars["XDG_RUNTIME_DIR"]) / "envfs" / "mounts"
    wait_for(lambda: any(status_dir.glob("*.json")), 10, "the daemon's status file")
    mounts[0].proc.kill()  # SIGKILL: its status file stays
    mounts[0].proc.wait(timeout=10)
    mounts[0].killed = True
    (status_file,) = status_dir.glob("*.json")
    stranger = subprocess.Popen(["sleep", "60"])  # the pid's next owner
    try:
        data = json.loads(status_file.read_text())
        assert data["pid_start"] > 0
        status_file.write_text(json.dumps(dict(data, pid=stranger.pid)))
        shown = json.loads(env.run("status", "--json").stdout)["mounts"]
        assert [m["alive"] for m in shown] == [False]
        out = env.run("umount", str(mnt))  # the stale mount goes; nobody waits on the stranger
        assert out.returncode == 0 and not os.path.ismount(mnt)
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "fuse"])
def test_gc_under_a_live_daemon_takes_idle_revisions_and_keeps_one_in_use(
    fs: tuple[Env, Path, list[Mount]],  # noqa: F811
    kernel: bool,
) -> None:
    env, mnt, mounts = fs
    specs = [["extra-a==1.0"], ["extra-b==2.0"], ["extra-a==1.0", "extra-b==2.0"]]
    ids = []
    for packages in specs:
        env.run("build", "wf/tmp", *packages, "--python", PY)
        ids.append(_sid(env, "wf/tmp"))
    env.run("rm", "wf/tmp")
    env.run("bind", "g/x", "--snapshot", ids[0])
    args = ["--idle-release", "1s"] + ([] if kernel else ["--no-kernel-mounts"])
    mounts.append(Mount(env, mnt, *args))
    # revision 1 used and done with; every revision shares the interpreter's files, which
    # the daemon first saw (and so reads) through revision 1
    assert py(mnt, "g/x", "import extra_a").returncode == 0
    env.run("bind", "g/x", "--snapshot", ids[1])
    wait_for(lambda: py(mnt, "g/x", "import extra_b").returncode == 0, 5, "revision 2")
    code = "import sys; sys.stdin.readline(); import json, extra_b; print('late import ok')"
    proc = subprocess.Popen(
        [mnt / "g/x/bin/python", "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    env.run("bind", "g/x", "--snapshot", ids[2])
    wait_for(lambda: py(mnt, "g/x", "import extra_a, extra_b").returncode == 0, 5, "rev 3")
    leases = env.store / "leases"
    wait_for(lambda: not (leases / ids[0]).exists() or not os.listdir(leases / ids[0]), 10,
             "the daemon letting go of revision 1")  # fmt: skip
    out = json.loads(
        env.run("gc", "--keep", "0", "--min-age", "0", "--quarantine", "0", "--json").stdout
    )
    assert ids[0] in out["swept"], out
    assert ids[1] not in out["swept"] and out["kept"][ids[1]].startswith("served by"), out
    assert not (env.store / "snapshots" / ids[0]).exists()
    stdout, stderr = proc.communicate("go\n", timeout=60)  # imports what it had not yet
    assert proc.returncode == 0 and stdout.strip() == "late import ok", stderr
    assert py(mnt, "g/x", "import json, extra_a, extra_b").returncode == 0
    # used again: revision 1 is attached again, built again from its spec (gc took it)
    assert py(mnt, "g/x@1", "import extra_a").returncode == 0
    assert "let go of " + ids[0][:12] in mounts[0].log()
