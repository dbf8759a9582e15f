"""The crash matrix: a build killed by SIGKILL at each phase leaves the store verifiable,
never serves an incomplete snapshot, and leaves nothing (lease, staging dir, orphan process)
that the next build and one gc do not clear.

The kills are real: ``ENVFS_CRASH_AT=PHASE`` makes the builder SIGKILL itself at that
point (``envfs/core/crashpoints.py``), with uv or the bytecode compiler running where the phase
runs one.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from envfs.core.crashpoints import FILL_VARIABLE, PHASES, VARIABLE
from tests.conftest import PY, Env, make_env
from tests.node.test_nodes import wait_for
from tests.test_e2e import Mount, fs, py  # noqa: F401

pytestmark = [
    pytest.mark.fuse,
    pytest.mark.slow,
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse"),
]

#: Phases after which the new snapshot is published / the new revision is written.
PUBLISHED = {"rename", "bind", "log"}
BOUND = {"bind", "log"}
#: What the crashed build installs: 4,000 more modules where the kill lands while uv or the
#: compiler runs, so that an orphan outliving its builder would still be at work.
NEW_ENV = ["extra-b==2.0"]
SLOW_ENV = [*NEW_ENV, "slow-pkg==1.0"]


def _processes_naming(needle: str) -> list[int]:
    """Pids whose command line names ``needle`` (a killed build's orphans would)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if needle.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            continue
    return found


def _leftovers(env: Env) -> tuple[set[str], set[str]]:
    """Staging entries (scratch dot names aside) and build leases."""
    staging = {n for n in env.listing("staging") if not n.startswith(".")}
    leases = {n for n in env.listing("locks") if n.endswith(".lease")}
    return staging, leases


@pytest.fixture
def served(fs: tuple[Env, Path, list[Mount]]) -> Iterator[tuple[Env, Path]]:  # noqa: F811
    """wf/x bound to a built extra-a env and served by a daemon."""
    env, mnt, mounts = fs
    env.run("build", "wf/x", "extra-a==1.0", "--python", PY)
    mounts.append(Mount(env, mnt))
    assert py(mnt, "wf/x", "import extra_a").returncode == 0
    yield env, mnt


@pytest.mark.parametrize("phase", PHASES)
def test_sigkill_at_each_build_phase(served: tuple[Env, Path], phase: str) -> None:
    env, mnt = served
    before = set(env.listing("snapshots"))
    packages = SLOW_ENV if phase in ("sync", "compile") else NEW_ENV
    env.vars[VARIABLE] = phase
    try:
        proc = env.popen("build", "wf/x", *packages, "--python", PY)
        _out, err = proc.communicate(timeout=300)
    finally:
        del env.vars[VARIABLE]
    assert proc.returncode == -signal.SIGKILL, f"the build was not killed at {phase}:\n{err}"

    # the killed builder's children (uv, the compiler and its workers) die with it
    wait_for(lambda: not _processes_naming(str(env.store)), 1, "the build's children exiting")
    assert env.run("verify", "--all", check=False).returncode == 0, phase
    after = set(env.listing("snapshots"))
    assert (after != before) == (phase in PUBLISHED), (phase, after - before)

    # the daemon serves one complete env: the old one until the revision exists, then the new
    if phase in BOUND:
        wait_for(lambda: py(mnt, "wf/x", "import extra_b").returncode == 0, 10, "the new env")
    else:
        out = py(mnt, "wf/x", "import extra_a, extra_b")
        assert "No module named 'extra_b'" in out.stderr, out.stderr

    # one gc clears what the crash left (even if that spec is never built again)
    gc = env.run("gc", "--json")
    assert '"dead_builds"' in gc.stdout
    assert _leftovers(env) == (set(), set()), (phase, gc.stdout)
    assert env.run("verify", "--all", check=False).returncode == 0

    # the same command again finishes the job; a published snapshot is not built again
    # (killed at "rename", its builder never logged "built")
    rerun = env.run("build", "wf/x", *packages, "--python", PY)
    sid = env.show("wf/x")["snapshot_id"]
    assert env.built_events(sid) == (0 if phase == "rename" else 1), rerun.stderr
    wait_for(lambda: py(mnt, "wf/x", "import extra_b").returncode == 0, 10, "the rebuilt env")
    assert _leftovers(env) == (set(), set()), phase


#: A distinct spec per phase, so that one small store serves the whole ENOSPC matrix.
SPECS = {
    "lock": ["extra-b==2.0"],
    "venv": ["tool-pkg==0.1"],
    "sync": ["extra-a==1.0", "extra-b==2.0"],
    "compile": ["slow-pkg==1.0"],  # the only package no earlier phase compiled
    "dedup": ["extra-b==2.0", "tool-pkg==0.1"],
    "manifest": ["extra-a==1.0", "extra-b==2.0", "tool-pkg==0.1"],
    "rename": ["base-lib==1.0", "tool-pkg==0.1"],
    "bind": ["base-lib==1.0", "extra-b==2.0", "tool-pkg==0.1"],
}


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small tmpfs")
def test_a_store_filling_up_at_each_phase(tmp_path: Path, wheelhouse: Path) -> None:
    env = make_env(tmp_path / "small", wheelhouse, seed=False)
    env.store.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200m", "none", str(env.store)], check=True)
    filler = env.store / "filler"
    try:
        env.run("python", "add", PY)
        for phase, packages in SPECS.items():
            env.vars[FILL_VARIABLE] = f"{phase}:{filler}"
            try:
                out = env.run("build", f"wf/{phase}", *packages, "--python", PY, check=False)
            finally:
                del env.vars[FILL_VARIABLE]
            assert filler.exists(), f"the fill point {phase} was never reached"
            filler.unlink()
            if phase in PUBLISHED and out.returncode == 0:
                pass  # built already; what the lease and lock files freed took the rest
            else:
                assert out.returncode == 8, (phase, out.stderr)
                assert len(out.stderr.strip().splitlines()) == 1, (phase, out.stderr)
                assert "Traceback" not in out.stderr, (phase, out.stderr)
                assert "the store is full" in out.stderr, (phase, out.stderr)
                if phase != "lock":  # a build ran: its failure is on record for every node
                    assert len(env.listing("failed")) == 1, phase
            assert env.run("verify", "--all", check=False).returncode == 0, phase
            assert {n for n in env.listing("staging") if not n.startswith(".")} == set(), phase
            env.run("build", f"wf/{phase}", *packages, "--python", PY)  # space again: it builds
            assert env.listing("failed") == set(), phase
        assert env.run("verify", "--all", check=False).returncode == 0
    finally:
        subprocess.run(["umount", "-l", str(env.store)], check=False)
