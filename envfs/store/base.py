"""The store's ground floor, under every part of `Store`: its directories, creating the
layout, the store's clock, atomic files and typed records.

Every write is atomic: a file is written under ``staging/`` and then renamed or hard-linked
into place, so a crash leaves the old state or the new one, never half."""

from __future__ import annotations

import os
import threading
import uuid
from pathlib import Path
from typing import Self, TypeVar

import pydantic

from envfs.core.errors import CorruptRecord, EnvironmentProblem
from envfs.core.records import Record
from envfs.store.files import make_private
from envfs.store.formats import LAYOUT_VERSION, StoreConfig

R = TypeVar("R", bound=Record)

#: Directories of lock and lease files: the store's owner only, so that no other user of a
#: node can open (and ``flock``) them.
PRIVATE_DIRS = ("locks", "leases")


class StoreBase:
    """The directories of one store, its clock, and atomic files and records."""

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
        "acls",
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

    def ensure(self) -> Self:
        """Create the layout if missing (idempotent, safe to race)."""
        try:
            for sub in self.SUBDIRS:
                (self.root / sub).mkdir(parents=True, exist_ok=True)
            for sub in PRIVATE_DIRS:
                make_private(self.root / sub)
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

    @property
    def uuid(self) -> str:
        if self._uuid is None:
            self._uuid = self.config().uuid
        return self._uuid

    def exists(self) -> bool:
        return (self.root / "envfs.toml").exists()

    def config(self) -> StoreConfig:
        """``envfs.toml``: the store's format, uuid and defaults (`StoreConfig`)."""
        import tomllib

        path = self.root / "envfs.toml"
        try:
            return StoreConfig.model_validate(tomllib.loads(path.read_text()))
        except (tomllib.TOMLDecodeError, pydantic.ValidationError) as exc:
            raise CorruptRecord(f"{path}: {exc}".splitlines()[0]) from None

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

    def store_now(self) -> float:
        """The store's clock: the mtime a file written now gets there (not this node's)."""
        probe = self.leases / f".clock.{uuid.uuid4().hex[:12]}"
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            return os.fstat(fd).st_mtime
        finally:
            os.close(fd)
            os.unlink(probe)
