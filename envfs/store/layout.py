"""The store: the shared directory that is the source of truth.

Every write here is atomic: a file is written under ``staging/`` and then renamed or
hard-linked into place, so a crash leaves the old state or the new one, never half.
Bindings are append-only: a revision file is created with ``link()``, which fails if it
exists, so two writers never overwrite each other.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
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
from typing import Any, NamedTuple, TypeVar

import pydantic

from envfs.core import crashpoints
from envfs.core.config import node_time
from envfs.core.errors import Busy, CorruptRecord, EnvironmentProblem, NotFound
from envfs.core.names import parse_revision
from envfs.model import (
    LAYOUT_VERSION,
    AuditEvent,
    FailureInfo,
    InterpreterInfo,
    LeaseInfo,
    Manifest,
    ManifestEntry,
    Record,
    Revision,
    SpecInfo,
)
from envfs.store import feed

R = TypeVar("R", bound=Record)
log = logging.getLogger(__name__)

#: A lease not heartbeaten for this long (store clock) is broken by waiters;
#: ``ENVFS_LEASE_STALE`` overrides it (tests).  Holders beat four times as often.
LEASE_STALE = float(os.environ.get("ENVFS_LEASE_STALE") or 60.0)
LEASE_HEARTBEAT = LEASE_STALE / 4
#: A node's ``leases/<id>/<host>`` older than this (store clock) no longer keeps ``<id>``.
SERVE_LEASE_TTL = 300.0
#: Bytes set aside for a build's failure record (its log is cut to fit).
FAILURE_ROOM = 64 * 1024
META = ".envfs"  # metadata directory inside a snapshot (manifest, build log); not served
#: Seconds a build, bind or sweep waits for the gc fence before it gives up, naming who holds
#: it; ``ENVFS_FENCE_WAIT`` overrides it (tests).
FENCE_WAIT = float(os.environ.get("ENVFS_FENCE_WAIT") or 60.0)
#: Directories of lock and lease files: the store's owner only, so that no other user of a
#: node can open (and ``flock``) them.
PRIVATE_DIRS = ("locks", "leases")


def _revision_files(names: list[str]) -> list[int]:
    """The revision numbers of ``<n>.json`` names, ascending; other names ignored."""
    numbers = (parse_revision(n[:-5]) for n in names if n.endswith(".json"))
    return sorted(n for n in numbers if n is not None)


def lock_holders(fd: int) -> str:
    """Who holds a lock on the file open at ``fd``, from ``/proc/locks`` (pid, user,
    command), for a message; a holder on another node of a NAS is not listed there."""
    st = os.fstat(fd)
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids: set[int] = set()
    with contextlib.suppress(OSError), open("/proc/locks") as f:
        for line in f:
            # "1: FLOCK  ADVISORY  WRITE 1234 00:2a:5678 0 EOF"; waiters read "1: -> FLOCK ..."
            fields = line.split()
            if len(fields) >= 6 and fields[1] != "->" and fields[5] == key:
                pids.add(int(fields[4]))
    pids.discard(os.getpid())
    if not pids:
        return "a process this node cannot see (another node?)"
    return ", ".join(_describe_pid(pid) for pid in sorted(pids))


def _describe_pid(pid: int) -> str:
    import pwd

    try:
        uid = os.stat(f"/proc/{pid}").st_uid
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return f"pid {pid}"
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    return f"pid {pid} ({comm}, user {user})"


def pid_start_time(pid: int) -> int:
    """The start time of a process (clock ticks since boot), 0 if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return 0
    return int(data.rsplit(b")", 1)[1].split()[19])


def _libc_syncfs(fd: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.syncfs(fd) == 0:
            return
    except (OSError, AttributeError):
        pass
    os.sync()


class Store:
    """One store directory (see docs/architecture.md for the layout)."""

    SUBDIRS = (
        "uv-cache",
        "specs",
        "inputs",
        "snapshots",
        "bindings",
        "staging",
        "locks",
        "leases",
        "failed",
        "objects",
        "bytecode",
        "interpreters",
        "interpreters/by-source",
        "trash",
        "retired",
        "log",
    )

    def __init__(self, root: Path) -> None:
        self.root = root
        self.uv_cache = root / "uv-cache"
        self.specs = root / "specs"
        self.inputs = root / "inputs"
        self.snapshots = root / "snapshots"
        self.bindings = root / "bindings"
        self.staging = root / "staging"
        self.locks = root / "locks"
        self.leases = root / "leases"
        self.failed = root / "failed"
        self.objects = root / "objects"
        self.bytecode = root / "bytecode"
        self.interpreters = root / "interpreters"
        self.trash = root / "trash"
        self.retired = root / "retired"
        self.log_dir = root / "log"
        self._uuid: str | None = None
        self._fresh: dict[str, list[Path]] = {}  # staging dir/ -> pool objects it created
        self._fresh_lock = threading.Lock()

    # -- layout ---------------------------------------------------------------------------

    def ensure(self) -> Store:
        """Create the layout if missing (idempotent, safe to race)."""
        try:
            for sub in self.SUBDIRS:
                (self.root / sub).mkdir(parents=True, exist_ok=True)
            for sub in PRIVATE_DIRS:
                self._make_private(self.root / sub)
            config = self.root / "envfs.toml"
            if not config.exists():
                text = f'format = {LAYOUT_VERSION}\nuuid = "{uuid.uuid4().hex}"\n'
                self.create_file(config, text.encode())
        except OSError as exc:
            raise EnvironmentProblem(
                f"cannot create the store at {self.root}: {exc.strerror}; "
                "pass --store DIR (or ENVFS_STORE) on a writable filesystem"
            ) from exc
        return self

    @staticmethod
    def _make_private(path: Path) -> None:
        """Take group and other permissions off a directory of ours (stores made before
        lock and lease directories were private are fixed on their next build)."""
        st = os.stat(path)
        if st.st_mode & 0o077 and st.st_uid == os.geteuid():
            os.chmod(path, stat.S_IMODE(st.st_mode) & 0o700)

    @property
    def uuid(self) -> str:
        if self._uuid is None:
            text = (self.root / "envfs.toml").read_text()
            self._uuid = text.split('uuid = "', 1)[1].split('"', 1)[0]
        return self._uuid

    def exists(self) -> bool:
        return (self.root / "envfs.toml").exists()

    # -- atomic files ---------------------------------------------------------------------

    def _temp(self, name: str) -> Path:
        return self.staging / f".{name}.{uuid.uuid4().hex[:12]}.tmp"

    def _write_temp(self, data: bytes, name: str) -> Path:
        tmp = self._temp(name)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        return tmp

    def create_file(self, path: Path, data: bytes) -> bool:
        """Create ``path`` with ``data`` atomically; False if it already exists."""
        tmp = self._write_temp(data, path.name)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    def replace_file(self, path: Path, data: bytes) -> None:
        """Write ``path`` atomically, replacing what was there."""
        tmp = self._write_temp(data, path.name)
        os.replace(tmp, path)

    @staticmethod
    def read_model(path: Path, model: type[R]) -> R:
        """A record of the store; `CorruptRecord` (one line: the file and why, never its
        bytes) if it cannot be read or is not a valid ``model``."""
        try:
            return model.model_validate_json(path.read_bytes())
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise CorruptRecord(f"{path} is unreadable: {exc.strerror}") from exc
        except pydantic.ValidationError as exc:
            first = exc.errors(include_input=False, include_url=False)[0]
            where = ".".join(str(x) for x in first["loc"])
            why = f"{where}: {first['msg']}" if where else first["msg"]
            more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
            raise CorruptRecord(f"{path} is corrupt: {why}{more}") from exc

    # -- specs ----------------------------------------------------------------------------

    def spec_dir(self, snapshot_id: str) -> Path:
        return self.specs / snapshot_id

    def write_spec(
        self, info: SpecInfo, pyproject: str, lock: str, extra: Path | None = None
    ) -> None:
        """Publish ``specs/<id>/`` (pyproject.toml, uv.lock, spec.json, and the ``extra``
        file, the project's wheel, if any) if not there yet."""
        final = self.spec_dir(info.snapshot_id)
        if (final / "spec.json").exists():
            return
        tmp = self.staging / f"spec-{info.snapshot_id}.{uuid.uuid4().hex[:12]}"
        tmp.mkdir()
        if extra is not None:
            shutil.copyfile(extra, tmp / extra.name)
        (tmp / "pyproject.toml").write_text(pyproject)
        (tmp / "uv.lock").write_text(lock)
        (tmp / "spec.json").write_text(info.model_dump_json(indent=2))
        try:
            os.rename(tmp, final)
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            shutil.rmtree(tmp)

    def read_spec(self, snapshot_id: str) -> SpecInfo:
        try:
            return self.read_model(self.spec_dir(snapshot_id) / "spec.json", SpecInfo)
        except FileNotFoundError:
            raise NotFound(f"no spec {snapshot_id[:12]} in the store {self.root}") from None

    def spec_files(self, snapshot_id: str) -> tuple[str, str]:
        d = self.spec_dir(snapshot_id)
        return (d / "pyproject.toml").read_text(), (d / "uv.lock").read_text()

    def nearest_spec(
        self,
        reqs: list[str],
        interpreter: str,
        indexes: tuple[str | None, list[str]] = (None, []),
        scan: int = 200,
    ) -> tuple[SpecInfo, str] | None:
        """The requirement-list spec (and its lock) sharing the most requirements with
        ``reqs`` for this interpreter digest and these indexes (default, extra), among the
        ``scan`` newest specs; None if none shares any."""
        try:
            entries = [e for e in os.scandir(self.specs) if e.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            return None
        entries.sort(key=lambda e: e.stat(follow_symlinks=False).st_mtime, reverse=True)
        wanted = set(reqs)
        best: tuple[int, SpecInfo] | None = None
        for entry in entries[:scan]:
            try:
                info = self.read_model(Path(entry.path) / "spec.json", SpecInfo)
            except (FileNotFoundError, EnvironmentProblem):
                continue
            if info.kind != "requirements" or info.interpreter.digest != interpreter:
                continue
            if (info.index_url, info.extra_index_urls) != indexes:
                continue
            score = len(wanted & set(info.requirements))
            if score and (best is None or score > best[0]):
                best = (score, info)
        if best is None:
            return None
        return best[1], (self.spec_dir(best[1].snapshot_id) / "uv.lock").read_text()

    def input_lookup(self, key: str) -> str | None:
        try:
            return (self.inputs / key).read_text().strip() or None
        except FileNotFoundError:
            return None

    def input_record(self, key: str, snapshot_id: str) -> None:
        self.replace_file(self.inputs / key, snapshot_id.encode())

    # -- snapshots ------------------------------------------------------------------------

    def snapshot_dir(self, snapshot_id: str) -> Path:
        return self.snapshots / snapshot_id

    def snapshot_ready(self, snapshot_id: str) -> bool:
        return (self.snapshots / snapshot_id / META / "manifest.json").exists()

    def read_manifest(self, snapshot_id: str) -> Manifest:
        path = self.snapshots / snapshot_id / META / "manifest.json"
        try:
            return self.read_model(path, Manifest)
        except FileNotFoundError:
            raise NotFound(f"snapshot {snapshot_id[:12]} is not built") from None

    def snapshot_ids(self) -> list[str]:
        try:
            return sorted(n for n in os.listdir(self.snapshots) if not n.startswith("."))
        except FileNotFoundError:
            return []

    def new_staging(self, snapshot_id: str, host: str) -> Path:
        path = self.staging / f"{snapshot_id}.{host}.{uuid.uuid4().hex[:12]}"
        path.mkdir()
        return path

    def publish(self, staged: Path, snapshot_id: str) -> bool:
        """Make a staged snapshot read-only, sync it, and rename it into ``snapshots/``.

        Returns False if another builder published first (our copy is deleted).
        """
        return self._publish_dir(staged, self.snapshot_dir(snapshot_id))

    def _publish_dir(self, staged: Path, final: Path) -> bool:
        make_read_only(staged)
        fd = os.open(staged, os.O_RDONLY)
        try:
            _libc_syncfs(fd)
        finally:
            os.close(fd)
        try:
            os.rename(staged, final)
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            remove_tree(staged)
            return False
        return True

    # -- interpreters ---------------------------------------------------------------------

    def interpreter_dir(self, digest: str) -> Path:
        return self.interpreters / digest

    def interpreter_ready(self, digest: str) -> bool:
        return (self.interpreters / digest / META / "interpreter.json").exists()

    def read_interpreter(self, digest: str) -> InterpreterInfo:
        path = self.interpreters / digest / META / "interpreter.json"
        try:
            return self.read_model(path, InterpreterInfo)
        except FileNotFoundError:
            raise NotFound(
                f"interpreter {digest[:12]} is not in the store {self.root}; "
                "capture it with `envfs python add VERSION`"
            ) from None

    def interpreter_digests(self) -> list[str]:
        try:
            names = os.listdir(self.interpreters)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if len(n) == 64 and self.interpreter_ready(n))

    def new_interpreter_staging(self, host: str) -> Path:
        path = self.staging / f"interpreter.{host}.{uuid.uuid4().hex[:12]}"
        path.mkdir()
        return path

    def publish_interpreter(self, staged: Path, digest: str) -> bool:
        """Publish a captured interpreter (read-only, synced, renamed; the first one wins)."""
        return self._publish_dir(staged, self.interpreter_dir(digest))

    def interpreter_for_source(self, key: str) -> str | None:
        """The digest an installation (``key``: path, size, mtime, version) was captured as."""
        try:
            digest = (self.interpreters / "by-source" / key).read_text().strip()
        except FileNotFoundError:
            return None
        return digest if self.interpreter_ready(digest) else None

    def record_interpreter_source(self, key: str, digest: str) -> None:
        self.replace_file(self.interpreters / "by-source" / key, digest.encode())

    # -- content pool and bytecode pool ---------------------------------------------------

    def object_path(self, digest: str, mode: int) -> Path:
        """The pool's file of this content and mode (``objects/<xx>/<sha256>.<mode>``)."""
        return self.objects / digest[:2] / f"{digest}.{mode:o}"

    def pool_file(self, path: str, digest: str, mode: int, data: bytes | None = None) -> bool:
        """Make ``path`` one inode with the pool's object of its content.

        The file becomes the object if there is none yet; otherwise it is replaced by a link
        to the object (True is returned).  With ``data`` (the file's bytes), an existing
        object is compared first, and one that does not hold them is quarantined.
        """
        obj = self.object_path(digest, mode)
        obj.parent.mkdir(exist_ok=True)
        for _ in range(3):
            try:
                os.link(path, obj)
                os.chmod(obj, mode)
                self._note_created(path, obj)
                return False
            except FileExistsError:
                try:
                    if data is not None and obj.read_bytes() != data:
                        self.quarantine(obj)
                        continue
                    tmp = f"{path}.envfs-dedup"
                    os.link(obj, tmp)
                except FileNotFoundError:
                    continue  # dropped meanwhile (a failed build's, or gc): make it anew
                os.replace(tmp, path)
                return True
        raise EnvironmentProblem(f"cannot pool {path}: {obj} keeps changing")

    @contextlib.contextmanager
    def objects_created_under(self, root: Path) -> Iterator[list[Path]]:
        """The pool objects that files under ``root`` (a build's staging dir) create while
        the context lasts: what `drop_objects` takes back if that build fails."""
        key = os.path.join(root, "")
        created: list[Path] = []
        with self._fresh_lock:
            self._fresh[key] = created
        try:
            yield created
        finally:
            with self._fresh_lock:
                del self._fresh[key]

    def _note_created(self, path: str, obj: Path) -> None:
        with self._fresh_lock:
            for key, created in self._fresh.items():
                if path.startswith(key):
                    created.append(obj)

    def drop_objects(self, objects: list[Path]) -> int:
        """Delete those of ``objects`` that nothing but the pool links any more (a failed
        build's, once its staging dir is gone); the number deleted. A build linking one at
        the same moment keeps its own link, or finds it gone and pools its file anew."""
        dropped = 0
        for obj in objects:
            with contextlib.suppress(FileNotFoundError):
                if os.lstat(obj).st_nlink == 1:
                    os.unlink(obj)
                    dropped += 1
        return dropped

    def receive_tree(
        self, src: Path, dest: Path, entries: list[ManifestEntry], threads: int = 16
    ) -> None:
        """Write a finished local tree (``src``, described by ``entries``) into the store at
        ``dest`` (an empty directory): its directories and links, and each file as, or linked
        to, the pool's object of its content.  Files go in from several threads: on a NAS
        each costs a few round trips, and those overlap."""
        files = []
        for e in entries:
            target = dest / e.path
            if e.type == "dir":
                target.mkdir(mode=0o755)
            elif e.type == "symlink":
                assert e.target is not None
                os.symlink(e.target, target)
            else:
                files.append(e)
        with ThreadPoolExecutor(threads, thread_name_prefix="receive") as pool:
            list(pool.map(lambda e: self._receive_file(src / e.path, dest / e.path, e), files))
        for e in reversed(entries):
            if e.type == "dir":
                os.chmod(dest / e.path, stat.S_IMODE(e.mode))

    def _receive_file(self, src: Path, dest: Path, entry: ManifestEntry) -> None:
        mode = stat.S_IMODE(entry.mode) & ~0o222
        if entry.size == 0 or entry.sha256 is None:
            _copy_file_data(src, dest, mode)
            return
        obj = self.object_path(entry.sha256, mode)
        try:
            os.link(obj, dest)  # the content is pooled already
            return
        except FileNotFoundError:
            pass
        obj.parent.mkdir(exist_ok=True)
        tmp = obj.with_name(f".{obj.name}.{uuid.uuid4().hex[:8]}")
        _copy_file_data(src, tmp, mode)
        try:
            with contextlib.suppress(FileExistsError):  # another writer pooled it meanwhile
                os.link(tmp, obj)
            os.link(obj, dest)
        finally:
            os.unlink(tmp)

    def quarantine(self, path: Path) -> Path:
        """Move a damaged pool file to ``trash/`` (existing hardlinks keep their inode)."""
        dest = self.trash / f"damaged-{path.name}.{uuid.uuid4().hex[:12]}"
        os.rename(path, dest)
        return dest

    def bytecode_object(self, key: str) -> Path | None:
        """The pooled bytecode compiled for ``key`` (see `envfs.build.bytecode`), or None."""
        link = self.bytecode / key[:2] / key
        try:
            return link.parent / os.readlink(link)
        except (FileNotFoundError, OSError):
            return None

    def record_bytecode(self, key: str, digest: str, mode: int) -> None:
        """Remember that ``key`` compiles to the pool's object ``digest``/``mode``."""
        link = self.bytecode / key[:2] / key
        link.parent.mkdir(exist_ok=True)
        target = os.path.relpath(self.object_path(digest, mode), link.parent)
        tmp = link.with_name(f".{key}.{uuid.uuid4().hex[:12]}")
        os.symlink(target, tmp)
        os.replace(tmp, link)

    # -- garbage collection: serve leases, the gc fence, trash -------------------------------

    def store_now(self) -> float:
        """The store's clock: the mtime a file written now gets there (not this node's)."""
        probe = self.leases / f".clock.{uuid.uuid4().hex[:12]}"
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            return os.fstat(fd).st_mtime
        finally:
            os.close(fd)
            os.unlink(probe)

    def _serve_lease(self, snapshot_id: str, host: str) -> Path:
        return self.leases / snapshot_id / feed.log_name(host).removesuffix(".jsonl")

    def hold_snapshots(self, snapshot_ids: list[str], host: str) -> None:
        """Mark (or refresh) ``leases/<id>/<host>``: this node serves these snapshots."""
        for sid in snapshot_ids:
            path = self._serve_lease(sid, host)
            path.parent.mkdir(exist_ok=True)
            with open(path, "a"):
                pass
            os.utime(path)

    def release_snapshots(self, snapshot_ids: list[str], host: str) -> None:
        for sid in snapshot_ids:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._serve_lease(sid, host))

    def served_snapshots(self, now: float, ttl: float = SERVE_LEASE_TTL) -> dict[str, list[str]]:
        """Snapshots some node marked as served within ``ttl`` of ``now`` (store clock)."""
        served: dict[str, list[str]] = {}
        try:
            dirs = list(os.scandir(self.leases))
        except FileNotFoundError:
            return served
        for d in dirs:
            if not d.is_dir(follow_symlinks=False):
                continue
            for lease in os.scandir(d.path):
                with contextlib.suppress(FileNotFoundError):
                    if lease.stat().st_mtime >= now - ttl:
                        served.setdefault(d.name, []).append(lease.name)
        return served

    @contextlib.contextmanager
    def gc_fence(self, exclusive: bool = False, wait: float | None = None) -> Iterator[None]:
        """Builds and binds hold it shared, a sweep exclusively (``flock`` on locks/gc, which
        only the store's owner may open). Waits at most ``wait`` seconds (``FENCE_WAIT``),
        then raises `Busy` naming who holds it: a stuck or hostile holder fails a command in
        one line instead of freezing it."""
        import fcntl

        self._make_private(self.locks)
        path = self.locks / "gc"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            if os.fstat(fd).st_mode & 0o077:
                os.fchmod(fd, 0o600)
            mode = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
            deadline = time.monotonic() + (FENCE_WAIT if wait is None else wait)
            pause = 0.01
            while True:
                try:
                    fcntl.flock(fd, mode)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        doing = "a sweep" if exclusive else "builds and binds"
                        raise Busy(
                            f"{path} (the gc fence, which {doing} must take) is held by "
                            f"{lock_holders(fd)}; try again when it is done"
                        ) from None
                    time.sleep(pause)
                    pause = min(pause * 2, 0.5)
            yield
        finally:
            os.close(fd)

    def trash_snapshot(self, snapshot_id: str, now: float) -> Path:
        """Move a snapshot to ``trash/`` (one rename); the name records when (store clock)."""
        dest = self.trash / f"snapshot-{snapshot_id}.{int(now)}.{uuid.uuid4().hex[:8]}"
        os.rename(self.snapshot_dir(snapshot_id), dest)
        return dest

    def trash_binding(self, workflow: str, node: str, now: float) -> Path:
        """Move a binding's revisions to ``trash/`` (one rename), its highest revision number
        kept in ``retired/`` first (and again after, for one appended meanwhile), so that
        a new binding of the name goes on from there and never reuses a number."""
        self._retire(workflow, node, self.revision_numbers(workflow, node))
        dest = self.trash / f"binding-{workflow}-{node}.{int(now)}.{uuid.uuid4().hex[:8]}"
        os.rename(self.binding_dir(workflow, node), dest)
        self._retire(workflow, node, _revision_files(os.listdir(dest)))
        return dest

    def trashed(self) -> list[tuple[Path, float]]:
        """Entries of ``trash/`` with the store time they were put there (0 if unknown)."""
        out: list[tuple[Path, float]] = []
        try:
            entries = list(os.scandir(self.trash))
        except FileNotFoundError:
            return out
        for e in entries:
            parts = e.name.split(".")
            when = float(parts[-2]) if len(parts) >= 3 and parts[-2].isdigit() else 0.0
            out.append((Path(e.path), when))
        return out

    # -- failures -------------------------------------------------------------------------

    def reserve_failure_record(self, snapshot_id: str, host: str) -> Path:
        """Set aside room for a build's failure record (a staging file of FAILURE_ROOM bytes),
        so that a build failing because the store is full can still say so to every node."""
        path = self.staging / f"{snapshot_id}.{host}.{uuid.uuid4().hex[:12]}.failure"
        with open(path, "wb") as f:
            f.write(b"\0" * FAILURE_ROOM)
        return path

    def record_failure(self, info: FailureInfo, room: Path | None = None) -> None:
        """Write a failure record, into the reserved ``room`` if there is one (overwriting
        blocks already allocated needs no free space), else as a new file."""
        data = info.model_dump_json().encode()
        if len(data) > FAILURE_ROOM:
            short = info.model_copy(update={"log": (info.log or "")[-4000:]})
            data = short.model_dump_json().encode()
        final = self.failed / f"{info.snapshot_id}.json"
        if room is None or len(data) > FAILURE_ROOM:
            self.replace_file(final, data)
            return
        with open(room, "r+b") as f:
            f.write(data)
            f.truncate(len(data))
        os.replace(room, final)

    def failure(self, snapshot_id: str) -> FailureInfo | None:
        try:
            return self.read_model(self.failed / f"{snapshot_id}.json", FailureInfo)
        except FileNotFoundError:
            return None

    def clear_failure(self, snapshot_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.failed / f"{snapshot_id}.json")

    # -- bindings -------------------------------------------------------------------------

    def binding_dir(self, workflow: str, node: str) -> Path:
        return self.bindings / workflow / node

    def revision_numbers(self, workflow: str, node: str) -> list[int]:
        """The numbers of a binding's revision files, ascending, without reading them."""
        try:
            names = os.listdir(self.binding_dir(workflow, node))
        except FileNotFoundError:
            return []
        return _revision_files(names)

    def revisions(self, workflow: str, node: str) -> list[Revision]:
        """All revisions of a binding, oldest first (empty if it does not exist);
        `CorruptRecord` if one of them cannot be read."""
        d = self.binding_dir(workflow, node)
        numbers = self.revision_numbers(workflow, node)
        return [self.read_model(d / f"{n}.json", Revision) for n in numbers]

    def retired_revision(self, workflow: str, node: str) -> int:
        """The highest revision a removed binding of this name had (0: never removed).
        ``retired/<wf>/<node>/<n>``: empty files, created exclusively, never rewritten."""
        try:
            names = os.listdir(self.retired / workflow / node)
        except FileNotFoundError:
            return 0
        return max((n for n in map(parse_revision, names) if n is not None), default=0)

    def _retire(self, workflow: str, node: str, numbers: list[int]) -> None:
        if numbers:
            d = self.retired / workflow / node
            d.mkdir(parents=True, exist_ok=True)
            self.create_file(d / str(max(numbers)), b"")

    def append_revision(self, make: Any) -> Revision:
        """Append a revision: ``make(number) -> Revision``; retried if another writer won.
        Numbers go on after those of a removed binding of the same name: ``wf/node@3``
        names one revision, ever."""
        first = make(0)
        d = self.binding_dir(first.workflow, first.node)
        d.mkdir(parents=True, exist_ok=True)
        while True:
            numbers = self.revision_numbers(first.workflow, first.node)
            retired = self.retired_revision(first.workflow, first.node)
            number = max([*numbers, retired]) + 1
            rev: Revision = make(number)
            if self.create_file(d / f"{number}.json", rev.model_dump_json(indent=2).encode()):
                crashpoints.reached("bind")
                return rev

    def has_workflow(self, workflow: str) -> bool:
        """Whether any node of ``workflow`` has a binding directory."""
        try:
            with os.scandir(self.bindings / workflow) as entries:
                return any(e.is_dir() for e in entries)
        except (FileNotFoundError, NotADirectoryError):
            return False

    def binding_names(self) -> Iterator[tuple[str, str]]:
        try:
            workflows = sorted(os.listdir(self.bindings))
        except FileNotFoundError:
            return
        for wf in workflows:
            try:
                nodes = sorted(os.listdir(self.bindings / wf))
            except NotADirectoryError:
                continue
            for node in nodes:
                yield wf, node

    # -- the change feed (envfs.store.feed owns its format) ---------------------------------------

    def audit(self, event: str, host: str, snapshot_id: str | None = None, **fields: Any) -> None:
        """Append one event to this host's log (``log/<host>.jsonl``)."""
        feed.append(self.log_dir, host, event, snapshot_id, **fields)

    def changes_since(self, cursor: feed.Cursor) -> feed.Changes:
        return feed.changes_since(self.log_dir, cursor)

    def feed_end(self) -> feed.Cursor:
        return feed.end_cursor(self.log_dir)

    def events(self) -> list[AuditEvent]:
        """Every event of every host, in time order."""
        return feed.all_events(self.log_dir)

    # -- build leases ---------------------------------------------------------------------

    def lease_path(self, snapshot_id: str) -> Path:
        return self.locks / f"{snapshot_id}.lease"

    def try_lease(self, snapshot_id: str, host: str) -> Lease | None:
        """Take the build lease of a snapshot (create-exclusive), or None if someone holds it."""
        pid = os.getpid()
        info = LeaseInfo(
            snapshot_id=snapshot_id,
            host=host,
            pid=pid,
            pid_start=pid_start_time(pid),
            nonce=uuid.uuid4().hex,
            started=node_time(),
        )
        path = self.lease_path(snapshot_id)
        if not self.create_file(path, info.model_dump_json().encode()):
            return None
        return Lease(path, info, self.locks)

    def read_lease(self, snapshot_id: str) -> tuple[LeaseInfo, float] | None:
        """The lease holder and the time of its last heartbeat, or None."""
        path = self.lease_path(snapshot_id)
        try:
            st = os.stat(path)
            return self.read_model(path, LeaseInfo), st.st_mtime
        except (FileNotFoundError, EnvironmentProblem):
            return None

    def lease_is_stale(self, info: LeaseInfo, heartbeat: float, host: str) -> bool:
        """Stale: no heartbeat for LEASE_STALE by the store's clock (the lease's mtime is the
        store's too, so nodes' clocks do not matter), or its holder on this host is gone."""
        if info.host == host and pid_start_time(info.pid) != info.pid_start:
            return True
        return self.store_now() - heartbeat > LEASE_STALE

    def break_lease(self, snapshot_id: str, seen: LeaseInfo) -> bool:
        """Break a stale lease by rename (never by two deleters); True if we broke it.

        If the lease renamed away turns out to be a fresh one taken meanwhile, it is put back.
        """
        path = self.lease_path(snapshot_id)
        broken = self.locks / f"{snapshot_id}.broken.{uuid.uuid4().hex[:12]}"
        try:
            os.rename(path, broken)
        except FileNotFoundError:
            return False
        try:
            got = self.read_model(broken, LeaseInfo)
        except EnvironmentProblem:
            got = None
        if got is not None and got.nonce != seen.nonce:
            with contextlib.suppress(FileExistsError):
                os.link(broken, path)  # put the fresh lease back
            os.unlink(broken)
            return False
        os.unlink(broken)
        return True

    # -- maintenance ----------------------------------------------------------------------

    def dead_staging(
        self, held_id: str | None = None, max_age: float = 24 * 3600, fenced: bool = False
    ) -> list[Path]:
        """Staging entries of dead builds.

        Only a lease holder builds a snapshot, so while we hold ``held_id``'s lease every
        staging dir of that id (from any host) is a crashed build's. Anything older than
        ``max_age`` is dead too. ``fenced``: the caller holds the gc fence exclusively, so
        no build or capture runs anywhere and every staging dir is dead; the scratch
        entries (dot names: lock dirs, written outside the fence) only after an hour.
        """
        dead: list[Path] = []
        now = self.store_now()
        try:
            entries = list(os.scandir(self.staging))
        except FileNotFoundError:
            return dead
        for entry in entries:
            ours = held_id is not None and entry.name.startswith(held_id + ".")
            try:
                age = now - entry.stat(follow_symlinks=False).st_mtime
            except FileNotFoundError:
                continue
            scratch = entry.name.startswith(".")
            if ours or age > max_age or (fenced and (not scratch or age > 3600)):
                dead.append(Path(entry.path))
        return dead

    def remove_staging(self, dead: list[Path]) -> None:
        """Remove dead staging entries: renamed into ``trash/`` first, so a builder stopped
        and resumed past its lease fails on its own paths instead of racing the removal."""
        now = self.store_now()
        for path in dead:
            aside = self.trash / f"staging-{path.name}.{int(now)}.{uuid.uuid4().hex[:8]}"
            try:
                os.rename(path, aside)
            except FileNotFoundError:
                continue
            try:
                remove_tree(aside)
            except OSError as exc:  # still being written: gc deletes it from trash later
                log.warning("could not remove the dead build dir %s yet: %s", aside, exc)

    def clean_staging(self, held_id: str | None = None, max_age: float = 24 * 3600) -> list[Path]:
        """Remove the staging dirs of dead builds (see `dead_staging`) and return them."""
        dead = self.dead_staging(held_id, max_age)
        self.remove_staging(dead)
        return dead

    def stale_leases(self, host: str) -> list[LeaseInfo]:
        """Build leases whose holder is gone (see `lease_is_stale`): a builder killed after
        publishing leaves one that no later build of its snapshot looks at."""
        stale: list[LeaseInfo] = []
        try:
            names = os.listdir(self.locks)
        except FileNotFoundError:
            return stale
        for name in names:
            if name.endswith(".lease"):
                held = self.read_lease(name[: -len(".lease")])
                if held is not None and self.lease_is_stale(held[0], held[1], host):
                    stale.append(held[0])
        return stale


class Lease:
    """A held build lease; a daemon thread touches it so that waiters see the holder alive.

    The lease is this file with our nonce: a holder that was stopped past ``LEASE_STALE``
    and resumed finds the path holding someone else's lease, and then neither touches nor
    removes it (`held` says so; the builder abandons its build).
    """

    def __init__(self, path: Path, info: LeaseInfo, locks: Path) -> None:
        self.path = path
        self.info = info
        self.locks = locks
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)
        self._thread.start()

    def held(self) -> bool:
        """Whether the lease file is still ours (its nonce; inode numbers get reused)."""
        return _lease_nonce(self.path) == self.info.nonce

    def _beat(self) -> None:
        while not self._stop.wait(LEASE_HEARTBEAT):
            if not self.held():
                return  # broken while we were stopped: it is someone else's now
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        """Remove the lease if it is still ours (by rename, so a new holder's is never lost)."""
        self._stop.set()
        self._thread.join()
        if not self.held():
            return
        aside = self.locks / f"{self.path.name}.released.{uuid.uuid4().hex[:12]}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        if _lease_nonce(aside) != self.info.nonce:  # taken over between check and rename
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)
        os.unlink(aside)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _lease_nonce(path: Path) -> str | None:
    try:
        return LeaseInfo.model_validate_json(path.read_bytes()).nonce
    except (OSError, pydantic.ValidationError):
        return None


def regular_files(root: Path) -> Iterator[tuple[Path, os.stat_result]]:
    """Every regular file under ``root`` with its ``lstat`` (links are not followed)."""
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            path = Path(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                yield path, st


def _copy_file_data(src: Path, dest: Path, mode: int) -> None:
    """Copy one file's bytes into a new file ``dest`` with ``mode``."""
    with open(src, "rb") as fin:
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            size = os.fstat(fin.fileno()).st_size
            sent = 0
            while sent < size:
                n = os.sendfile(fd, fin.fileno(), sent, size - sent)
                if n == 0:
                    break
                sent += n
            os.fchmod(fd, mode)
        finally:
            os.close(fd)


def remove_unshared(root: Path) -> int:
    """Delete the files under ``root`` that nothing else links (a content pool's objects
    no tree uses any more); how many."""
    count = 0
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            if os.lstat(path).st_nlink == 1:
                os.unlink(path)
                count += 1
    return count


def make_read_only(root: Path) -> None:
    """Drop write permission on every file and directory under ``root`` (bottom-up)."""
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames + dirnames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if not stat.S_ISLNK(st.st_mode) and st.st_mode & 0o222:
                os.chmod(p, stat.S_IMODE(st.st_mode) & ~0o222)
    st = os.lstat(root)
    os.chmod(root, stat.S_IMODE(st.st_mode) & ~0o222)


def remove_tree(root: Path) -> None:
    """Delete a (possibly read-only) tree."""

    def onerror(func: Callable[..., Any], path: str, exc: object) -> None:
        parent = os.path.dirname(path)
        with contextlib.suppress(OSError):
            os.chmod(parent, 0o755)
        if os.path.isdir(path) and not os.path.islink(path):
            with contextlib.suppress(OSError):
                os.chmod(path, 0o755)
        func(path)

    if root.is_dir() and not root.is_symlink():
        os.chmod(root, 0o755)
        shutil.rmtree(root, onerror=onerror)
    elif root.exists() or root.is_symlink():
        root.unlink()


class SnapshotUnreadable(EnvironmentProblem):
    """A built snapshot whose manifest cannot be read or makes no sense (EIO to a reader)."""


class ListingEntry(NamedTuple):
    """One manifest entry as readers of a snapshot keep it."""

    type: str  # "file", "dir" or "symlink"
    mode: int
    size: int
    sha256: str | None
    target: str | None  # a symlink's target


#: A snapshot's entries by directory: relative dir (b"" is the root) -> name -> entry.
Listing = dict[bytes, dict[bytes, ListingEntry]]


def read_listing(snapshot_path: bytes) -> Listing:
    """A built snapshot's manifest, by directory (`Manifest` is the format; this reader
    skips pydantic because it is on the path of a first access to thousands of entries).

    Raises `SnapshotUnreadable` if the manifest is missing or does not make sense.
    """
    manifest = snapshot_path + b"/" + META.encode() + b"/manifest.json"
    try:
        with open(manifest, "rb") as f:
            files = json.loads(f.read())["files"]
        listing: Listing = {b"": {}}
        for e in files:
            rel = os.fsencode(e["path"])
            parent, _, name = rel.rpartition(b"/")
            kind = e["type"]
            listing.setdefault(parent, {})[name] = ListingEntry(
                kind, e["mode"], e["size"], e["sha256"], e["target"]
            )
            if kind == "dir":
                listing.setdefault(rel, {})
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SnapshotUnreadable(
            f"snapshot {os.fsdecode(snapshot_path)}: unreadable manifest "
            f"({type(e).__name__}: {e}); run `envfs verify`"
        ) from e
    return listing
