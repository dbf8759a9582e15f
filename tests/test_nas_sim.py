"""scripts/nas_sim.py: the slow, uncached FUSE passthrough standing in for an NFS export."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.fuse

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "nas_sim.py"
READY_TIMEOUT = 15.0


def is_mounted(mountpoint: Path) -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == str(mountpoint) for line in f)


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


class NasSim:
    """A running ``nas_sim.py BACKING MOUNTPOINT ...``; `cleanup` always stops and unmounts."""

    def __init__(self, backing: Path, mountpoint: Path, *args: str) -> None:
        self.backing = backing
        self.mountpoint = mountpoint
        self.stderr_path = mountpoint.parent / f"nas-sim-{time.monotonic_ns()}.err"
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(SCRIPT), str(backing), str(mountpoint), *args],
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
            )
        self._wait_ready()

    def _wait_ready(self) -> None:
        assert self.proc.stdout is not None
        readable, _, _ = select.select([self.proc.stdout], [], [], READY_TIMEOUT)
        line = self.proc.stdout.readline() if readable else ""
        if line.strip() != "ready" or not is_mounted(self.mountpoint):
            self.cleanup()
            raise AssertionError(f"nas-sim did not get ready ({line!r}):\n{self.stderr()}")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def signal(self, signum: signal.Signals) -> None:
        self.proc.send_signal(signum)

    def json_lines(self) -> list[str]:
        return [line for line in self.stderr().splitlines() if line.startswith("{")]

    def counts(self) -> dict[str, int]:
        """Ask for the counts (SIGUSR2) and return the JSON line that answers."""
        before = len(self.json_lines())
        self.signal(signal.SIGUSR2)
        assert wait_for(lambda: len(self.json_lines()) > before), self.stderr()
        counts: dict[str, int] = json.loads(self.json_lines()[-1])
        return counts

    def stop(self) -> None:
        """SIGTERM: must unmount and exit 0 without a traceback."""
        self.signal(signal.SIGTERM)
        assert self.proc.wait(timeout=15) == 0, self.stderr()
        assert not is_mounted(self.mountpoint)
        assert "Traceback" not in self.stderr(), self.stderr()

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        if is_mounted(self.mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)], check=False)


@pytest.fixture
def start_nas(tmp_path: Path) -> Iterator[Callable[..., NasSim]]:
    """Start nas-sim over ``tmp_path/backing`` at ``tmp_path/mnt`` with extra arguments."""
    started: list[NasSim] = []

    def start(*args: str) -> NasSim:
        backing, mountpoint = tmp_path / "backing", tmp_path / "mnt"
        backing.mkdir(exist_ok=True)
        mountpoint.mkdir(exist_ok=True)
        started.append(NasSim(backing, mountpoint, *args))
        return started[-1]

    yield start
    for sim in started:
        sim.cleanup()


@pytest.mark.timeout(60)
def test_files_pass_through(start_nas: Callable[..., NasSim]) -> None:
    sim = start_nas()
    mnt, back = sim.mountpoint, sim.backing
    (mnt / "a.txt").write_text("hello\n")
    assert (back / "a.txt").read_text() == "hello\n"
    assert (mnt / "a.txt").read_text() == "hello\n"

    (mnt / "d").mkdir()
    os.rename(mnt / "a.txt", mnt / "d" / "b.txt")
    assert not (back / "a.txt").exists()
    assert (back / "d" / "b.txt").read_text() == "hello\n"

    os.link(mnt / "d" / "b.txt", mnt / "c.txt")
    one, two = os.stat(mnt / "d" / "b.txt"), os.stat(mnt / "c.txt")
    assert one.st_ino == two.st_ino == (back / "c.txt").stat().st_ino
    assert one.st_nlink == two.st_nlink == 2

    # a directory renamed with a file open in it: the open file and new names keep working
    with open(mnt / "d" / "b.txt", "a") as f:
        os.rename(mnt / "d", mnt / "e")
        f.write("more\n")
        f.flush()
        assert os.fstat(f.fileno()).st_size == 11
    assert (back / "e" / "b.txt").read_text() == "hello\nmore\n"
    os.link(mnt / "e" / "b.txt", mnt / "e" / "third")
    assert os.stat(mnt / "c.txt").st_nlink == 3

    # os.replace over an existing target, O_EXCL, utime, chmod, truncate, symlinks, flock
    (mnt / "new").write_text("new\n")
    os.replace(mnt / "new", mnt / "c.txt")
    assert (back / "c.txt").read_text() == "new\n"
    assert os.stat(mnt / "e" / "b.txt").st_nlink == 2
    with pytest.raises(FileExistsError):
        os.open(mnt / "c.txt", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    os.utime(mnt / "c.txt", ns=(1_000_000_000, 2_000_000_000))
    assert (back / "c.txt").stat().st_mtime_ns == 2_000_000_000
    os.chmod(mnt / "c.txt", 0o444)
    assert (back / "c.txt").stat().st_mode & 0o777 == 0o444
    os.truncate(mnt / "c.txt", 2)
    assert (back / "c.txt").read_text() == "ne"
    os.symlink("e/b.txt", mnt / "link")
    assert os.readlink(mnt / "link") == "e/b.txt"
    assert (mnt / "link").read_text() == "hello\nmore\n"
    assert os.readlink(back / "link") == "e/b.txt"
    with open(mnt / "lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)

    # an unlinked file stays usable through its open descriptor
    with open(mnt / "tmp", "w+") as f:
        os.unlink(mnt / "tmp")
        f.write("gone")
        f.flush()
        assert os.fstat(f.fileno()).st_size == 4
        f.seek(0)
        assert f.read() == "gone"

    os.unlink(mnt / "e" / "third")
    (mnt / "empty").mkdir()
    os.rmdir(mnt / "empty")
    assert sorted(os.listdir(mnt)) == sorted(os.listdir(back))
    assert sorted(os.listdir(mnt)) == ["c.txt", "e", "link", "lock"]
    sim.stop()


RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2


def renameat2(old: Path, new: Path, flags: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.renameat2(-100, bytes(old), -100, bytes(new), ctypes.c_uint(flags)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@pytest.mark.timeout(60)
def test_rename_flags(start_nas: Callable[..., NasSim]) -> None:
    sim = start_nas()
    mnt, back = sim.mountpoint, sim.backing
    (mnt / "a").write_text("A")
    (mnt / "d").mkdir()
    (mnt / "d" / "inside").write_text("in d")
    with pytest.raises(FileExistsError):
        renameat2(mnt / "a", mnt / "d", RENAME_NOREPLACE)
    renameat2(mnt / "a", mnt / "b", RENAME_NOREPLACE)
    assert (back / "b").read_text() == "A"
    renameat2(mnt / "b", mnt / "d", RENAME_EXCHANGE)  # a file and a directory swap names
    assert (mnt / "b" / "inside").read_text() == "in d"
    assert (mnt / "d").read_text() == "A"
    assert (back / "b" / "inside").read_text() == "in d"
    assert os.stat(mnt / "d").st_ino == (back / "d").stat().st_ino
    sim.stop()


@pytest.mark.timeout(60)
def test_outage_and_counts(start_nas: Callable[..., NasSim], tmp_path: Path) -> None:
    counts_file = tmp_path / "counts.json"
    sim = start_nas("--counts", str(counts_file))
    (sim.backing / "f").write_text("x")
    os.stat(sim.mountpoint / "f")

    def stat_errno() -> int:
        try:
            os.stat(sim.mountpoint / "f")
        except OSError as e:
            return e.errno or -1
        return 0

    sim.signal(signal.SIGUSR1)
    assert wait_for(lambda: stat_errno() == errno.EIO), sim.stderr()
    assert "outage on" in sim.stderr()
    sim.signal(signal.SIGUSR1)
    assert wait_for(lambda: stat_errno() == 0), sim.stderr()
    assert "outage off" in sim.stderr()

    (sim.mountpoint / "data").write_bytes(b"x" * 5000)
    assert (sim.mountpoint / "data").read_bytes() == b"x" * 5000
    counts = sim.counts()
    assert counts["lookup"] > 0
    assert counts["getattr"] > 0
    assert counts["read_bytes"] >= 5000 and counts["write_bytes"] >= 5000
    assert json.loads(counts_file.read_text()) == counts
    sim.stop()
    final = json.loads(counts_file.read_text())
    assert final["lookup"] >= counts["lookup"]


@pytest.mark.timeout(60)
def test_latency_every_stat_is_a_round_trip(start_nas: Callable[..., NasSim]) -> None:
    sim = start_nas("--latency-ms", "50")
    (sim.backing / "f").write_text("x")
    os.stat(sim.mountpoint / "f")
    t0 = time.monotonic()
    for _ in range(10):
        os.stat(sim.mountpoint / "f")
    assert time.monotonic() - t0 >= 0.4
    sim.stop()


@pytest.mark.timeout(120)
def test_tree_copy_hardlink_chmod_rename(start_nas: Callable[..., NasSim]) -> None:
    """What a store does: copy a tree in, hardlink it elsewhere, freeze it, rename it."""
    sim = start_nas()
    mnt, back = sim.mountpoint, sim.backing
    src = Path(json.__file__).parent
    shutil.copytree(src, mnt / "tmp-tree")
    files = sorted(p.relative_to(mnt / "tmp-tree") for p in (mnt / "tmp-tree").rglob("*"))
    files = [rel for rel in files if (mnt / "tmp-tree" / rel).is_file()]
    assert {str(rel) for rel in files} >= {"__init__.py", "decoder.py", "encoder.py"}
    for rel in files:
        (mnt / "links" / rel).parent.mkdir(parents=True, exist_ok=True)
        os.link(mnt / "tmp-tree" / rel, mnt / "links" / rel)
    for dirpath, _dirnames, filenames in os.walk(mnt / "tmp-tree", topdown=False):
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o444)
        os.chmod(dirpath, 0o555)
    (mnt / "tree").mkdir()
    os.replace(mnt / "tmp-tree", mnt / "tree")  # atomically, over an empty directory

    assert not (back / "tmp-tree").exists()
    for rel in files:
        content = (src / rel).read_bytes()
        assert (mnt / "tree" / rel).read_bytes() == content
        assert (back / "tree" / rel).read_bytes() == content
        assert (mnt / "links" / rel).read_bytes() == content
        st, linked = os.stat(mnt / "tree" / rel), os.stat(mnt / "links" / rel)
        assert st.st_ino == linked.st_ino == (back / "links" / rel).stat().st_ino
        assert st.st_nlink == 2
        assert st.st_mode & 0o777 == 0o444
    assert (back / "tree").stat().st_mode & 0o777 == 0o555
    sim.stop()
    for dirpath, _dirnames, _filenames in os.walk(back / "tree"):
        os.chmod(dirpath, 0o755)  # let tmp_path go


@pytest.mark.timeout(120)
def test_concurrent_writers(start_nas: Callable[..., NasSim]) -> None:
    sim = start_nas()
    mnt = sim.mountpoint
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        try:
            d = mnt / f"w{n}"
            d.mkdir()
            for i in range(60):
                tmp = d / f".{i}.tmp"
                tmp.write_bytes(f"{n}:{i}\n".encode() * 100)
                os.replace(tmp, d / f"{i}")
            os.rename(d, mnt / f"done{n}")
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    assert not errors, errors
    for n in range(8):
        names = sorted(os.listdir(sim.backing / f"done{n}"), key=int)
        assert names == [str(i) for i in range(60)]
        assert (mnt / f"done{n}" / "7").read_bytes() == f"{n}:7\n".encode() * 100
    sim.stop()
