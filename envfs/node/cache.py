"""The node-local cache: a copy of every snapshot a node serves, so that serving it touches
no NAS (no round trip per open, nothing lost in an outage).

Layout (this module owns it)::

    <cache>/objects/<xx>/<sha256>.<mode>  one file per content and mode, shared by every copy
    <cache>/snapshots/<id>/                a complete copy: files hardlinked from objects/,
                                           its manifest in .envfs/ (as in the store)
    <cache>/staging/<id>.<nonce>/          a copy being made
    <cache>/early/<id>.<pid>.<nonce>/      a fresh node's early tree (`envfs.node.early`)

Each file a process reads is copied on its first read (`NodeCache.fetch`: whole, checked,
into ``objects/``, unless the node has its content already, from any snapshot) and served
from there. A whole copy is made in the background once a snapshot's first use has
quietened (FUSE serves from ``objects/`` and the store meanwhile; a copy under way pauses
while jobs open or read in files of envs not copied whole, for up to `PATIENCE` s from
its start): the manifest is read,
every file whose content the node lacks is copied from the store by several threads
(directory file descriptors, so a NAS sees one lookup per file, not one per path
component) and checked against the manifest's sha256 as it is written, then the tree
appears by one rename.  One copy of numpy per node, whatever the number of envs using it.

The cache is bounded (``max_bytes``, counting each content once): after a copy, the least
recently used snapshots that are not in use are evicted, then objects nothing links.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import shutil
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from envfs.core.errors import EnvironmentProblem
from envfs.node.copying import (
    DIR_FLAGS,
    FILE_FLAGS,
    PROBE_MAX,
    READ,
    GiveWay,
    StoreDirs,
    Throttle,
    beside,
    copy_bytes,
    create,
    opener_of,
    read_straight,
    write_all,
)
from envfs.node.partial import Damaged, PartialCopy
from envfs.store.files import (
    META,
    Listing,
    ListingEntry,
    make_read_only,
    pid_start_time,
    private_dir,
    read_listing,
    remove_tree,
    remove_unshared,
)
from envfs.store.formats import Range

log = logging.getLogger(__name__)

#: Threads copying one snapshot whole (in the background): a NAS answers requests at once,
#: each after its latency, but is shared by every node; with 16, one node's copy of the
#: pandas env (6,676 files, ~6 requests each) made 4 other fresh nodes' first imports
#: 3.0-3.3x a local one instead of 2.2x (`../shared/checks/12-fresh-node`).
COPY_THREADS = 4
#: Files at least this big come in piece by piece, a read waiting only for its pieces
#: (`envfs.node.partial`); smaller ones are copied whole on their first read. (4 MB: a
#: fresh node's job maps libpython, 8 MB without its debug sections, through FUSE at its
#: start; whole, its first page waited for all of it: 20-30 ms more a first import pandas
#: than with 8 MB here, 12 paired runs each, twice; with 2 MB, pandas' own libraries too
#: come in pieces, served by FUSE until whole: no gain.)
PARTIAL_MIN = 4 << 20
#: Seconds without a job opening or reading in a file of an env not copied whole before
#: whole copies run: the job's own reads have the NAS first.
QUIET = 2.0
#: Seconds after its start a whole copy stops waiting for that and goes on regardless (a
#: node never quiet would otherwise never hold its envs whole).
PATIENCE = 60.0


class CacheDamage(EnvironmentProblem):
    """A store file does not match its manifest: the copy is refused (run `envfs verify`)."""


class NodeCache:
    """Complete local copies of snapshots, under ``root``."""

    def __init__(
        self, root: Path, max_bytes: int | None = None, fill_rate: int | None = None
    ) -> None:
        self.root = root
        self.max_bytes = max_bytes
        #: bytes a second whole copies may read from the store (None: no bound; 0: no whole
        #: copies, only the files read are copied)
        self.fill_rate = fill_rate
        self._throttle = Throttle(fill_rate) if fill_rate else None
        self.objects = root / "objects"
        self.snapshots = root / "snapshots"
        self.staging = root / "staging"
        self.early = root / "early"
        private_dir(root)  # copies of envs an ACL may restrict: only root reads them here
        for d in (self.objects, self.snapshots, self.staging, self.early):
            d.mkdir(parents=True, exist_ok=True)
        # objects/00..ff made now, at the mount, not while a fresh node's first job waits
        # for its first files (where making a directory costs what a file does)
        made = set(os.listdir(self.objects))
        for sub in (f"{i:02x}" for i in range(256)):
            if sub not in made:
                (self.objects / sub).mkdir(exist_ok=True)
        self._held_lock = threading.Lock()
        self._held = self._scan()  # now, at the mount: see `held`
        self._fetch_lock = threading.Lock()
        self._fetching: dict[str, threading.Lock] = {}  # object name -> its copier's lock
        self._partials: dict[str, PartialCopy] = {}  # big files coming in piece by piece
        self._refused: set[str] = set()  # objects whose store file did not match
        self.fetched_files = 0  # contents copied on first read (`fetch`), and their bytes
        self.fetched_bytes = 0
        self.last_fetch = 0.0  # when the last one was (monotonic)
        self.last_open = 0.0  # when a job last opened a file of an env not copied whole
        for leftover in os.listdir(self.staging):  # copies a killed daemon did not finish
            remove_tree(self.staging / leftover)
        for tree in os.listdir(self.early):  # early trees of daemons gone (killed)
            owner = tree.split(".")[1] if tree.count(".") in (2, 3) else ""  # (its image: 3)
            if not (owner.isdigit() and pid_start_time(int(owner))):
                remove_tree(self.early / tree)

    def path(self, snapshot_id: str) -> Path | None:
        """The complete copy of ``snapshot_id``, or None."""
        path = self.snapshots / snapshot_id
        return path if (path / META / "manifest.json").exists() else None

    def copies(self) -> list[str]:
        return sorted(os.listdir(self.snapshots))

    def statistics(self, copies: int) -> dict[str, int]:
        """For ``envfs status``: whole copies served, contents read in on first read."""
        return {
            "node_cache_copies": copies,
            "node_cache_fetched_files": self.fetched_files,
            "node_cache_fetched_bytes": self.fetched_bytes,
        }

    # -- one file at a time, as it is first read ----------------------------------------

    def object_path(self, entry: ListingEntry) -> Path | None:
        """The node's copy of one content, if it has it (from any snapshot that holds it)."""
        path = self._object(entry)
        return path if path.exists() else None

    def fetch(self, entry: ListingEntry, source: bytes, dirs: StoreDirs | None = None) -> Path:
        """The node's copy of one file's content, copied now from ``source`` (its path in
        the store) if the node lacks it: a fresh node reads a file from the NAS once, in
        large reads, when it is first read, not a page at a time. Checked against the
        manifest's sha256 (`CacheDamage`); two readers of one content copy it once.
        ``dirs``: store directories a caller copying many files keeps open."""
        target = self._object(entry)
        if target.exists():
            return target
        if entry.size >= PARTIAL_MIN:
            return self._complete(entry, opener_of(source, dirs), source, counted=True)
        with self._fetch_lock:
            lock = self._fetching.setdefault(target.name, threading.Lock())
        with lock:
            if not target.exists():
                dirname, _, name = source.rpartition(b"/")
                if dirs is not None:
                    self._copy_file(dirs.fd(dirname), name, entry)
                else:
                    dfd = os.open(dirname, DIR_FLAGS)
                    try:
                        self._copy_file(dfd, name, entry)
                    finally:
                        os.close(dfd)
                self.fetched_files += 1
                self.fetched_bytes += entry.size
        with self._fetch_lock:
            self._fetching.pop(target.name, None)
        self.last_fetch = time.monotonic()
        return target

    def fetch_ranges(
        self,
        entry: ListingEntry,
        source: bytes,
        ranges: list[Range],
        dirs: StoreDirs | None = None,
    ) -> None:
        """The pieces byte ranges of a big file (`PARTIAL_MIN`) lie in, copied now from
        ``source`` if the node lacks them, ahead of a job's reads of them (what a traced
        import touched of a library); the rest comes with the whole copy or when read.
        `CacheDamage` as for `fetch`."""
        copy = self._partial(entry, opener_of(source, dirs))
        if copy is None:
            return
        with self._refusing(entry, copy, source):
            copy.fetch(ranges)
            if copy.whole():
                copy.finish()
                self._settle(entry, copy, counted=True)
        self.last_fetch = time.monotonic()

    def unpack(
        self, pack: bytes, members: list[ListingEntry], landed: Callable[[int], None] | None = None
    ) -> int:
        """Copy the contents of ``pack`` (a pack file in the store: its members' bytes back
        to back, given by their listing entries) that the node lacks into ``objects/``, in
        one sequential read; a member that does not match its sha256 is skipped (copied
        from its own file when read). ``landed`` is called with the index of each member
        made an object, as it is (a job waits for the first members, not the whole pack).
        The number copied."""
        if all(self.holds(entry) for entry in members):
            return 0
        copied = 0
        with open(pack, "rb", buffering=READ) as src:
            read_straight(src.fileno())
            for i, entry in enumerate(members):
                data = src.read(entry.size)
                if len(data) < entry.size:
                    log.warning("pack %s is short; its other files come one by one", pack)
                    break
                if self._put(entry, data):
                    copied += 1
                    self.fetched_files += 1
                    self.fetched_bytes += entry.size
                    if landed is not None:
                        landed(i)
        self.last_fetch = time.monotonic()
        return copied

    def _put(self, entry: ListingEntry, data: bytes) -> bool:
        """Make ``data`` the object of ``entry`` unless the node has it (`holds`) or it does
        not match. Paths as strings: a pack's hundreds of members each cost their
        syscalls, not a `Path` built and parsed per step."""
        if self.holds(entry):
            return False
        if hashlib.sha256(data).hexdigest() != entry.sha256:
            log.warning("a packed copy of %s does not match its manifest; skipped", entry.sha256)
            return False
        target = self.object_file(entry)
        tmp = beside(target)
        fd = create(tmp)
        try:
            write_all(fd, data)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        finally:
            os.close(fd)
        self._place(tmp, target, entry)
        return True

    def read_range(self, entry: ListingEntry, source: bytes, off: int, size: int) -> bytes | None:
        """Bytes of a big file (`PARTIAL_MIN`) the node does not hold whole yet, fetching
        only the pieces they lie in (`envfs.node.partial`); None once it holds it whole
        (read the object). `CacheDamage` if its copy was refused."""
        if self._object(entry).exists():
            return None
        copy = self._partial(entry, opener_of(source, None))
        if copy is None:
            return None
        self.last_fetch = time.monotonic()  # a job is reading in: whole copies wait
        with self._refusing(entry, copy, source):
            data = copy.read(off, size)
            if data is not None and copy.whole():
                copy.finish()
                self._settle(entry, copy, counted=True)
        return data

    def read_here(self, entry: ListingEntry, off: int, size: int) -> bytes | None:
        """Bytes of a big file coming in piece by piece, if they are here already (from the
        node's disk, nothing fetched: cheap enough for the event loop); else None."""
        with self._fetch_lock:
            copy = self._partials.get(self._object(entry).name)
        if copy is None:
            return None
        data = copy.read_here(off, size)
        if data is not None:
            self.last_fetch = time.monotonic()  # a job is reading in: whole copies wait
        return data

    def _complete(
        self, entry: ListingEntry, opener: Callable[[], int], source: bytes, counted: bool
    ) -> Path:
        """A big file copied whole through its `PartialCopy` (sharing the pieces a job's
        reads fetched, and fetching none twice); the object. ``counted``: a first read's
        copy (`fetch`), not the background fill's."""
        target = self._object(entry)
        copy = self._partial(entry, opener)
        if copy is None:
            return target
        with self._refusing(entry, copy, source):
            copy.complete()
        self._settle(entry, copy, counted)
        return target

    @contextlib.contextmanager
    def _refusing(self, entry: ListingEntry, copy: PartialCopy, source: bytes) -> Iterator[None]:
        """A copy found damaged is given up, and never tried again: `CacheDamage`."""
        try:
            yield
        except Damaged as exc:
            copy.abandon()
            name = self._object(entry).name
            with self._fetch_lock:
                self._refused.add(name)
                if self._partials.get(name) is copy:
                    del self._partials[name]
            raise CacheDamage(f"{os.fsdecode(source)}: {exc.message}; run `envfs verify`") from exc

    def _partial(self, entry: ListingEntry, opener: Callable[[], int]) -> PartialCopy | None:
        """The copy under way of a big file, or a new one; None if the node holds it now."""
        target = self._object(entry)
        with self._fetch_lock:
            if target.name in self._refused:
                raise CacheDamage(f"{target.name} does not match its manifest in the store")
            if target.exists():  # (a copy that just ended is put in place before it goes)
                return None
            copy = self._partials.get(target.name)
            if copy is None:
                target.parent.mkdir(exist_ok=True)
                staged = self.staging / f".{target.name}.{uuid.uuid4().hex[:8]}.partial"
                sha256 = entry.sha256 or ""
                mode = stat.S_IMODE(entry.mode)
                copy = PartialCopy(staged, target, entry.size, sha256, mode, opener)
                self._partials[target.name] = copy
            return copy

    def _settle(self, entry: ListingEntry, copy: PartialCopy, counted: bool) -> None:
        """A copy done: let it go (once), counted as a first read's if ``counted``."""
        target = self._object(entry)
        name = target.name
        if target.exists():
            self._holds(target)
        with self._fetch_lock:
            if self._partials.get(name) is copy:
                del self._partials[name]
                if counted:
                    self.fetched_files += 1
                    self.fetched_bytes += entry.size
        if counted:
            self.last_fetch = time.monotonic()

    def opened(self) -> None:
        """A job opened a file of an env not copied whole (served from ``objects/``): whole
        copies wait for it to quieten, as for a file read in (`fetch`)."""
        self.last_open = time.monotonic()

    def quiet_for(self) -> float:
        """Seconds since a job last opened or read in a file of an env not copied whole."""
        return time.monotonic() - max(self.last_fetch, self.last_open)

    def _wait_quiet(self, until: float) -> None:
        """Return once no job has opened or read in a file for `QUIET` s, or at ``until``."""
        while (pause := min(QUIET - self.quiet_for(), until - time.monotonic())) > 0:
            time.sleep(pause)

    def touch(self, snapshot_id: str) -> None:
        """Record a use of a copy (its directory's mtime orders eviction)."""
        with contextlib.suppress(FileNotFoundError):
            os.utime(self.snapshots / snapshot_id)

    def fill(self, snapshot_id: str, source: Path) -> Path:
        """Copy the built snapshot at ``source`` (its store directory) into the cache, checked
        against its manifest; the copy's path.  Raises `CacheDamage` or `OSError` (the store
        is unreachable, the cache's disk is full) with nothing half-made left visible."""
        done = self.path(snapshot_id)
        if done is not None:
            return done
        t0 = time.monotonic()
        listing = read_listing(os.fsencode(source))
        staged = self.staging / f"{snapshot_id}.{uuid.uuid4().hex[:12]}"
        try:
            copied = self._build(listing, source, staged, time.monotonic() + PATIENCE)
            manifest = source / META / "manifest.json"
            (staged / META).mkdir(exist_ok=True)
            shutil.copyfile(manifest, staged / META / "manifest.json")
            make_read_only(staged)
            final = self.snapshots / snapshot_id
            try:
                os.rename(staged, final)
            except OSError:  # another copy won (a second daemon on this cache)
                if self.path(snapshot_id) is None:
                    raise
                remove_tree(staged)
        except BaseException:
            remove_tree(staged)
            raise
        log.info(
            "snapshot %s copied to the node cache in %.1fs (%d files copied, the rest shared)",
            snapshot_id[:12],
            time.monotonic() - t0,
            copied,
        )
        return final

    def _build(self, listing: Listing, source: Path, dest: Path, patient: float) -> int:
        """Make the tree of ``listing`` at ``dest``; the number of files copied from the store.
        Until ``patient`` (monotonic) each file waits for jobs to quieten first."""
        root = os.fsencode(dest)
        dest.mkdir()
        dirs = sorted(rel for rel in listing if rel)
        for rel in dirs:
            os.mkdir(os.path.join(root, rel))
        files: list[tuple[bytes, bytes, ListingEntry]] = []
        for rel, entries in listing.items():
            for name, entry in entries.items():
                if rel == b"" and name == META.encode():
                    continue
                if entry.type == "symlink":
                    assert entry.target is not None
                    os.symlink(entry.target, os.path.join(root, rel, name))
                elif entry.type == "file":
                    files.append((rel, name, entry))
        missing = [f for f in files if not self._object(f[2]).exists()]
        by_dir: dict[bytes, list[tuple[bytes, ListingEntry]]] = {}
        for rel, name, entry in missing:
            by_dir.setdefault(rel, []).append((name, entry))
        way = GiveWay()
        with ThreadPoolExecutor(COPY_THREADS, thread_name_prefix="cache-fill") as pool:
            copy = functools.partial(self._copy_dir, source, patient=patient, way=way)
            list(pool.map(copy, by_dir.keys(), by_dir.values()))
        if way.pauses:
            log.info("the whole copy gave way to a busy NAS %d time(s)", way.pauses)
        for rel, name, entry in files:
            os.link(self._object(entry), os.path.join(root, rel, name))
        for rel in dirs:  # directory modes as in the store (writable until make_read_only)
            os.chmod(os.path.join(root, rel), dir_mode(listing, rel) | 0o200)
        return len(missing)

    def _object(self, entry: ListingEntry) -> Path:
        return Path(self.object_file(entry))

    def object_file(self, entry: ListingEntry) -> str:
        """Where the node's copy of a content is (held or not), as a string: where many
        files are copied or linked in a row, no `Path` built per file (`_object` is it)."""
        assert entry.sha256 is not None
        return f"{os.fspath(self.objects)}/{entry.sha256[:2]}/{object_name(entry)}"

    def holds(self, entry: ListingEntry) -> bool:
        """Whether the node holds ``entry``'s content, as `held` tells (no stat)."""
        if entry.sha256 is None:
            return False
        with self._held_lock:
            return object_name(entry) in self._held

    def held(self) -> set[str]:
        """The names (``<sha256>.<mode>``) of the contents the node holds: those found when
        the cache was opened and at the last `prune`, and those this process put in since
        (one that went since is a link that fails: the caller reads it through FUSE). Not
        a listing of ``objects/`` each time: on a fresh node's first job, with the page
        cache cold, its 256 directories took 40-70 ms of the early tree's making, while the
        job ran through FUSE."""
        with self._held_lock:
            return set(self._held)

    def _holds(self, target: str | Path) -> None:
        with self._held_lock:
            self._held.add(os.path.basename(target))

    def _scan(self) -> set[str]:
        """What ``objects/`` holds: one listing per directory, not a stat per file."""
        names: set[str] = set()
        for sub in os.listdir(self.objects):
            with contextlib.suppress(NotADirectoryError, FileNotFoundError):
                names.update(n for n in os.listdir(self.objects / sub) if not n.startswith("."))
        return names

    def _copy_dir(
        self,
        source: Path,
        rel: bytes,
        entries: list[tuple[bytes, ListingEntry]],
        patient: float,
        way: GiveWay,
    ) -> int:
        """Copy one store directory's missing files into objects/ (one open of the directory,
        then one lookup per file), each after jobs have quietened (until ``patient``), giving
        way while the NAS is busy (`GiveWay`)."""
        dfd = os.open(os.path.join(os.fsencode(source), rel), DIR_FLAGS)
        try:
            for name, entry in entries:
                self._wait_quiet(patient)
                if self._throttle is not None:
                    self._throttle.take(entry.size)
                t0 = time.monotonic()
                if self._copy_file(dfd, name, entry) and entry.size < PROBE_MAX:
                    way.took(time.monotonic() - t0)
        finally:
            os.close(dfd)
        return len(entries)

    def _copy_file(self, dfd: int, name: bytes, entry: ListingEntry) -> bool:
        """Copy one store file into objects/ (False: the node had it)."""
        target = self._object(entry)
        if target.exists():
            return False
        if entry.size >= PARTIAL_MIN:  # one copy with the pieces a job may be reading
            self._complete(entry, lambda: os.open(name, FILE_FLAGS, dir_fd=dfd), name, False)
            return True
        tmp = beside(target)
        src = os.open(name, FILE_FLAGS, dir_fd=dfd)
        read_straight(src)  # and in long read calls (`READ`)
        try:
            digest = copy_bytes(src, tmp, entry.size)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            os.close(src)
        if digest != entry.sha256:
            tmp.unlink()
            raise CacheDamage(
                f"{os.fsdecode(name)} in the store does not match its manifest; "
                "run `envfs verify` on the store"
            )
        self._place(tmp, target, entry)
        return True

    def _place(self, tmp: str | Path, target: str | Path, entry: ListingEntry) -> None:
        """A new object, written and checked at ``tmp``, put in place (read-only, with its
        mode) and counted as held."""
        os.chmod(tmp, stat.S_IMODE(entry.mode) & ~0o222)
        os.replace(tmp, target)
        self._holds(target)

    # -- bounds -----------------------------------------------------------------------------

    def size(self) -> int:
        """Bytes the cache holds (each content once)."""
        total = 0
        for dirpath, _dirs, names in os.walk(self.objects):
            for name in names:
                with contextlib.suppress(FileNotFoundError):
                    total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
        return total

    def evict(self, in_use: set[str]) -> list[str]:
        """Remove least recently used copies not in ``in_use`` until the cache fits
        ``max_bytes``; the ids removed."""
        if self.max_bytes is None:
            return []
        removed: list[str] = []
        size = self.size()
        if size <= self.max_bytes:
            return removed
        by_age = sorted(
            (os.lstat(self.snapshots / sid).st_mtime, sid)
            for sid in self.copies()
            if sid not in in_use
        )
        for _mtime, sid in by_age:
            if size <= self.max_bytes:
                break
            remove_tree(self.snapshots / sid)
            removed.append(sid)
            self.prune()
            size = self.size()
        if removed:
            log.info("node cache: evicted %d snapshot(s), %d bytes held", len(removed), size)
        return removed

    def prune(self) -> int:
        """Delete objects no copy links; how many."""
        removed = remove_unshared(self.objects)
        found = self._scan()
        with self._held_lock:
            self._held = found
        return removed


def object_name(entry: ListingEntry) -> str:
    """The name of a file's content in ``objects/`` (one per content and mode)."""
    return f"{entry.sha256}.{stat.S_IMODE(entry.mode):o}"


def dir_mode(listing: Listing, rel: bytes) -> int:
    """A directory's permission bits as the snapshot has them."""
    parent, _, name = rel.rpartition(b"/")
    entry = listing.get(parent, {}).get(name)
    return stat.S_IMODE(entry.mode) if entry is not None else 0o555
