"""The content pool (``objects/``): files a build generates, hardlinked by content so
envs share them as they share uv's cache; and the bytecode links (``bytecode/``) into it."""

from __future__ import annotations

import contextlib
import os
import stat
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from envfs.core.errors import EnvironmentProblem
from envfs.store.base import StoreBase
from envfs.store.files import _copy_file_data
from envfs.store.formats import ManifestEntry


class Pool(StoreBase):
    """The content pool and the bytecode links into it."""

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
