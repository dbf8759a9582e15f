"""A big file on its way into the node cache, served by the part while it comes
(`envfs.node.cache.NodeCache.read_range`).

A fresh node's job reads parts of big files (a shared library is mapped, and only the
pages it touches are read: `import torch` reads 749 MB of the 3.2 GB of libraries it
maps). Copying such a file whole before its first read is served makes the job wait for
bytes it never reads. A `PartialCopy` is the file being copied, sparse, in `CHUNK`-sized
pieces: a read waits only for the pieces it covers (each fetched once, by whoever asks
first, in one large read), a whole copy (the trace's prefetch, the background fill)
fetches the rest, and once every piece is there the file is checked against its sha256
and becomes the object, as a whole copy does. Until then its bytes are the store's,
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

#: The piece a read waits for: one large read of the store.
CHUNK = 4 << 20
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
        self._present = bytearray(max(1, -(-size // CHUNK)))
        self._missing = len(self._present)
        self._pending: dict[int, threading.Event] = {}
        self._lock = threading.Lock()
        self._finishing = threading.Lock()  # one check of the whole; reads go on meanwhile
        self._readers = 0
        self.done = False  # whole, checked and in place
        self.closed = False

    def read(self, off: int, size: int) -> bytes | None:
        """The bytes at ``off`` (fewer at the end of the file), fetching the pieces they
        lie in that are not here yet; None once the copy is done (read ``target``)."""
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
            for i in range(off // CHUNK, (end - 1) // CHUNK + 1):
                self._piece(i)
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
        self.fetch(self.size)
        return self.finish()

    def fetch(self, end: int) -> None:
        """Fetch the pieces of the first ``end`` bytes not here yet (`PARTS` at a time)."""
        count = -(-min(end, self.size) // CHUNK)
        with ThreadPoolExecutor(PARTS, thread_name_prefix="cache-piece") as pool:
            list(pool.map(self._piece, range(count)))

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

    def _piece(self, i: int) -> None:
        while True:
            with self._lock:
                if self._present[i]:
                    return
                event = self._pending.get(i)
                mine = event is None
                if event is None:
                    event = self._pending[i] = threading.Event()
            if not mine:
                event.wait()  # fetched by another reader (or it failed: then try here)
                continue
            try:
                self._fetch(i)
            finally:
                with self._lock:
                    del self._pending[i]
                event.set()
            return

    def _fetch(self, i: int) -> None:
        start = i * CHUNK
        length = min(CHUNK, self.size - start)
        src = self._source()
        got = 0
        while got < length:
            data = os.pread(src, length - got, start + got)
            if not data:
                raise Damaged(f"{self.target.name}: the store's file is shorter than its manifest")
            os.pwrite(self._fd, data, start + got)
            got += len(data)
        with self._lock:
            self._present[i] = 1
            self._missing -= 1

    def _source(self) -> int:
        with self._lock:
            if self._src is None:
                self._src = self._opener()
                # each piece is read straight through: longer requests to the NAS
                os.posix_fadvise(self._src, 0, 0, os.POSIX_FADV_SEQUENTIAL)
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
