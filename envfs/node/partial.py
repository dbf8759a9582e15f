"""A big file on its way into the node cache, served by the part while it comes
(`envfs.node.cache.NodeCache.read_range`).

A fresh node's job reads parts of big files (a shared library is mapped, and only the
pages it touches are read: `import torch` reads 749 MB of the 3.2 GB of libraries it
maps). Copying such a file whole before its first read is served makes the job wait for
bytes it never reads. A `PartialCopy` is the file being copied, sparse, in `PIECE`-sized
pieces: a read waits only for the `CHUNK`-sized block(s) it lies in (each piece fetched
once, by whoever asks first, a run of them in one large read), a prefetch fetches the
pieces a traced import touched, a whole copy (the background fill) the rest, and once
every piece is there the file is checked against its sha256 and becomes the object, as a
whole copy does. Until then its bytes are the store's,
unchecked, as a read served from the store is.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from envfs.core.errors import EnvironmentProblem
from envfs.node.copying import read_straight

#: What a read of a part not here fetches around it: one large read of the store (the
#: 4 MB-aligned block(s) it lies in), as a job's reads of a mapped library go on nearby.
CHUNK = 4 << 20
#: What the copy keeps track of: a prefetch of the parts a traced import touched fetches
#: these (`PartialCopy.fetch`), not whole blocks (OpenBLAS: 1.3 of its 22 MB are touched,
#: in 12 such pieces).
PIECE = 256 << 10
#: Threads fetching the pieces of one whole copy at once.
PARTS = 4


class Damaged(EnvironmentProblem):
    """The copy does not match the manifest (or the store's file is short)."""


class PartialCopy:
    """``size`` bytes of a store file (opened by ``opener``, once) copied piece by piece
    into ``path``, which becomes ``target`` once whole and checked."""

    def __init__(
        self, path: Path, target: Path, size: int, sha256: str, mode: int, opener: Callable[[], int]
    ) -> None:
        self.path, self.target, self.size = path, target, size
        self._sha256, self._mode, self._opener = sha256, mode, opener
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        os.ftruncate(self._fd, size)
        self._src: int | None = None
        self._present = bytearray(max(1, -(-size // PIECE)))
        self._missing = len(self._present)
        self._pending: dict[int, threading.Event] = {}  # piece -> its fetch under way
        self._lock = threading.Lock()
        self._finishing = threading.Lock()  # one check of the whole; reads go on meanwhile
        self._readers = 0
        self.done = False  # whole, checked and in place
        self.closed = False

    def read(self, off: int, size: int) -> bytes | None:
        """The bytes at ``off`` (fewer at the end of the file), fetching first those not
        here yet: the `CHUNK` block(s) they lie in if none are (a job reading on into a part
        of a library), their own pieces only if some are (the edge of a prefetched part).
        None once the copy is done (read ``target``)."""
        end = min(off + size, self.size)
        with self._lock:
            if self.done:
                return None
            if self.closed:
                raise Damaged(f"{self.target.name}: copy abandoned")
            if end <= off:
                return b""
            self._readers += 1
        try:
            here = self._here(off, end)
            if here == 0:  # a part not read before: the block(s) around it
                off_block, end_block = off // CHUNK * CHUNK, ((end - 1) // CHUNK + 1) * CHUNK
                for run in self._runs([(off_block, end_block)]):
                    self._get(*run)
            elif here < 1:  # at the edge of a part here (a prefetched one): the rest of it
                for run in self._runs([(off, end)]):
                    self._get(*run)
            return os.pread(self._fd, end - off, off)
        finally:
            with self._lock:
                self._readers -= 1
            self._close_if_unused()

    def read_here(self, off: int, size: int) -> bytes | None:
        """The bytes at ``off`` if every piece they lie in is here (nothing fetched), else
        None (`read` them)."""
        end = min(off + size, self.size)
        with self._lock:
            if self.done or self.closed or end <= off:
                return None
            if not all(self._present[off // PIECE : (end - 1) // PIECE + 1]):
                return None
            self._readers += 1
        try:
            return os.pread(self._fd, end - off, off)
        finally:
            with self._lock:
                self._readers -= 1
            self._close_if_unused()

    def whole(self) -> bool:
        with self._lock:
            return self._missing == 0

    def complete(self) -> Path:
        """Fetch every piece not here yet, then `finish`."""
        self.fetch([(0, self.size)])
        return self.finish()

    def fetch(self, ranges: list[tuple[int, int]]) -> None:
        """Fetch the pieces the byte ranges ``ranges`` (start, end) lie in that are not here
        yet, in runs of up to `CHUNK` (`PARTS` at a time)."""
        with ThreadPoolExecutor(PARTS, thread_name_prefix="cache-piece") as pool:
            list(pool.map(lambda run: self._get(*run), self._runs(ranges)))

    def finish(self) -> Path:
        """Check the whole copy against its sha256 and put it in place (once). The hash is
        taken outside the pieces' lock: reads of the file are not held up by it."""
        with self._finishing:
            with self._lock:
                if self.done:
                    return self.target
                if self.closed:
                    raise Damaged(f"{self.target.name}: copy abandoned")
                assert self._missing == 0
                self._readers += 1  # its descriptor stays open while it is read
            try:
                digest = hashlib.sha256()
                for start in range(0, self.size, 1 << 20):
                    digest.update(os.pread(self._fd, min(1 << 20, self.size - start), start))
            finally:
                with self._lock:
                    self._readers -= 1
            if digest.hexdigest() != self._sha256:
                raise Damaged(f"{self.target.name}: the store's file does not match its manifest")
            with self._lock:
                if self.closed:
                    raise Damaged(f"{self.target.name}: copy abandoned")
                os.fchmod(self._fd, self._mode & ~0o222)
                os.replace(self.path, self.target)
                self.done = True
        self._close_if_unused()
        return self.target

    def abandon(self) -> None:
        """Give the copy up (damaged): its file goes once no read is using it."""
        with self._lock:
            self.closed = True
        self._close_if_unused()

    def _here(self, off: int, end: int) -> float:
        """The share of the pieces bytes ``off`` to ``end`` lie in that are here."""
        with self._lock:
            pieces = self._present[off // PIECE : (end - 1) // PIECE + 1]
        return sum(pieces) / len(pieces)

    def _runs(self, ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """The pieces the byte ranges lie in, as runs (first, stop) of up to `CHUNK`."""
        wanted = {
            i for a, b in ranges for i in range(max(a, 0) // PIECE, -(-min(b, self.size) // PIECE))
        }
        return _spans(sorted(wanted), CHUNK // PIECE)

    def _get(self, first: int, stop: int) -> None:
        """Make pieces ``first`` to ``stop`` (excluded) here: each missing run not under way
        is fetched in one read here, and those another thread fetches are waited for (and
        fetched here if that failed)."""
        while True:
            with self._lock:
                missing = [i for i in range(first, stop) if not self._present[i]]
                if not missing:
                    return
                waits = {id(e): e for i in missing if (e := self._pending.get(i)) is not None}
                free = [i for i in missing if i not in self._pending]
                claimed = [(a, b, threading.Event()) for a, b in _spans(free, len(free))]
                for a, b, event in claimed:
                    for i in range(a, b):
                        self._pending[i] = event
            try:
                for a, b, event in claimed:
                    self._fetch(a, b)
                    self._release(a, b, event)
            finally:
                for a, b, event in claimed:  # the one that failed, and those after it
                    if not event.is_set():
                        self._release(a, b, event)
            for event in waits.values():
                event.wait()

    def _release(self, first: int, stop: int, event: threading.Event) -> None:
        with self._lock:
            for i in range(first, stop):
                self._pending.pop(i, None)
        event.set()

    def _fetch(self, first: int, stop: int) -> None:
        """Pieces ``first`` to ``stop`` (excluded) from the store, in one read."""
        start = first * PIECE
        length = min(stop * PIECE, self.size) - start
        src = self._source()
        got = 0
        while got < length:
            data = os.pread(src, length - got, start + got)
            if not data:
                raise Damaged(f"{self.target.name}: the store's file is shorter than its manifest")
            os.pwrite(self._fd, data, start + got)
            got += len(data)
        with self._lock:
            for i in range(first, stop):
                if not self._present[i]:
                    self._present[i] = 1
                    self._missing -= 1

    def _source(self) -> int:
        with self._lock:
            if self._src is None:
                self._src = self._opener()
                read_straight(self._src)  # each piece: longer requests to the NAS
            return self._src

    def _close_if_unused(self) -> None:
        with self._lock:
            if not (self.done or self.closed) or self._readers or self._pending:
                return
            fds, self._fd, self._src = [self._fd, self._src], -1, None
            done = self.done
            self.closed = True
        for fd in fds:
            if fd is not None and fd >= 0:
                os.close(fd)
        if not done:
            self.path.unlink(missing_ok=True)


def _spans(pieces: list[int], most: int) -> list[tuple[int, int]]:
    """Sorted piece numbers as runs (first, stop) of consecutive ones, each ``most`` long
    at most."""
    runs: list[tuple[int, int]] = []
    for i in pieces:
        if runs and runs[-1][1] == i and i - runs[-1][0] < most:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs
