"""The filesystem through the real kernel: a daemon subprocess over a JSON fake catalog."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from envfs.core.errors import EnvironmentProblem
from envfs.fs import nowait
from envfs.fs.mount import run_daemon
from envfs.fs.mounted import is_stale_mount, unmount
from tests.fusehelpers import (
    REPO,
    DaemonProcess,
    JsonCatalog,
    force_unmount,
    is_mounted,
    make_snapshot,
    make_venv,
    stat_errno,
    write_state,
)

pytestmark = [
    pytest.mark.fuse,
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse"),
]

ID_A = "a" * 64
ID_B = "b" * 64
ID_LAZY = "c" * 64
ID_FAIL = "f" * 64
ID_LATER = "d" * 64


class World:
    """A store with snapshots, a state file, and one daemon mounted over them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.store = root / "store"
        base = make_venv(root / "base-venv")
        self.snap_a = make_snapshot(self.store, ID_A, base, "A")
        self.snap_b = make_snapshot(self.store, ID_B, base, "B")
        self.snap_lazy = make_snapshot(self.store, ID_LAZY, base, "LAZY")
        self.snap_fail = make_snapshot(self.store, ID_FAIL, base, "FAIL")
        self.snap_later = make_snapshot(self.store, ID_LATER, base, "LATER")
        self.mnt = root / "mnt"
        self.mnt.mkdir()
        self.state_path = root / "state.json"
        self.log_path = root / "calls.log"
        self.log_path.write_text("")
        self.status_path = root / "status.json"
        self.state: dict[str, Any] = {
            "bindings": {
                "etl": {"prep": [ID_A, ID_B], "train": [ID_A], "flip": [ID_A]},
                "ml": {"lazy": [ID_LAZY], "lazy2": [ID_LAZY], "broken": [ID_FAIL], "ready": [ID_A]},
            },
            "store_bindings": {"etl": {"late": [ID_B]}},
            "snapshots": {ID_A: str(self.snap_a), ID_B: str(self.snap_b)},
            "buildable": {
                ID_LAZY: {"dir": str(self.snap_lazy), "sleep": 2.0},
                ID_FAIL: {"dir": str(self.snap_fail), "sleep": 0.2, "fail": 1},
                ID_LATER: {"dir": str(self.snap_later), "sleep": 0.0},
            },
            "log": str(self.log_path),
        }
        self.save()

    def save(self) -> None:
        write_state(self.state_path, self.state)

    def calls(self, prefix: str) -> list[str]:
        return [line for line in self.log_path.read_text().splitlines() if line.startswith(prefix)]

    def start(self) -> DaemonProcess:
        daemon = DaemonProcess(self.state_path, self.mnt, self.status_path)
        try:
            daemon.wait_mounted()
        except BaseException:
            daemon.stop()
            raise
        return daemon

    def status(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.status_path.read_text())
        return data


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    yield from _fresh_world()


@pytest.fixture(scope="module")
def mounted(world: World) -> Iterator[World]:
    daemon = world.start()
    try:
        yield world
    finally:
        daemon.stop()
        assert not is_mounted(world.mnt)


def wait_until(predicate: Callable[[], bool], timeout: float, step: float = 0.02) -> float:
    """Seconds until ``predicate()`` held; fails after ``timeout``."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(step)
    return time.monotonic() - start


def errno_of(action: Callable[[], object]) -> int:
    try:
        action()
    except OSError as e:
        return e.errno or 0
    return 0


# -- namespace ------------------------------------------------------------------------------


def test_root_lists_workflows_and_workflow_lists_nodes(mounted: World) -> None:
    assert sorted(os.listdir(mounted.mnt)) == [".snapshots", "etl", "ml"]
    assert sorted(os.listdir(mounted.mnt / "etl")) == ["flip", "prep", "train"]
    assert os.path.isdir(mounted.mnt / "etl" / "prep")
    assert not os.path.islink(mounted.mnt / "etl" / "prep")


def test_snapshot_contents_are_served_and_metadata_is_hidden(mounted: World) -> None:
    env = mounted.mnt / "etl" / "train"
    expected = sorted(n for n in os.listdir(mounted.snap_a) if n != ".envfs")
    assert sorted(os.listdir(env)) == expected
    assert (env / "marker.txt").read_text() == "A\n"
    assert errno_of(lambda: os.stat(env / ".envfs")) == errno.ENOENT
    assert errno_of(lambda: os.stat(env / ".envfs" / "manifest.json")) == errno.ENOENT
    assert errno_of(lambda: os.stat(env / "no-such-file")) == errno.ENOENT


def test_symlinks_are_served_with_their_target_unchanged(mounted: World) -> None:
    env = mounted.mnt / "etl" / "train"
    assert os.readlink(env / "bin" / "python") == os.readlink(mounted.snap_a / "bin" / "python")
    assert os.readlink(env / "bin" / "python3") == os.readlink(mounted.snap_a / "bin" / "python3")


def test_python_from_the_mount_is_a_working_venv(mounted: World) -> None:
    env = mounted.mnt / "etl" / "train"
    code = (
        "import sys, subprocess, shared_mod\n"
        "print(sys.prefix)\n"
        "print(shared_mod.__file__)\n"
        "print(subprocess.run([sys.executable, '-c', 'import sys, shared_mod; print(sys.prefix)'],"
        " capture_output=True, text=True, check=True).stdout.strip())\n"
    )
    out = subprocess.run(
        [str(env / "bin" / "python"), "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.splitlines()
    assert out[0] == str(env)
    assert out[1].startswith(str(env / "lib"))
    assert out[2] == str(env)
    script = subprocess.run(
        [str(env / "bin" / "envfs-probe")], capture_output=True, text=True, timeout=60, check=True
    )
    assert script.stdout.strip() == f"hello from shared_mod {env}"


def test_hardlinked_files_are_one_inode_across_envs(mounted: World) -> None:
    a = mounted.mnt / "etl" / "train"
    b = mounted.mnt / "etl" / "prep"
    site_a = next(a.glob("lib/python*/site-packages"))
    site_b = next(b.glob("lib/python*/site-packages"))
    assert os.stat(site_a / "shared_mod.py").st_ino == os.stat(site_b / "shared_mod.py").st_ino
    assert os.stat(site_a).st_ino != os.stat(site_b).st_ino  # directories: one inode per view
    assert os.stat(a / "marker.txt").st_ino != os.stat(b / "marker.txt").st_ino


MUTATIONS: dict[str, Callable[[Path], object]] = {
    "open-write": lambda env: os.open(env / "marker.txt", os.O_WRONLY),
    "open-rdwr": lambda env: os.open(env / "marker.txt", os.O_RDWR),
    "open-append": lambda env: os.open(env / "marker.txt", os.O_WRONLY | os.O_APPEND),
    "open-trunc": lambda env: os.open(env / "marker.txt", os.O_RDONLY | os.O_TRUNC),
    "create": lambda env: os.open(env / "new-file", os.O_WRONLY | os.O_CREAT | os.O_EXCL),
    "mkdir": lambda env: os.mkdir(env / "new-dir"),
    "rmdir": lambda env: os.rmdir(env / "bin"),
    "unlink": lambda env: os.unlink(env / "marker.txt"),
    "rename": lambda env: os.rename(env / "marker.txt", env / "moved.txt"),
    "link": lambda env: os.link(env / "marker.txt", env / "linked.txt"),
    "symlink": lambda env: os.symlink("marker.txt", env / "sym.txt"),
    "chmod": lambda env: os.chmod(env / "marker.txt", 0o777),
    "chown": lambda env: os.chown(env / "marker.txt", 1, 1),
    "truncate": lambda env: os.truncate(env / "marker.txt", 0),
    "utime": lambda env: os.utime(env / "marker.txt", (0, 0)),
    "mknod": lambda env: os.mkfifo(env / "fifo"),
    "setxattr": lambda env: os.setxattr(env / "marker.txt", "user.x", b"1"),
    "removexattr": lambda env: os.removexattr(env, "user.envfs.id"),
    "mkdir-in-root": lambda env: os.mkdir(env.parent.parent / "newwf"),
    "rmdir-binding": lambda env: os.rmdir(env),
}


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_every_mutation_is_read_only_file_system(mounted: World, name: str) -> None:
    env = mounted.mnt / "etl" / "train"
    assert errno_of(lambda: MUTATIONS[name](env)) == errno.EROFS
    assert (env / "marker.txt").read_text() == "A\n"


def test_shell_tools_say_read_only_file_system(mounted: World) -> None:
    env = mounted.mnt / "etl" / "train"
    for cmd in (["touch", str(env / "x")], ["rm", "-f", str(env / "marker.txt")]):
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
        assert result.returncode != 0
        assert "Read-only file system" in result.stderr


def test_pinned_revisions_and_snapshot_ids(mounted: World) -> None:
    etl = mounted.mnt / "etl"
    assert (etl / "prep" / "marker.txt").read_text() == "B\n"
    assert (etl / "prep@1" / "marker.txt").read_text() == "A\n"
    assert (etl / "prep@2" / "marker.txt").read_text() == "B\n"
    assert (mounted.mnt / ".snapshots" / ID_A / "marker.txt").read_text() == "A\n"
    assert "prep@1" not in os.listdir(etl)
    assert errno_of(lambda: os.stat(etl / "prep@9")) == errno.ENOENT
    assert errno_of(lambda: os.stat(etl / "prep@x")) == errno.ENOENT
    assert errno_of(lambda: os.stat(mounted.mnt / ".snapshots" / ("9" * 64))) == errno.ENOENT


def test_view_roots_expose_metadata_as_xattrs(mounted: World) -> None:
    prep = mounted.mnt / "etl" / "prep"
    assert os.getxattr(prep, "user.envfs.id") == ID_B.encode()
    assert os.getxattr(prep, "user.envfs.rev") == b"2"
    assert os.getxattr(prep, "user.envfs.state") == b"ready"
    assert os.getxattr(mounted.mnt / "etl" / "prep@1", "user.envfs.id") == ID_A.encode()
    assert "user.envfs.id" in os.listxattr(prep)
    assert errno_of(lambda: os.getxattr(prep, "user.nope")) == errno.ENODATA


def test_unknown_binding_asks_the_store_once_then_caches_the_answer(mounted: World) -> None:
    missing = mounted.mnt / "etl" / "nosuch"
    for _ in range(3):
        assert errno_of(lambda: os.stat(missing)) == errno.ENOENT
        time.sleep(0.05)
    assert mounted.calls("lookup_store etl/nosuch") == ["lookup_store etl/nosuch"]
    assert errno_of(lambda: os.stat(mounted.mnt / "nowf")) == errno.ENOENT


def test_binding_only_in_the_store_is_found_on_first_access(mounted: World) -> None:
    assert (mounted.mnt / "etl" / "late" / "marker.txt").read_text() == "B\n"


def test_binding_flip_is_visible_within_a_second(mounted: World) -> None:
    marker = mounted.mnt / "etl" / "flip" / "marker.txt"
    assert marker.read_text() == "A\n"
    mounted.state["bindings"]["etl"]["flip"] = [ID_A, ID_B]
    mounted.save()
    elapsed = wait_until(lambda: marker.read_text() == "B\n", timeout=2.0)
    assert elapsed < 1.0
    assert (mounted.mnt / "etl" / "flip@1" / "marker.txt").read_text() == "A\n"


def test_new_binding_appears_after_a_refresh(mounted: World) -> None:
    target = mounted.mnt / "fresh" / "node" / "marker.txt"
    assert errno_of(lambda: os.stat(target)) == errno.ENOENT
    mounted.state["bindings"]["fresh"] = {"node": [ID_LATER]}
    mounted.save()
    wait_until(lambda: target.exists(), timeout=2.0)
    assert target.read_text() == "LATER\n"


@pytest.mark.parametrize("inline_io", ["never", "always"])
def test_cold_reads_in_threads_or_inline_serve_the_stored_bytes(
    world: World, tmp_path: Path, inline_io: str
) -> None:
    """Both ways a read can reach the store (a worker thread for a network store, inline for
    a local one) give exactly the stored bytes, whether the store's page cache has them or not."""
    files = ["big.bin", "marker.txt", "pyvenv.cfg", "bin/envfs-probe"]
    for rel in files:  # evict the store's copies: the daemon must read the device
        with open(world.snap_a / rel, "rb") as f:
            os.fsync(f.fileno())  # dirty pages would stay
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    status = tmp_path / "status.json"
    daemon = DaemonProcess(world.state_path, mnt, status, env={nowait.INLINE_IO_ENV: inline_io})
    try:
        daemon.wait_mounted()
        for rel in files:
            assert (mnt / "etl" / "train" / rel).read_bytes() == (world.snap_a / rel).read_bytes()

        def counters() -> dict[str, int]:
            cache: dict[str, int] = json.loads(status.read_text())["cache"]
            return cache

        wait_until(lambda: counters()["reads_inline"] + counters()["reads_threaded"] > 3, 5.0)
        if inline_io == "always":
            assert counters()["reads_threaded"] == 0
        else:
            assert counters()["reads_threaded"] > 0
    finally:
        daemon.stop()
    assert not is_mounted(mnt)


def test_first_access_builds_once_while_other_envs_keep_answering(mounted: World) -> None:
    ml = mounted.mnt / "ml"
    # three names for one snapshot: the kernel sends three lookups, the daemon builds once
    markers = [ml / name / "marker.txt" for name in ("lazy", "lazy@1", "lazy2")]
    results: list[str] = []
    errors: list[BaseException] = []

    def reader(marker: Path) -> None:
        try:
            results.append(marker.read_text())
        except OSError as e:
            errors.append(e)

    threads = [threading.Thread(target=reader, args=(markers[i % 3],)) for i in range(16)]
    start = time.monotonic()
    for t in threads:
        t.start()
    time.sleep(0.3)  # the build (2 s) is running now
    assert os.getxattr(ml / "lazy", "user.envfs.state") == b"building"
    latencies = []
    t0 = time.monotonic()
    os.stat(ml / "ready" / "bin" / "python")  # a sibling in the same workflow, first access
    latencies.append(time.monotonic() - t0)
    for _ in range(5):
        t0 = time.monotonic()
        os.listdir(mounted.mnt / ".snapshots" / ID_B / "lib")  # cold the first time
        os.stat(mounted.mnt / "etl" / "train" / "marker.txt")
        latencies.append(time.monotonic() - t0)
        time.sleep(0.05)
    building = mounted.status()["builds"]["running"]
    for t in threads:
        t.join(timeout=30)
    elapsed = time.monotonic() - start
    assert not errors
    assert results == ["LAZY\n"] * 16
    assert mounted.calls(f"build {ID_LAZY}") == [f"build {ID_LAZY}"]
    assert elapsed >= 2.0
    assert max(latencies) < 0.5
    assert [b["snapshot_id"] for b in building] == [ID_LAZY]


def test_failed_build_gives_a_clear_errno_then_a_later_access_retries(mounted: World) -> None:
    env = mounted.mnt / "ml" / "broken"
    assert os.path.isdir(env)  # the binding exists; its contents need the build
    assert errno_of(lambda: os.listdir(env)) == errno.EIO
    wait_until(lambda: bool(mounted.status()["builds"]["failed"]), timeout=3.0)
    failed = mounted.status()["builds"]["failed"]
    assert [f["snapshot_id"] for f in failed] == [ID_FAIL]
    assert "failed on purpose" in failed[0]["reason"]
    assert os.getxattr(env, "user.envfs.state") == b"failed"
    assert errno_of(lambda: os.stat(env / "bin")) == errno.EIO  # in the back-off: no new build
    assert len(mounted.calls(f"build {ID_FAIL}")) == 1
    time.sleep(1.1)  # the test daemon retries after 1 s
    assert (env / "marker.txt").read_text() == "FAIL\n"
    assert len(mounted.calls(f"build {ID_FAIL}")) == 2
    wait_until(lambda: not mounted.status()["builds"]["failed"], timeout=3.0)


def test_status_file_reports_the_mount(mounted: World) -> None:
    os.stat(mounted.mnt / "etl" / "train" / "bin")

    def has_train() -> bool:
        return any(e["path"] == "etl/train" for e in mounted.status()["envs"])

    wait_until(has_train, timeout=3.0)
    status = mounted.status()
    assert status["mountpoint"] == str(mounted.mnt)
    assert status["cache"]["inodes"] > 2
    assert status["cache"]["lookups"] >= status["cache"]["hits"] > 0


def test_statfs_works(mounted: World) -> None:
    st = os.statvfs(mounted.mnt)
    assert st.f_namemax == 255


# -- lifecycle ------------------------------------------------------------------------------


def _fresh_world() -> Iterator[World]:
    with tempfile.TemporaryDirectory(prefix="envfs-life-", dir="/tmp") as tmp:
        world = World(Path(tmp))
        try:
            yield world
        finally:
            force_unmount(world.mnt)


@pytest.fixture()
def fresh() -> Iterator[World]:
    yield from _fresh_world()


def test_sigterm_unmounts_and_exits_zero(fresh: World) -> None:
    daemon = fresh.start()
    try:
        assert (fresh.mnt / "etl" / "train" / "marker.txt").read_text() == "A\n"
        wait_until(fresh.status_path.exists, timeout=3.0)
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(timeout=10) == 0
        assert not is_mounted(fresh.mnt)
        assert not fresh.status_path.exists()
        assert "unmounted" in daemon.log()
    finally:
        daemon.stop()


def test_sigkill_gives_enotconn_and_a_new_daemon_recovers(fresh: World) -> None:
    daemon = fresh.start()
    try:
        os.stat(fresh.mnt / "etl" / "train")
        daemon.proc.kill()
        daemon.proc.wait(timeout=10)
        # what the kernel cached stays visible; anything it must ask the daemon: ENOTCONN
        assert stat_errno(fresh.mnt / "etl" / "never-seen", timeout=5) == errno.ENOTCONN
        assert stat_errno(fresh.mnt / "other", timeout=5) == errno.ENOTCONN
        assert is_stale_mount(fresh.mnt)
        second = fresh.start()  # must clean the stale mount itself
        try:
            assert "stale mount" in second.log()
            assert (fresh.mnt / "etl" / "train" / "marker.txt").read_text() == "A\n"
        finally:
            second.stop()
    finally:
        daemon.stop()


@pytest.mark.slow
def test_daemon_stays_small_after_serving_a_hundred_envs(fresh: World) -> None:
    base = fresh.root / "base-venv"
    nodes = {}
    for i in range(100):
        snapshot_id = f"{i:064x}"
        fresh.state["snapshots"][snapshot_id] = str(
            make_snapshot(fresh.store, snapshot_id, base, f"env {i}")
        )
        nodes[f"n{i:03d}"] = [snapshot_id]
    fresh.state["bindings"]["many"] = nodes
    fresh.save()
    daemon = fresh.start()
    try:
        code = "import sys, json, shared_mod; print(sys.prefix)"
        for node in nodes:
            env = fresh.mnt / "many" / node
            out = subprocess.run(
                [str(env / "bin" / "python"), "-c", code],
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
            )
            assert out.stdout.strip() == str(env)
            for _ in os.walk(env):  # listings with attributes (READDIRPLUS) of every directory
                pass
        wait_until(lambda: fresh.status()["cache"]["views"] >= 100, timeout=3.0)
        rss_kb = next(
            int(line.split()[1])
            for line in Path(f"/proc/{daemon.proc.pid}/status").read_text().splitlines()
            if line.startswith("VmRSS:")
        )
        print(f"daemon RSS after 100 envs: {rss_kb} kB")
        assert rss_kb < 150 * 1024, f"daemon RSS {rss_kb} kB"
    finally:
        daemon.stop()


def test_detached_daemon_returns_once_mounted_and_stops_on_sigterm(fresh: World) -> None:
    runner = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.fusehelpers",
            str(fresh.state_path),
            str(fresh.mnt),
            "--status",
            str(fresh.status_path),
            "--detach",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert runner.returncode == 0, runner.stderr
    assert is_mounted(fresh.mnt)
    assert (fresh.mnt / "etl" / "train" / "marker.txt").read_text() == "A\n"
    wait_until(fresh.status_path.exists, timeout=3.0)
    pid = fresh.status()["pid"]
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not is_mounted(fresh.mnt), timeout=10.0)
    wait_until(lambda: process_gone(pid), timeout=10.0)


def process_gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state == "Z"


def test_mounting_over_a_live_mount_is_refused(fresh: World) -> None:
    daemon = fresh.start()
    try:
        with pytest.raises(EnvironmentProblem, match="already a mount point"):
            run_daemon(
                JsonCatalog(fresh.state_path),
                fresh.mnt,
                allow_other=False,
                foreground=True,
                status_path=None,
            )
        assert not is_stale_mount(fresh.mnt)
    finally:
        daemon.stop()
    assert not is_stale_mount(fresh.mnt)  # a plain directory again


def test_unmount_helper_removes_a_stale_mount(fresh: World) -> None:
    daemon = fresh.start()
    try:
        daemon.proc.kill()
        daemon.proc.wait(timeout=10)
        assert is_mounted(fresh.mnt)
        unmount(fresh.mnt)
        assert not is_mounted(fresh.mnt)
        assert not is_stale_mount(fresh.mnt)
    finally:
        daemon.stop()
