"""Many bindings: bulk binds by snapshot id (real CLI, local store); what a node costs the
NAS at rest, to mount and to list, whatever the number of bindings (the store on nas-sim,
a real daemon and mount)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import ENVFS, PY, Env
from tests.node.test_cache import _copies, nas_node  # noqa: F401  (fixture)
from tests.node.test_nodes import imports, wait_for
from tests.test_e2e import Mount, fs  # noqa: F401  (fixture)
from tests.test_nas_sim import NasSim


def _sid(env: Env, target: str) -> str:
    return str(env.show(target)["snapshot_id"])


def test_bind_by_snapshot_id_or_unique_prefix(local: Env) -> None:
    local.run("build", "s/a", "extra-a==1.0", "--python", PY)
    sid = _sid(local, "s/a")
    out = local.run("bind", "g/x", "--snapshot", sid[:8]).stdout
    assert out.startswith("g/x@1 -> ") and _sid(local, "g/x") == sid
    # again: already bound so, no new revision
    local.run("bind", "g/x", "--snapshot", sid)
    assert [r["revision"] for r in json.loads(local.run("history", "g/x", "--json").stdout)] == [1]
    for ref, code, words in (
        ("zz", 3, "is not a snapshot id"),
        ("0" * 64, 4, "no snapshot"),
        (sid[:4], 3, "is not a snapshot id"),
    ):
        proc = local.run("bind", "g/y", "--snapshot", ref, check=False)
        assert proc.returncode == code and words in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
    proc = local.run("bind", "g/y", "extra-a==1.0", "--snapshot", sid, check=False)
    assert proc.returncode == 2 and "--snapshot takes no spec" in proc.stderr
    assert not (local.store / "bindings" / "g" / "y").exists()


def test_a_prefix_two_snapshots_share_is_refused(local: Env) -> None:
    specs = local.store / "specs"
    local.run("build", "s/a", "extra-a==1.0", "--python", PY)
    sid = _sid(local, "s/a")
    twin = sid[:6] + ("0" if sid[6] != "0" else "1") + sid[7:]
    os.symlink(specs / sid, specs / twin)  # a second spec sharing the first 6 digits
    proc = local.run("bind", "g/y", "--snapshot", sid[:6], check=False)
    assert proc.returncode == 3 and "names 2 snapshots" in proc.stderr
    local.run("bind", "g/y", "--snapshot", sid[:7])
    assert _sid(local, "g/y") == sid


def test_bind_batch_binds_every_good_line_and_reports_the_bad_ones(local: Env) -> None:
    local.run("build", "s/a", "extra-a==1.0", "--python", PY)
    local.run("build", "s/b", "extra-b==2.0", "--python", PY)
    a, b = _sid(local, "s/a"), _sid(local, "s/b")
    lines = [f"wf{i // 10}/n{i % 10} {a[:10]}" for i in range(200)]
    lines[7] = "wf0/n7 " + "f" * 12  # no such snapshot
    lines[8] = "wf0/.n8 " + a  # a bad name
    lines[9] = "wf0/n9"  # no id
    lines.insert(0, "# a comment, then a blank line")
    lines.insert(1, "")
    lines.append(f"s/a {a}  # already bound so")
    lines.append(f"s/b {a}")
    batch = "\n".join(lines) + "\n"
    proc = subprocess.run(
        [*ENVFS, "bind", "--batch", "-", "--json"],
        input=batch,
        capture_output=True,
        text=True,
        env=local.vars,
        timeout=300,
    )
    assert proc.returncode == 3, proc.stderr
    report = json.loads(proc.stdout)
    assert report["bound"] == 198 and report["unchanged"] == 1
    assert [f["line"] for f in report["failed"]] == [10, 11, 12]
    assert "no snapshot" in report["failed"][0]["error"]
    envs = json.loads(local.run("ls", "--json").stdout)
    listed = {f"{e['workflow']}/{e['node']}": e for e in envs}
    assert len(listed) == 199 and "wf0/n7" not in listed
    assert listed["wf19/n9"]["snapshot_id"] == a and listed["s/b"]["snapshot_id"] == a
    assert listed["s/b"]["revision"] == 2 and _sid(local, "s/b") == a != b
    one = json.loads(local.run("ls", "--workflow", "wf3", "--json").stdout)
    assert sorted(e["node"] for e in one) == [f"n{i}" for i in range(10)]
    assert local.run("ls", "--workflow", "no-such", "--json").stdout.strip() == "[]"
    assert local.run("ls", "--workflow", ".bad", check=False).returncode == 3
    # every line a revision as usual: in history and in the feed
    bound = [e for e in local.audit() if e["event"] == "bound" and e["workflow"] == "wf3"]
    assert len(bound) == 10
    # a second node's fresh index sees them all
    other = dict(local.vars, ENVFS_INDEX=str(local.root / "index2"))
    out = subprocess.run(
        [*ENVFS, "ls", "--json"], capture_output=True, text=True, env=other, timeout=300
    )
    assert len(json.loads(out.stdout)) == 199
    proc = local.run("bind", "--batch", "-", "s/c", check=False)
    assert proc.returncode == 2 and "--batch takes no WF/NODE" in proc.stderr


def _requests(nas: NasSim) -> int:
    return sum(v for k, v in nas.counts().items() if not k.endswith("bytes"))


def _bind_many(env: Env, n: int) -> str:
    env.run("build", "s/a", "extra-a==1.0", "--python", PY)
    sid = _sid(env, "s/a")
    batch = "".join(f"wf{i // 100:03d}/n{i % 100:03d} {sid}\n" for i in range(n))
    proc = subprocess.run(
        [*ENVFS, "bind", "--batch", "-"],
        input=batch,
        capture_output=True,
        text=True,
        env=env.vars,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return sid


@pytest.mark.fuse
@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")
def test_mount_listing_and_rest_cost_the_nas_the_same_whatever_the_bindings(
    nas_node: tuple[Env, NasSim, list[Mount]],  # noqa: F811
) -> None:
    env, nas, mounts = nas_node
    n = 400
    _bind_many(env, n)
    env.vars["ENVFS_INDEX"] = str(env.root / "fresh-index")  # a node that never saw the store

    before = _requests(nas)
    mnt = env.root / "mnt"
    mounts.append(Mount(env, mnt))
    to_mount = _requests(nas) - before
    # the index is seeded from the logs (a few reads), no binding file opened: walking them
    # cost > 5 requests per binding
    assert to_mount < n / 4, to_mount
    assert imports(mnt, "wf003/n042", "extra_a")()
    wait_for(lambda: _copies(env) == 1, 60, "the node cache's copy")

    time.sleep(2)
    before = _requests(nas)
    time.sleep(12)
    at_rest = _requests(nas) - before
    # one probe of the feed every 1.5 s, the sweep's 0.2 requests/s, a lease's refresh: a
    # comparison of every binding directory every 2 s cost ~2 requests per binding and pass
    assert at_rest <= 14, at_rest

    before = _requests(nas)
    listed = json.loads(env.run("ls", "--json").stdout)
    assert len(listed) == n + 1
    assert _requests(nas) - before < n / 4  # from the index: one spec read, not one per binding
    assert mounts[0].proc.poll() is None


def test_a_new_list_locks_from_the_nearest_lock_the_index_knows(local: Env) -> None:
    local.run("build", "s/a", "extra-a==1.0", "base-lib==1.0", "--python", PY)
    sid = _sid(local, "s/a")
    (line,) = [e for e in local.audit() if e["event"] == "spec_written"]
    assert line["snapshot_id"] == sid
    assert sorted(line["spec"]["requirements"]) == ["base-lib==1.0", "extra-a==1.0"]
    # 250 newer spec directories: a scan of the 200 newest specs would never reach it
    for i in range(250):
        (local.store / "specs" / f"{i:064x}").mkdir()
    local.vars["ENVFS_INDEX"] = str(local.root / "fresh-index")  # learns it from the feed
    out = local.run("-v", "build", "s/b", "extra-a==1.0", "extra-b==2.0", "--python", PY)
    assert f"from the lock of {sid[:12]} (1 in common)" in out.stderr, out.stderr


def test_history_is_answered_from_the_index_with_the_files_records(local: Env) -> None:
    for packages in (["extra-a==1.0"], ["extra-b==2.0"]):
        local.run("build", "wf/h", *packages, "--python", PY, "--reason", f"with {packages[0]}")
    local.run("rollback", "wf/h")
    from_files = json.loads(local.run("history", "wf/h", "--json").stdout)
    assert [r["action"] for r in from_files] == ["bind", "bind", "rollback"]
    local.vars["ENVFS_INDEX"] = str(local.root / "fresh-index")  # seeded from the logs alone
    binding = local.store / "bindings" / "wf" / "h"
    hidden = local.root / "hidden"
    binding.rename(hidden)  # the files out of reach: the answer can only be the index's
    try:
        assert json.loads(local.run("history", "wf/h", "--json").stdout) == from_files
    finally:
        hidden.rename(binding)


def test_gc_takes_what_the_index_knows_of_a_revision_instead_of_reading_it(local: Env) -> None:
    local.run("build", "wf/g", "extra-a==1.0", "--python", PY)
    local.run("build", "wf/old", "extra-b==2.0", "--python", PY)
    kept, old = _sid(local, "wf/g"), _sid(local, "wf/old")
    local.run("rm", "wf/old")
    revision = local.store / "bindings/wf/g/1.json"
    os.chmod(revision, 0o644)
    revision.write_text("{ unreadable")  # the index has its record: gc need not read it
    out = json.loads(local.run("gc", "--keep", "0", "--min-age", "0", "--dry-run", "--json").stdout)
    assert out["kept"][kept] == "current revision of wf/g" and out["swept"] == [old]
    assert local.run("verify", check=False).returncode == 5  # the damage is still reported


def test_gc_lists_no_binding_the_index_vouches_for_and_reads_those_it_cannot(
    local: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At 100,000 bindings a listing each is minutes on a NAS: gc takes which revisions a
    binding has from the index, caught up with the logs, and lists only the bindings the
    logs do not describe: one whose writer died between its intent and its line, one
    written with no line at all (lost logs), every one with --walk."""
    from envfs.core.config import Settings
    from envfs.service.envs import Service
    from envfs.store.formats import GcReport, Revision

    for key, value in local.vars.items():
        if key.startswith("UV_"):
            monkeypatch.setenv(key, value)
    a = _bind_many(local, 30)  # wf000/n000..n029, 30 bindings, one revision each
    local.run("build", "s/b", "extra-b==2.0", "--python", PY)
    b = _sid(local, "s/b")
    local.run("bind", "wf000/n001", "--snapshot", b)
    local.run("bind", "wf000/n001", "--snapshot", a)  # n001: @1 a, @2 b, @3 a
    local.run("rm", "s/b")

    def gc(walk: bool = False, keep: int = 0) -> tuple[GcReport, set[str]]:
        svc = Service(Settings.resolve(local.store, local.index))
        listed: list[str] = []
        numbers = svc.store.revision_numbers

        def counted(wf: str, node: str) -> list[int]:
            listed.append(f"{wf}/{node}")
            return numbers(wf, node)

        monkeypatch.setattr(svc.store, "revision_numbers", counted)
        report = svc.gc(keep, 0.0, 0.0, dry_run=True, walk=walk)
        svc.index.close()
        return report, set(listed)

    report, listed = gc()
    assert report.swept == [b] and listed == set()
    report, listed = gc(keep=1)  # n001's revision 2 is kept, and no binding was listed
    assert report.kept[b] == "revision 2 of wf000/n001" and listed == set()
    shutil.rmtree(local.index)  # a fresh index, seeded from the logs alone
    assert gc()[1] == set()

    store = Service(Settings.resolve(local.store, local.index)).store

    def revision(wf: str, node: str) -> Callable[[int], Revision]:
        return lambda number: Revision(
            workflow=wf, node=node, revision=number, snapshot_id=b, time=0.0, host="x", user="u"
        )

    # a bind that died after its intent and its file, before its line
    store.audit("binding_intent", "x", b, workflow="wf000", node="n005")
    store.append_revision(revision("wf000", "n005"))
    report, listed = gc()
    assert report.kept[b] == "current revision of wf000/n005" and listed == {"wf000/n005"}
    # a binding no log line tells of (files written behind envfs's back, or logs lost)
    store.append_revision(revision("lost", "n0"))
    report, listed = gc()
    assert listed == {"lost/n0", "wf000/n005"} and b in report.kept
    assert len(gc(walk=True)[1]) == 32


@pytest.mark.fuse
@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")
def test_index_rebuild_shows_progress_and_runs_while_a_daemon_serves(
    fs: tuple[Env, Path, list[Mount]],  # noqa: F811
) -> None:
    env, mnt, mounts = fs
    _bind_many(env, 2500)
    mounts.append(Mount(env, mnt))
    assert imports(mnt, "wf001/n001", "extra_a")()
    proc = env.popen("-v", "index", "rebuild")  # the daemon's own index
    served_meanwhile = imports(mnt, "wf002/n003", "extra_a")()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "read 1000 of 2501 bindings" in err and "read 2501 of 2501 bindings" in err
    assert "2501 binding(s), 0 caught up" in out
    assert served_meanwhile and imports(mnt, "wf024/n099", "extra_a")()
    assert mounts[0].proc.poll() is None
