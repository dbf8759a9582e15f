"""The index checkpoint: the change feed up to a cursor as a node's index holds it, so that a
fresh node learns every binding in one large read instead of parsing every log line (as a
CernVM-FS client loads a published catalog instead of replaying changes).

    checkpoint/current.json    the current one (`envfs.store.formats.IndexCheckpoint`)
    checkpoint/<sha256>.mdb    an LMDB file of an index's shared tables and its feed cursor
                               (`envfs.node.checkpoints` owns what is in it)
    checkpoint/claim           a writer at work (created exclusively; stale after CLAIM_STALE)

A checkpoint is a hint, as the logs are: a node that cannot read one, or whose copy does
not match its sha256 and size, seeds from the logs as before, and a node reads the logs
after the checkpoint's cursor either way. Any caught-up node may write one (`envfs index
checkpoint`; a daemon when the logs grew past the last one by `envfs.node.checkpoints.LAG`
bytes); one at a time (the claim), each a new file made current by one rename of
``current.json``, older files removed once no fresh node can still be copying them.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from envfs.core.errors import CorruptRecord
from envfs.store.base import StoreBase
from envfs.store.formats import IndexCheckpoint

log = logging.getLogger(__name__)

CURRENT = "current.json"
CLAIM = "claim"
#: A claim older than this is a dead writer's (a write takes seconds).
CLAIM_STALE = 600.0
#: A replaced checkpoint file is removed once it is this old (a copy takes seconds).
KEEP_REPLACED = 600.0
#: Bytes per read of a checkpoint: a NAS serves a few large reads fastest.
CHUNK = 8 << 20


def copy_digest(src: Path, dest: Path | None = None, sync: bool = False) -> tuple[str, int]:
    """The sha256 and size of ``src``, read in `CHUNK` reads, each also written to ``dest``
    (a new file; with ``sync``, flushed to disk) if one is given."""
    digest = hashlib.sha256()
    size = 0
    with open(src, "rb", buffering=0) as f, contextlib.ExitStack() as stack:
        out = stack.enter_context(open(dest, "wb")) if dest is not None else None
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
            if out is not None:
                out.write(chunk)
        if out is not None and sync:
            out.flush()
            os.fsync(out.fileno())
    return digest.hexdigest(), size


class Checkpoints(StoreBase):
    @property
    def checkpoint_dir(self) -> Path:
        return self.root / "checkpoint"

    def checkpoint(self) -> IndexCheckpoint | None:
        """The current checkpoint; None if there is none or it cannot be read (said once)."""
        try:
            return self.read_model(self.checkpoint_dir / CURRENT, IndexCheckpoint)
        except FileNotFoundError:
            return None
        except CorruptRecord as exc:
            log.warning("%s: ignored", exc)
            return None

    def fetch_checkpoint(self, info: IndexCheckpoint, dest: Path) -> bool:
        """Copy the checkpoint's file to ``dest`` (node-local) in large reads, checked against
        its sha256 and size; False, with ``dest`` removed and a warning, if it is gone or
        does not match (then it is not used)."""
        src = self.checkpoint_dir / info.file
        try:
            sha256, size = copy_digest(src, dest)
        except FileNotFoundError:
            log.info("checkpoint %s was replaced meanwhile: seeding from the logs", src)
            dest.unlink(missing_ok=True)
            return False
        if size != info.size or sha256 != info.sha256:
            log.warning(
                "checkpoint %s is damaged (%d bytes, sha256 %s; want %d, %s): ignored",
                src, size, sha256[:12], info.size, info.sha256[:12],
            )  # fmt: skip
            dest.unlink(missing_ok=True)
            return False
        return True

    def checkpoint_problem(self) -> str | None:
        """What is wrong with the current checkpoint, in one line (`envfs verify`); None if
        there is none or it is whole."""
        try:
            info = self.read_model(self.checkpoint_dir / CURRENT, IndexCheckpoint)
        except FileNotFoundError:
            return None
        except CorruptRecord as exc:
            return f"{exc.message} (fresh nodes read the logs instead)"
        path = self.checkpoint_dir / info.file
        try:
            sha256, size = copy_digest(path)
        except OSError as exc:
            return f"{path} is unreadable: {exc.strerror} (fresh nodes read the logs instead)"
        if (sha256, size) != (info.sha256, info.size):
            return (
                f"{path} does not match its record ({size} bytes, sha256 {sha256[:12]}; want "
                f"{info.size}, {info.sha256[:12]}): fresh nodes read the logs instead; "
                "`envfs index checkpoint` writes a new one"
            )
        return None

    @contextlib.contextmanager
    def checkpoint_claim(self) -> Iterator[bool]:
        """Whether this process may write the next checkpoint: no other writer is at work
        (a claim file created exclusively, removed after; a dead writer's goes stale)."""
        self.checkpoint_dir.mkdir(exist_ok=True)
        claim = self.checkpoint_dir / CLAIM
        try:
            fd = os.open(claim, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            with contextlib.suppress(FileNotFoundError):
                if self.store_now() - claim.stat().st_mtime > CLAIM_STALE:
                    claim.unlink()  # the next one to ask takes it
            yield False
            return
        os.close(fd)
        try:
            yield True
        finally:
            claim.unlink(missing_ok=True)

    def publish_checkpoint(self, local: Path, **fields: object) -> IndexCheckpoint:
        """Publish a node-local checkpoint file with its record's other ``fields``: copied
        into the store (hashed as it is copied), renamed to its sha256, then made current
        by one rename."""
        self.checkpoint_dir.mkdir(exist_ok=True)
        tmp = self._temp("checkpoint.mdb")
        try:
            sha256, size = copy_digest(local, tmp, sync=True)
            info = IndexCheckpoint.model_validate(
                dict(fields, file=f"{sha256}.mdb", sha256=sha256, size=size)
            )
            os.replace(tmp, self.checkpoint_dir / info.file)
        finally:
            tmp.unlink(missing_ok=True)
        self.replace_file(self.checkpoint_dir / CURRENT, info.model_dump_json(indent=2).encode())
        self._remove_replaced(info.file)
        return info

    def _remove_replaced(self, current: str) -> None:
        now = self.store_now()
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.checkpoint_dir):
                if entry.name.endswith(".mdb") and entry.name != current:
                    with contextlib.suppress(FileNotFoundError):
                        if now - entry.stat().st_mtime > KEEP_REPLACED:
                            os.unlink(entry.path)
