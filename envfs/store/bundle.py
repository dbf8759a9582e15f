"""Bundles: one file that carries a built snapshot to another store (``envfs export`` /
``envfs import``), a tar compressed with zstd. This module owns the format.

Entries, sorted by name, each with mtime 0, owner 0:0, no user or group names, and its
mode as in the store (so one snapshot always gives the same bytes)::

    envfs-bundle.json   `BundleInfo`: what the bundle holds
    sbom.cdx.json       its CycloneDX SBOM (`envfs.build.sbom`), for people and scanners
    interpreter/...     ``interpreters/<digest>/`` of a self-contained snapshot, with its
                        ``.envfs/interpreter.json`` (every file and digest)
    snapshot/...        ``snapshots/<id>/``, with its ``.envfs/`` (manifest, trace, log)
    spec/...            ``specs/<id>/``: spec.json, pyproject.toml, uv.lock (and a wheel)

A file the snapshot shares with its interpreter (one inode in the store) is a hard link
entry, stored once. Reading extracts into a new directory and trusts nothing: only
directories, regular files, symbolic links and hard links to files read before; no
absolute name, no ``..``, nothing below a symbolic link; any damage (zstd's checksum, a
truncated tar) is one `BadBundle` line. Checking the contents against their manifests is
the importer's (`envfs.service.travel`).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import IO

from envfs.core.errors import BadInput, EnvironmentProblem
from envfs.store.files import META, PACKS, fixed_tarinfo
from envfs.store.formats import BundleInfo

INFO_NAME = "envfs-bundle.json"
#: zstd level: fast to write, and the same input always gives the same bytes (one thread).
ZSTD_LEVEL = 6


class BadBundle(BadInput):
    """A bundle that is damaged, truncated, tampered with or not a bundle at all."""


def _zstd() -> str:
    found = shutil.which("zstd")
    if found is None:
        raise EnvironmentProblem("zstd is not installed (Debian: apt-get install zstd)")
    return found


def write_bundle(
    out: IO[bytes],
    info: BundleInfo,
    parts: list[tuple[str, Path]],
    progress: Callable[[int, int], None] | None = None,
    documents: dict[str, bytes] | None = None,
) -> int:
    """Write a bundle of ``parts`` (name prefix in the bundle, directory in the store) to
    ``out``, with ``documents`` (name -> bytes: the SBOM) after its head; the number of
    entries."""
    entries: list[tuple[str, Path, os.stat_result]] = []
    for prefix, root in parts:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            rel = os.path.relpath(dirpath, root)
            if rel == META:  # a snapshot's packs are copies, for fresh nodes of its store
                dirnames[:] = [d for d in dirnames if d != PACKS]
            base = prefix if rel == "." else f"{prefix}/{rel}"
            entries.append((base, Path(dirpath), os.lstat(dirpath)))
            for name in sorted(
                filenames + [d for d in dirnames if os.path.islink(Path(dirpath, d))]
            ):
                path = Path(dirpath, name)
                entries.append((f"{base}/{name}", path, os.lstat(path)))
    entries.sort(key=lambda e: e[0])
    blob = info.model_dump_json(indent=1).encode() + b"\n"
    proc = subprocess.Popen(
        [_zstd(), "-q", "-T1", f"-{ZSTD_LEVEL}", "-c"], stdin=subprocess.PIPE, stdout=out
    )
    assert proc.stdin is not None
    try:
        with tarfile.open(fileobj=proc.stdin, mode="w|", format=tarfile.GNU_FORMAT) as tar:
            for name, data in [(INFO_NAME, blob), *sorted((documents or {}).items())]:
                head = fixed_tarinfo(name, tarfile.REGTYPE, 0o444, size=len(data))
                tar.addfile(head, _BytesReader(data))
            first: dict[tuple[int, int], str] = {}
            for done, (name, path, st) in enumerate(entries, 1):
                _add(tar, name, path, st, first)
                if progress is not None and (done % 2000 == 0 or done == len(entries)):
                    progress(done, len(entries))
    finally:
        proc.stdin.close()
        code = proc.wait()
    if code != 0:
        raise EnvironmentProblem(f"zstd failed (exit {code}) writing the bundle")
    return len(entries) + 1


def _add(
    tar: tarfile.TarFile,
    name: str,
    path: Path,
    st: os.stat_result,
    first: dict[tuple[int, int], str],
) -> None:
    mode = stat.S_IMODE(st.st_mode)
    if stat.S_ISDIR(st.st_mode):
        tar.addfile(fixed_tarinfo(name, tarfile.DIRTYPE, mode))
    elif stat.S_ISLNK(st.st_mode):
        tar.addfile(fixed_tarinfo(name, tarfile.SYMTYPE, 0o777, linkname=os.readlink(path)))
    elif stat.S_ISREG(st.st_mode):
        key = (st.st_dev, st.st_ino)
        if key in first:
            tar.addfile(fixed_tarinfo(name, tarfile.LNKTYPE, mode, linkname=first[key]))
            return
        first[key] = name
        with open(path, "rb") as f:
            tar.addfile(fixed_tarinfo(name, tarfile.REGTYPE, mode, size=st.st_size), f)
    else:
        raise EnvironmentProblem(f"{path}: not a file, directory or symlink; cannot bundle it")


class _BytesReader:
    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)

    def read(self, size: int = -1) -> bytes:
        size = len(self._data) if size < 0 else size
        out, self._data = bytes(self._data[:size]), self._data[size:]
        return out


def _safe(name: str) -> str:
    path = PurePosixPath(name)
    if path.is_absolute() or not path.parts or any(p in ("..", ".", "") for p in path.parts):
        raise BadBundle(f"bundle entry {name!r} is not a plain relative path")
    return str(path)


def read_bundle(source: IO[bytes], dest: Path) -> BundleInfo:
    """Extract a bundle read from ``source`` into ``dest`` (a new, empty directory); what
    it says it holds. `BadBundle` if it is not an intact bundle."""
    proc = subprocess.Popen(
        [_zstd(), "-d", "-q", "-c"], stdin=source, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stderr is not None
    files: set[str] = set()
    links: set[str] = set()
    modes: list[tuple[Path, int]] = []
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                _extract(tar, member, dest, files, links, modes)
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        proc.kill()
        proc.wait()
        why = proc.stderr.read().decode(errors="replace").strip().splitlines()
        detail = why[-1] if why else f"{type(exc).__name__}: {exc}"
        raise BadBundle(f"not an intact envfs bundle (damaged or truncated): {detail}") from None
    finally:
        proc.stdout.close()
    code = proc.wait()
    why = proc.stderr.read().decode(errors="replace").strip().splitlines()
    proc.stderr.close()
    if code != 0:
        detail = why[-1] if why else f"zstd exit {code}"
        raise BadBundle(f"not an intact envfs bundle (damaged or truncated): {detail}")
    for path, mode in reversed(modes):  # deepest first: a read-only dir is set up last
        os.chmod(path, mode, follow_symlinks=False)
    try:
        return BundleInfo.model_validate_json((dest / INFO_NAME).read_bytes())
    except (OSError, ValueError) as exc:
        raise BadBundle(f"the bundle has no readable {INFO_NAME} ({type(exc).__name__})") from None


def _extract(
    tar: tarfile.TarFile,
    member: tarfile.TarInfo,
    dest: Path,
    files: set[str],
    links: set[str],
    modes: list[tuple[Path, int]],
) -> None:
    name = _safe(member.name)
    parents = PurePosixPath(name).parents
    if any(str(p) in links or str(p) in files for p in parents):
        raise BadBundle(f"bundle entry {name!r} is below a link or a file")
    target = dest / name
    if member.isdir():
        target.mkdir(mode=0o700, parents=True, exist_ok=True)
        modes.append((target, stat.S_IMODE(member.mode)))
        return
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if member.isreg():
        src = tar.extractfile(member)
        assert src is not None
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
        os.chmod(target, stat.S_IMODE(member.mode))
        files.add(name)
    elif member.issym():
        os.symlink(member.linkname, target)
        links.add(name)
    elif member.islnk():
        source = _safe(member.linkname)
        if source not in files:
            raise BadBundle(f"bundle entry {name!r} links to {source!r}, not a file before it")
        os.link(dest / source, target)
        files.add(name)
    else:
        raise BadBundle(f"bundle entry {name!r} is not a file, directory or link")
