"""The store: the shared directory that is the source of truth (`Store`).

`Store` is its parts together: the ground floor (`base`: directories, atomic files,
records), bindings (`bindings`), the content pool (`pool`) and leases and the gc fence
(`leases`); here are specs, snapshots, interpreters, failures, trash, the change feed and
staging upkeep. Every write is atomic (see `base`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from envfs.core.errors import EnvironmentProblem, NotFound
from envfs.store import feed
from envfs.store.acls import Acls
from envfs.store.bindings import Bindings
from envfs.store.checkpoint import Checkpoints
from envfs.store.files import META, make_read_only, remove_tree
from envfs.store.formats import AuditEvent, FailureInfo, InterpreterInfo, Manifest, SpecInfo
from envfs.store.leases import Leases
from envfs.store.pool import Pool

log = logging.getLogger(__name__)

#: Bytes set aside for a build's failure record (its log is cut to fit).
FAILURE_ROOM = 64 * 1024


def _libc_syncfs(fd: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.syncfs(fd) == 0:
            return
    except (OSError, AttributeError):
        pass
    os.sync()


def closest_spec(
    specs: Iterable[SpecInfo],
    reqs: list[str],
    interpreter: str,
    indexes: tuple[str | None, list[str]],
) -> SpecInfo | None:
    """Of ``specs`` (newest first), the requirement-list spec for this interpreter digest and
    these indexes (default, extra) sharing the most requirements with ``reqs`` (the newest
    of equals); None if none shares any. Where a new list's lock starts from."""
    wanted = set(reqs)
    best: tuple[int, SpecInfo] | None = None
    for info in specs:
        if info.kind != "requirements" or info.interpreter.digest != interpreter:
            continue
        if (info.index_url, info.extra_index_urls) != indexes:
            continue
        score = len(wanted & set(info.requirements))
        if score and (best is None or score > best[0]):
            best = (score, info)
    return None if best is None else best[1]


class Store(Acls, Bindings, Checkpoints, Pool, Leases):
    """One store directory (see docs/architecture.md for the layout)."""

    # -- specs ----------------------------------------------------------------------------

    def spec_dir(self, snapshot_id: str) -> Path:
        return self.specs / snapshot_id

    def write_spec(
        self, info: SpecInfo, pyproject: str, lock: str, extra: Path | None = None
    ) -> bool:
        """Publish ``specs/<id>/`` (pyproject.toml, uv.lock, spec.json, and the ``extra``
        file, the project's wheel, if any) if not there yet; whether this call did."""
        final = self.spec_dir(info.snapshot_id)
        if (final / "spec.json").exists():
            return False
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
            return False
        return True

    def spec_ids(self) -> list[str]:
        """Every snapshot id with a spec (built, bound, or resolved only), sorted."""
        try:
            return sorted(n for n in os.listdir(self.specs) if not n.startswith("."))
        except FileNotFoundError:
            return []

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

        def specs() -> Iterator[SpecInfo]:
            for entry in entries[:scan]:
                try:
                    yield self.read_model(Path(entry.path) / "spec.json", SpecInfo)
                except (FileNotFoundError, EnvironmentProblem):
                    continue

        best = closest_spec(specs(), reqs, interpreter, indexes)
        if best is None:
            return None
        return best, (self.spec_dir(best.snapshot_id) / "uv.lock").read_text()

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

    # -- trash ----------------------------------------------------------------------------

    def trash_snapshot(self, snapshot_id: str, now: float) -> Path:
        """Move a snapshot to ``trash/`` (one rename); the name records when (store clock)."""
        dest = self.trash / f"snapshot-{snapshot_id}.{int(now)}.{uuid.uuid4().hex[:8]}"
        os.rename(self.snapshot_dir(snapshot_id), dest)
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

    # -- the change feed (envfs.store.feed owns its format) ---------------------------------

    def audit(self, event: str, host: str, snapshot_id: str | None = None, **fields: Any) -> None:
        """Append one event to this host's log (``log/<host>.jsonl``)."""
        feed.append(self.log_dir, host, event, snapshot_id, **fields)

    def changes_since(self, cursor: feed.Cursor) -> feed.Changes:
        return feed.changes_since(self.log_dir, cursor)

    def scan_since(self, cursor: feed.Cursor) -> feed.Scan:
        return feed.scan_since(self.log_dir, cursor)

    def feed_end(self) -> feed.Cursor:
        return feed.end_cursor(self.log_dir)

    def events(self) -> list[AuditEvent]:
        """Every event of every host, in time order."""
        return feed.all_events(self.log_dir)

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
