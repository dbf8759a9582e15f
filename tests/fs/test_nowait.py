"""The daemon's no-wait I/O helpers and its backing-descriptor cache, on real files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from envfs.fs.fuse_ops import _Descriptors
from envfs.fs.nowait import open_cached, read_cached


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "data.bin"
    path.write_bytes(os.urandom(256 * 1024))
    return path


def test_open_cached_opens_what_the_dentry_cache_knows(data: Path) -> None:
    data.stat()  # in the dentry cache now
    fd = open_cached(os.fsencode(data))
    assert fd is not None
    try:
        assert os.fstat(fd).st_ino == data.stat().st_ino
        assert os.read(fd, 4) == data.read_bytes()[:4]
    finally:
        os.close(fd)


def test_open_cached_says_not_now_for_what_it_cannot_open(tmp_path: Path, data: Path) -> None:
    assert open_cached(os.fsencode(tmp_path / "nope")) is None
    assert open_cached(os.fsencode(data) + b"/below") is None


def test_read_cached_reads_cached_pages_and_declines_evicted_ones(data: Path) -> None:
    content = data.read_bytes()  # in the page cache now
    fd = os.open(data, os.O_RDONLY)
    try:
        assert read_cached(fd, 4096, 8192) == content[4096 : 4096 + 8192]
        assert read_cached(fd, len(content) - 100, 4096) == content[-100:]  # short at EOF
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # evict this file's pages
        assert read_cached(fd, 0, 8192) is None
        assert os.pread(fd, 8192, 0) == content[:8192]  # the blocking read still works
    finally:
        os.close(fd)


def test_descriptor_cache_keeps_busy_ones_and_closes_the_least_recent(tmp_path: Path) -> None:
    fds = _Descriptors(limit=2)
    opened = {}
    for ino in (1, 2):
        opened[ino] = os.open(tmp_path, os.O_RDONLY)
        fds.add(ino, opened[ino])
    assert fds.acquire(1) == opened[1]  # 1 is busy and now the most recent
    opened[3] = os.open(tmp_path, os.O_RDONLY)
    fds.add(3, opened[3])
    assert len(fds) == 2 and fds.acquire(2) is None  # 2 was closed
    with pytest.raises(OSError):
        os.fstat(opened[2])
    opened[4] = os.open(tmp_path, os.O_RDONLY)
    fds.add(4, opened[4])  # over the limit: 3 goes, busy 1 stays
    assert fds.acquire(1) == opened[1] and fds.acquire(3) is None
    fds.release(1)
    fds.release(1)
    dup = os.open(tmp_path, os.O_RDONLY)
    assert fds.add(4, dup) == opened[4]  # a racing second open is closed, the first kept
    with pytest.raises(OSError):
        os.fstat(dup)
    fds.close_all()
    with pytest.raises(OSError):
        os.fstat(opened[1])
