"""What launchers use: `envfs run`, `envfs resolve`, `envfs show --packages` (real mounts)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ENVFS, PY, Env
from tests.test_e2e import Mount, fs  # noqa: F401

pytestmark = [
    pytest.mark.fuse,
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse"),
]


def test_run_and_resolve_use_the_mount_of_this_store(
    fs: tuple[Env, Path, list[Mount]],  # noqa: F811
) -> None:
    env, mnt, mounts = fs
    env.run("build", "wf/r", "extra-a==1.0", "--python", PY)
    no_mount = env.run("resolve", "wf/r", check=False)
    assert no_mount.returncode == 4 and "envfs mount" in no_mount.stderr
    mounts.append(Mount(env, mnt))
    assert env.run("resolve", "wf/r").stdout.strip() == str(mnt / "wf/r@1")
    code = "import extra_a, sys, os; print(sys.prefix, os.environ['VIRTUAL_ENV'])"
    out = env.run("run", "wf/r", "--", "python", "-c", code).stdout.split()
    assert out == [str(mnt / "wf/r@1"), str(mnt / "wf/r")]
    env.run("build", "wf/r", "extra-b==2.0", "--python", PY)  # revision 2
    code = code.replace("extra_a", "extra_b")
    pinned = env.run("run", "wf/r", "--pinned", "--", "python", "-c", code).stdout.split()
    assert pinned == [str(mnt / "wf/r@2")] * 2
    missing = env.run("run", "wf/r", "--", "no-such-command", check=False)
    assert missing.returncode == 3 and len(missing.stderr.strip().splitlines()) == 1
    # the command's exit code is the command's own: envfs exec'd it
    code_7 = subprocess.run([*ENVFS, "run", "wf/r", "--", "python", "-c", "exit(7)"], env=env.vars)
    assert code_7.returncode == 7


def test_show_packages_lists_the_locked_packages(local: Env) -> None:
    local.run("build", "wf/p", "extra-a==1.0", "--python", PY)
    text = local.run("show", "wf/p", "--packages").stdout
    assert "  extra-a==1.0" in text and "  base-lib==1.0" in text
    data = json.loads(local.run("show", "wf/p", "--packages", "--json").stdout)
    assert {"name": "base-lib", "version": "1.0"} in data["packages"]
    assert all(p["name"] != "envfs-env" for p in data["packages"])
    assert "packages" not in json.loads(local.run("show", "wf/p", "--json").stdout)


def test_doctor_passes_here_and_names_what_is_broken(
    fs: tuple[Env, Path, list[Mount]],  # noqa: F811
) -> None:
    env, mnt, mounts = fs
    fresh = env.run("--store", str(env.root / "none-yet"), "doctor", "--json")
    report = json.loads(fresh.stdout)
    assert report["ok"] is True
    levels = {f["name"]: f["level"] for f in report["findings"]}
    assert levels["fuse device"] == levels["uv"] == levels["kernel"] == "ok"
    assert levels["store"] == "warn"  # not made yet: not an error

    env.run("build", "wf/d", "extra-a==1.0", "--python", PY)
    mounts.append(Mount(env, mnt))
    mounts[0].proc.kill()  # a dead daemon leaves a stale mount
    mounts[0].proc.wait(timeout=10)
    mounts[0].killed = True
    cache = env.store / "uv-cache"
    subprocess.run(["mount", "-t", "tmpfs", "none", str(cache)], check=True)
    try:
        out = env.run("doctor", check=False)
    finally:
        subprocess.run(["umount", str(cache)], check=True)
    assert out.returncode == 8, out.stdout
    assert f"ERROR mount: {mnt}: stale" in out.stdout
    assert "ERROR hardlinks from the uv cache" in out.stdout
    assert "fix: keep uv-cache inside the store" in out.stdout
