"""Kernel-served views: pinned views of built envs become read-only bind mounts inside the
FUSE mount, and FUSE stays correct wherever those mounts are off or unseen."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from envfs.fs.kernel import mounts_under
from tests.conftest import PY, Env
from tests.node.test_nodes import wait_for
from tests.test_e2e import Mount, fs, py  # noqa: F401

pytestmark = [
    pytest.mark.fuse,
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse"),
]

MODULE = "lib/python3.12/site-packages/extra_a/__init__.py"


def _served(env: Env) -> dict[str, bool]:
    """View path -> kernel-served, from `envfs status --json`."""
    (mount,) = json.loads(env.run("status", "--json").stdout)["mounts"]
    return {e["path"]: e["kernel"] for e in mount["envs"]}


def _daemon_lookups(env: Env) -> int:
    (mount,) = json.loads(env.run("status", "--json").stdout)["mounts"]
    return int(mount["cache"]["lookups"])


def _serve_kernel_view(env: Env, mnt: Path, mounts: list[Mount]) -> None:
    """wf/k built, a daemon at ``mnt``, one run through it, and wf/k@1 kernel-served."""
    env.run("build", "wf/k", "extra-a==1.0", "--python", PY)
    mounts.append(Mount(env, mnt))
    assert py(mnt, "wf/k", "import extra_a").returncode == 0
    wait_for(lambda: mnt / "wf/k@1" in mounts_under(mnt), 10, "the kernel mount")


def test_a_pinned_view_is_served_by_the_kernel(fs: tuple[Env, Path, list[Mount]]) -> None:  # noqa: F811
    env, mnt, mounts = fs
    env.run("build", "wf/k", "extra-a==1.0", "--python", PY)
    mounts.append(Mount(env, mnt))
    out = py(mnt, "wf/k", "import extra_a, sys; print(sys.prefix)")
    assert out.stdout.strip() == str(mnt / "wf/k@1"), out.stderr
    wait_for(lambda: mnt / "wf/k@1" in mounts_under(mnt), 10, "the kernel mount")
    assert os.stat(mnt / "wf/k@1" / MODULE).st_dev == os.stat(env.store).st_dev
    assert os.stat(mnt / "wf/k" / "bin").st_dev == os.stat(mnt).st_dev  # the current view: FUSE
    wait_for(lambda: _served(env).get("wf/k@1") is True, 5, "status naming it kernel-served")
    assert _served(env)["wf/k"] is False
    assert "(kernel)" in env.run("status").stdout

    # the daemon no longer sees the imports: a run makes a handful of lookups, not hundreds
    before = _daemon_lookups(env)
    for _ in range(3):
        assert py(mnt, "wf/k", "import extra_a, base_lib, json, email.mime.text").returncode == 0
    assert _daemon_lookups(env) - before < 60

    # a flip: new processes get the new revision (kernel-served too), the old mount stays
    env.run("build", "wf/k", "extra-b==2.0", "--python", PY)
    wait_for(lambda: py(mnt, "wf/k", "import extra_b").returncode == 0, 10, "the new revision")
    wait_for(lambda: mnt / "wf/k@2" in mounts_under(mnt), 10, "the second kernel mount")
    assert mnt / "wf/k@1" in mounts_under(mnt)

    # a snapshot by id is a pinned view too
    sid = env.show("wf/k")["snapshot_id"]
    assert (mnt / ".snapshots" / sid / "bin").is_dir()
    wait_for(lambda: mnt / ".snapshots" / sid in mounts_under(mnt), 10, "the id view's mount")

    # SIGTERM: the daemon removes its kernel mounts and unmounts
    mounts[0].stop()
    assert mounts_under(mnt) == [] and not os.path.ismount(mnt)


def test_umount_takes_the_kernel_mounts_with_it(fs: tuple[Env, Path, list[Mount]]) -> None:  # noqa: F811
    env, mnt, mounts = fs
    _serve_kernel_view(env, mnt, mounts)
    env.run("umount", str(mnt))
    assert mounts_under(mnt) == [] and not os.path.ismount(mnt)
    mounts[0].proc.wait(timeout=10)


def test_fuse_serves_everything_without_kernel_mounts(
    fs: tuple[Env, Path, list[Mount]],  # noqa: F811
) -> None:
    env, mnt, mounts = fs
    env.run("build", "wf/k", "extra-a==1.0", "--python", PY)
    mounts.append(Mount(env, mnt, "--no-kernel-mounts"))
    for _ in range(3):
        out = py(mnt, "wf/k", "import extra_a, sys; print(sys.prefix)")
        assert out.stdout.strip() == str(mnt / "wf/k@1"), out.stderr
    assert os.stat(mnt / "wf/k@1" / MODULE).st_dev == os.stat(mnt).st_dev
    assert mounts_under(mnt) == []
    want = {"wf/k": False, "wf/k@1": False}
    wait_for(lambda: _served(env) == want, 5, "status naming both views FUSE-served")


#: Run in a private mount namespace made before any kernel mount existed: waits for "go" on
#: stdin, then imports through the mount and says which device served the module.
_UNSEEN = """
import os, subprocess, sys
mnt = sys.argv[1]
sys.stdin.readline()
out = subprocess.run([mnt + "/wf/k/bin/python", "-c",
    "import extra_a, os; print(os.stat(extra_a.__file__).st_dev)"],
    capture_output=True, text=True)
mounts = [l.split()[4] for l in open("/proc/self/mountinfo") if l.split()[4].startswith(mnt + "/")]
print(out.returncode, out.stdout.strip(), os.stat(mnt).st_dev, len(mounts), out.stderr.strip())
"""


def test_a_namespace_that_does_not_see_the_kernel_mounts_is_served_by_fuse(
    fs: tuple[Env, Path, list[Mount]],  # noqa: F811
) -> None:
    env, mnt, mounts = fs
    env.run("build", "wf/k", "extra-a==1.0", "--python", PY)
    mounts.append(Mount(env, mnt))
    # like a container that bind-mounted /envs without propagation, before any access
    unseen = subprocess.Popen(
        ["unshare", "-m", "--propagation", "private", sys.executable, "-c", _UNSEEN, str(mnt)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert py(mnt, "wf/k", "import extra_a").returncode == 0
        wait_for(lambda: mnt / "wf/k@1" in mounts_under(mnt), 10, "the kernel mount")
        out, err = unseen.communicate("go\n", timeout=120)
    finally:
        if unseen.poll() is None:
            unseen.kill()
            unseen.wait()
    rc, module_dev, fuse_dev, kernel_mounts = [*out.split(" ", 4), "", "", ""][:4]
    assert rc == "0", (out, err)
    assert module_dev == fuse_dev and kernel_mounts == "0", out


def test_a_killed_daemons_kernel_mounts_are_cleaned_by_the_next_mount(
    fs: tuple[Env, Path, list[Mount]],  # noqa: F811
) -> None:
    env, mnt, mounts = fs
    _serve_kernel_view(env, mnt, mounts)
    mounts[0].proc.send_signal(signal.SIGKILL)
    mounts[0].proc.wait(timeout=10)
    mounts[0].killed = True
    assert mnt / "wf/k@1" in mounts_under(mnt)  # left behind, on a dead FUSE mount
    (env.index / "served.json").unlink(missing_ok=True)  # no preload: the old mounts only
    mounts.append(Mount(env, mnt))
    assert mounts_under(mnt) == []
    assert py(mnt, "wf/k", "import extra_a").returncode == 0
    wait_for(lambda: mnt / "wf/k@1" in mounts_under(mnt), 10, "a new kernel mount")


def test_a_restarted_daemon_has_what_it_served_loaded_before_it_mounts(
    fs: tuple[Env, Path, list[Mount]],  # noqa: F811
) -> None:
    env, mnt, mounts = fs
    _serve_kernel_view(env, mnt, mounts)
    served = env.index / "served.json"
    wait_for(lambda: served.exists() and "wf/k" in served.read_text(), 10, "served.json")
    mounts[0].stop()
    mounts.append(Mount(env, mnt))
    assert "loaded 1 env(s) served before" in mounts[1].log()
    out = py(mnt, "wf/k", "import extra_a, os; print(os.stat(extra_a.__file__).st_dev)")
    assert out.stdout.strip() == str(os.stat(env.store).st_dev), out.stderr  # kernel at once
    (mount,) = json.loads(env.run("status", "--json").stdout)["mounts"]
    assert mount["cache"]["cold"] == 0  # no manifest was read on the way


def test_umount_of_a_busy_mount_is_refused_and_the_mount_keeps_serving(
    fs: tuple[Env, Path, list[Mount]],  # noqa: F811
) -> None:
    env, mnt, mounts = fs
    env.run("build", "wf/k", "extra-a==1.0", "--python", PY)
    mounts.append(Mount(env, mnt))
    code = "import sys, time; print('up', flush=True); sys.stdin.readline(); import extra_a"
    busy = subprocess.Popen(
        [mnt / "wf/k/bin/python", "-c", code],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert busy.stdout is not None and busy.stdout.readline() == "up\n"
        out = env.run("umount", str(mnt), check=False)
        assert out.returncode == 7 and f"pid {busy.pid}" in out.stderr, out.stderr
        assert os.path.ismount(mnt) and mounts[0].proc.poll() is None
        _, err = busy.communicate("go\n", timeout=60)  # it imports after the refusal
        assert busy.returncode == 0, err
    finally:
        if busy.poll() is None:
            busy.kill()
            busy.wait()
    env.run("umount", str(mnt))  # nobody uses it now
    assert not os.path.ismount(mnt)


def test_a_walk_inside_a_view_from_its_first_use_sees_one_tree(
    fs: tuple[Env, Path, list[Mount]],  # noqa: F811
) -> None:
    env, mnt, mounts = fs
    env.run("build", "wf/k", "extra-a==1.0", "--python", PY)
    sid = env.show("wf/k")["snapshot_id"]
    mounts.append(Mount(env, mnt))
    view = mnt / ".snapshots" / sid
    # the walk's first readdir attaches the snapshot: a kernel mount placed on the view
    # under it would make '..' from below land on the mount, and find fail (ENOENT)
    walk = "find . -type f -name '*.py' -exec cat {} + >/dev/null && find . -type d -exec true \\;"
    out = subprocess.run(
        ["bash", "-c", f"cd {view} && {walk}"], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    wait_for(lambda: view in mounts_under(mnt), 10, "the view kernel-served once walked")
