"""Many nodes, one store: every change reaches every node, whatever happened to the logs.

Nodes are daemons with their own index, host id and mountpoint over one store directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from envfs.store.formats import Revision
from envfs.store.layout import Store
from tests.conftest import PY, Env, make_env
from tests.test_e2e import Mount, py

pytestmark = [
    pytest.mark.fuse,
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse"),
]


@pytest.fixture
def nodes(tmp_path: Path, wheelhouse: Path) -> Iterator[tuple[Env, Env, list[Mount]]]:
    """Node a and node b over a's store; every daemon started is stopped."""
    a = make_env(tmp_path / "a", wheelhouse, host="node-a")
    b = make_env(tmp_path / "b", wheelhouse, host="node-b")
    b.vars["ENVFS_STORE"] = a.vars["ENVFS_STORE"]
    b.store = a.store
    for e in (a, b):
        e.vars["XDG_RUNTIME_DIR"] = str(e.root / "run")
    mounts: list[Mount] = []
    yield a, b, mounts
    for m in reversed(mounts):  # the live daemon first: stopping a dead one unmounts the path
        m.stop()
    for m in mounts:
        m.check_clean_exit()


def wait_for(check: Callable[[], bool], seconds: float, what: str) -> float:
    """Poll ``check`` until it holds; the seconds it took.  Fails after ``seconds``."""
    t0 = time.monotonic()
    while not check():
        assert time.monotonic() - t0 < seconds, f"{what} not within {seconds} s"
        time.sleep(0.1)
    return time.monotonic() - t0


def imports(mnt: Path, target: str, module: str) -> Callable[[], bool]:
    return lambda: py(mnt, target, f"import {module}", timeout=60).returncode == 0


def test_each_host_appends_only_to_its_own_log(nodes: tuple[Env, Env, list[Mount]]) -> None:
    a, b, _ = nodes
    a.run("build", "wf/x", "extra-a==1.0", "--python", PY)
    b.run("bind", "wf/y", "extra-b==2.0", "--python", PY)
    logs = a.store / "log"
    assert sorted(os.listdir(logs)) == ["beacon", "node-a.jsonl", "node-b.jsonl"]
    for host in ("node-a", "node-b"):
        lines = (logs / f"{host}.jsonl").read_text().splitlines()
        assert lines and {json.loads(line)["host"] for line in lines} == {host}
    assert {(e["event"], e["host"]) for e in a.audit()} >= {
        ("bound", "node-a"),
        ("bound", "node-b"),
    }


def serving_x(nodes: tuple[Env, Env, list[Mount]]) -> Path:
    """Node a builds wf/x (extra-a) and wf/other (extra-b); node b mounts and serves wf/x."""
    a, b, mounts = nodes
    a.run("build", "wf/x", "extra-a==1.0", "--python", PY)
    a.run("build", "wf/other", "extra-b==2.0", "--python", PY)
    mnt = b.root / "mnt"
    mounts.append(Mount(b, mnt))
    assert imports(mnt, "wf/x", "extra_a")()
    return mnt


def test_changes_cross_garbage_and_truncated_log_lines(
    nodes: tuple[Env, Env, list[Mount]],
) -> None:
    a, _b, mounts = nodes
    mnt = serving_x(nodes)
    for log in (a.store / "log").glob("*.jsonl"):
        with open(log, "ab") as f:  # what a broken writer or a disk can leave
            f.write(b'42\n\xff\xfe not json\n{"event": "bound", "host": 7}\n{"event": "bou')
    a.run("build", "wf/x", "extra-b==2.0", "--python", PY)
    took = wait_for(imports(mnt, "wf/x", "extra_b"), 5, "node b serving the rebind")
    assert took < 5 and not imports(mnt, "wf/x", "extra_a")()
    assert mounts[0].proc.poll() is None  # the daemon lives on
    assert "skipped" in mounts[0].log()


def test_a_bind_whose_writer_died_before_logging_is_seen(
    nodes: tuple[Env, Env, list[Mount]],
) -> None:
    a, b, _mounts = nodes
    mnt = serving_x(nodes)
    other = a.show("wf/other")["snapshot_id"]

    def revision(number: int) -> Revision:  # as `bind` writes it, then dies before its log line
        return Revision(
            workflow="wf",
            node="x",
            revision=number,
            snapshot_id=other,
            time=0.0,
            host="a",
            user="u",
        )

    # `bind` logs its intent first, then writes the revision, then dies before its line
    store = Store(a.store)
    store.audit("binding_intent", "node-a", other, workflow="wf", node="x")
    store.append_revision(revision)
    wait_for(imports(mnt, "wf/x", "extra_b"), 6, "node b serving an unlogged bind")
    assert b.show("wf/x")["revision"] == 2


def test_a_binding_no_log_tells_of_is_found_by_the_sweep(
    nodes: tuple[Env, Env, list[Mount]],
) -> None:
    a, b, mounts = nodes
    b.vars["ENVFS_SWEEP_RATE"] = "100"  # the sweep at full speed (default: 0.2 requests/s)
    mnt = serving_x(nodes)
    other = a.show("wf/other")["snapshot_id"]
    revision = Revision(
        workflow="wf", node="x", revision=2, snapshot_id=other, time=0.0, host="a", user="u"
    )
    # no intent, no line: a binding whose log was lost (say, rotated away)
    Store(a.store).append_revision(lambda number: revision.model_copy(update={"revision": number}))
    wait_for(imports(mnt, "wf/x", "extra_b"), 10, "node b's sweep finding an unlogged bind")
    assert "binding wf/x changed" in mounts[0].log()
    # a workflow removed behind the logs' back goes too
    subprocess.run(["rm", "-rf", str(a.store / "bindings" / "wf")], check=True)
    wait_for(lambda: not (mnt / "wf" / "x").exists(), 10, "node b's sweep dropping wf/x")


def test_index_refresh_tells_every_node_what_the_logs_missed(
    nodes: tuple[Env, Env, list[Mount]],
) -> None:
    a, b, _mounts = nodes
    mnt = serving_x(nodes)  # node b: the default sweep, far too slow to matter here
    other = a.show("wf/other")["snapshot_id"]
    revision = Revision(
        workflow="wf", node="x", revision=2, snapshot_id=other, time=0.0, host="a", user="u"
    )
    Store(a.store).append_revision(lambda number: revision.model_copy(update={"revision": number}))
    time.sleep(3)
    assert imports(mnt, "wf/x", "extra_a")()  # nothing told node b yet
    out = a.run("index", "refresh").stdout
    assert "caught up wf/x" in out and "1 binding(s) were behind" in out
    wait_for(imports(mnt, "wf/x", "extra_b"), 5, "node b after `envfs index refresh` on a")
    assert b.show("wf/x")["revision"] == 2


def test_a_fresh_node_starts_from_the_checkpoint_and_the_logs_after_it(
    nodes: tuple[Env, Env, list[Mount]],
) -> None:
    a, b, mounts = nodes
    a.run("build", "wf/x", "extra-a==1.0", "--python", PY)
    info = json.loads(a.run("index", "checkpoint", "--json").stdout)
    assert info["bindings"] == 1 and info["host"] == "node-a"
    a.run("build", "wf/y", "extra-b==2.0", "--python", PY)  # after it: only in the logs
    mnt = b.root / "mnt"
    mounts.append(Mount(b, mnt))
    assert "index seeded from checkpoint" in mounts[0].log()
    assert imports(mnt, "wf/x", "extra_a")() and imports(mnt, "wf/y", "extra_b")()
    # a damaged checkpoint: said, and the logs read instead
    data = a.store / "checkpoint" / info["file"]
    damaged = bytearray(data.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    data.write_bytes(bytes(damaged))
    b.vars["ENVFS_INDEX"] = str(b.root / "another-index")
    listed = b.run("ls", "--json")
    assert {e["workflow"] + "/" + e["node"] for e in json.loads(listed.stdout)} == {"wf/x", "wf/y"}
    assert "is damaged" in listed.stderr and "ignored" in listed.stderr
    verified = a.run("verify", check=False)  # and named by verify
    assert verified.returncode == 5 and info["file"] in verified.stdout, verified.stdout


def test_logs_replaced_while_a_daemon_was_down(nodes: tuple[Env, Env, list[Mount]]) -> None:
    a, b, mounts = nodes
    a.run("build", "wf/x", "extra-a==1.0", "--python", PY)
    mnt = b.root / "mnt"
    first = Mount(b, mnt)
    mounts.append(first)
    assert imports(mnt, "wf/x", "extra_a")()
    first.stop()
    a.run("build", "wf/x", "extra-b==2.0", "--python", PY)
    for log in (a.store / "log").glob("*.jsonl"):  # rotated: new, shorter files
        log.rename(log.with_suffix(".old"))
        log.write_text('{"event": "rotated", "host": "ops", "time": 0}\n')
    mounts.append(Mount(b, mnt))
    wait_for(imports(mnt, "wf/x", "extra_b"), 5, "node b serving after a restart")


def test_show_agrees_with_history_after_parallel_binds(local: Env) -> None:
    local.run("build", "wf/seed-a", "extra-a==1.0", "--python", PY)
    local.run("build", "wf/seed-b", "extra-b==2.0", "--python", PY)
    specs = [("extra-a==1.0",), ("extra-b==2.0",)]
    procs = [
        local.popen("bind", "wf/p", *specs[i % 2], "--python", PY, "--reason", str(i))
        for i in range(8)
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    history = json.loads(local.run("history", "wf/p", "--json").stdout)
    shown = local.show("wf/p")
    assert shown["revision"] == history[-1]["revision"]
    assert shown["snapshot_id"] == history[-1]["snapshot_id"]
    listed = json.loads(local.run("ls", "--json").stdout)
    (p,) = [e for e in listed if e["node"] == "p"]
    assert p["revision"] == history[-1]["revision"]


def test_one_unreadable_binding_does_not_stop_the_others(
    nodes: tuple[Env, Env, list[Mount]],
) -> None:
    a, _b, mounts = nodes
    a.run("build", "wf/broken", "extra-a==1.0", "--python", PY)
    mnt = serving_x(nodes)
    revision = a.store / "bindings/wf/broken/1.json"
    os.chmod(revision, 0o644)
    revision.write_text("{ not a revision")
    a.run("build", "wf/broken", "extra-b==2.0", "--python", PY, check=False)
    a.run("build", "wf/x", "extra-b==2.0", "--python", PY)
    wait_for(imports(mnt, "wf/x", "extra_b"), 5, "node b serving wf/x next to a broken binding")
    assert "cannot read binding wf/broken" in mounts[0].log()


def test_four_skewed_nodes_times_eight_first_accesses_build_once(
    tmp_path: Path, wheelhouse: Path
) -> None:
    """Node clocks hours apart must not matter: leases are judged by the store's clock."""
    offsets = [-3600, 0, 1800, 7200]
    envs = [make_env(tmp_path / f"n{i}", wheelhouse, host=f"node-{i}") for i in range(4)]
    for env, offset in zip(envs, offsets, strict=True):
        env.vars["ENVFS_STORE"] = envs[0].vars["ENVFS_STORE"]
        env.store = envs[0].store
        env.vars["XDG_RUNTIME_DIR"] = str(env.root / "run")
        env.vars["ENVFS_CLOCK_OFFSET"] = str(offset)
    envs[0].run("bind", "wf/lazy", "slow-pkg==1.0", "--python", PY)
    sid = envs[0].show("wf/lazy")["snapshot_id"]
    mounts = [Mount(env, env.root / "mnt") for env in envs]
    try:
        procs = [
            subprocess.Popen(
                [m.path / "wf/lazy/bin/python", "-c", "import slow_pkg"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            for m in mounts
            for _ in range(8)
        ]
        for p in procs:
            _, err = p.communicate(timeout=300)
            assert p.returncode == 0, err.decode()
    finally:
        for m in reversed(mounts):
            m.stop()
    for m in mounts:
        m.check_clean_exit()
    assert envs[0].built_events(sid) == 1
    assert "lease_broken" not in [e["event"] for e in envs[0].audit()]
