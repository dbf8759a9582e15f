"""The tree a build leaves: scripts made relocatable (and their RECORD rows), generated
files pooled by content, the manifest scan, the check against the wheels' RECORDs, and the
tree digest."""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import os
import stat
from pathlib import Path
from typing import Protocol

from envfs.core.errors import BuildFailed
from envfs.store.files import META
from envfs.store.formats import ManifestEntry
from envfs.store.layout import Store
from envfs.store.wheel import record_digests

#: How uv makes a console script relocatable: ``/bin/sh`` runs the interpreter next to the
#: script's real path, which then reads the rest of the file as Python.
_TRAMPOLINE = (
    "#!/bin/sh\n"
    '\'\'\'exec\' "$(dirname -- "$(realpath -- "$0")")"/\'{python}\' "$0" "$@"\n'
    "' '''\n"
)


def relocate_scripts(prefix: Path, site_packages: Path) -> list[str]:
    """Give console scripts that name ``prefix`` in their shebang a relocatable trampoline.

    An installer writes ``#!<prefix>/bin/python`` into the scripts of a non-venv prefix; the
    trampoline finds the interpreter next to the script wherever the env is served.  The
    wheels' RECORDs are updated to the new contents.  Returns the scripts rewritten.
    """
    bin_dir = prefix / "bin"
    rewritten: dict[str, bytes] = {}
    for entry in sorted(os.scandir(bin_dir), key=lambda e: e.name):
        if not entry.is_file(follow_symlinks=False):
            continue
        with open(entry.path, "rb") as f:
            data = f.read()
        found = _script_header(data, str(prefix).encode())
        if found is None:
            continue
        python, rest = found
        new = _TRAMPOLINE.format(python=python).encode() + rest
        tmp = f"{entry.path}.envfs-tmp"
        with open(tmp, "wb") as f:
            f.write(new)
        os.chmod(tmp, 0o755)
        os.replace(tmp, entry.path)
        rewritten[entry.name] = new
    if rewritten:
        _update_records(site_packages, bin_dir, rewritten)
    return sorted(rewritten)


def _script_header(data: bytes, prefix: bytes) -> tuple[str, bytes] | None:
    """(interpreter name, the script after its header) if the header names ``prefix``.

    Installers write ``#!<prefix>/bin/python``, or, for a path too long for a shebang, a
    ``/bin/sh`` header that execs ``'<prefix>/bin/python'``.
    """
    lines = data.split(b"\n", 3)
    if lines[0].startswith(b"#!" + prefix + b"/"):
        return os.path.basename(lines[0][2:].split()[0].decode()), data.partition(b"\n")[2]
    quoted = b"'" * 3 + b"exec' '" + prefix + b"/"
    if len(lines) == 4 and lines[0] == b"#!/bin/sh" and lines[1].startswith(quoted):
        return os.path.basename(lines[1].split(b"'")[5].decode()), lines[3]
    return None


def _update_records(site_packages: Path, bin_dir: Path, rewritten: dict[str, bytes]) -> None:
    """Put the new hash and size of rewritten scripts into the RECORD files naming them."""
    for record in site_packages.glob("*.dist-info/RECORD"):
        rows = list(csv.reader(io.StringIO(record.read_text())))
        changed = False
        for row in rows:
            if len(row) < 3:
                continue
            path = os.path.normpath(site_packages / row[0])
            name = os.path.basename(path)
            if os.path.dirname(path) == str(bin_dir) and name in rewritten:
                data = rewritten[name]
                digest = hashlib.sha256(data).digest()
                row[1] = "sha256=" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
                row[2] = str(len(data))
                changed = True
        if changed:
            out = io.StringIO()
            csv.writer(out, lineterminator="\n").writerows(rows)
            tmp = record.with_name("RECORD.envfs-tmp")
            tmp.write_text(out.getvalue())
            os.replace(tmp, record)


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def dedup_into_objects(
    store: Store, root: Path, known: dict[tuple[int, int], str] | None = None
) -> int:
    """Hardlink files made by the build (not from uv's cache) into ``objects/``.

    Bytecode, RECORDs and entry-point scripts are identical across envs that share a
    package; the content-addressed pool makes them one inode like uv's cache does.
    The digests computed are added to ``known`` (by device and inode).
    Returns the number of files replaced by an existing object.
    """
    reused = 0
    for dirpath, _dirs, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_size == 0:
                continue
            mode = stat.S_IMODE(st.st_mode) & ~0o222
            digest = _sha256_file(path)
            reused += store.pool_file(path, digest, mode)
            if known is not None:
                st = os.lstat(path)
                known[(st.st_dev, st.st_ino)] = digest
    return reused


class DigestCache(Protocol):
    """Digests of files by inode, size and mtime (the node's index keeps them)."""

    def cached_digest(self, st: os.stat_result) -> str | None: ...

    def remember_digests(self, items: list[tuple[os.stat_result, str]]) -> None: ...


def scan_tree(
    root: Path,
    forbidden: list[bytes],
    known: dict[tuple[int, int], str] | None = None,
    cache: DigestCache | None = None,
) -> tuple[list[ManifestEntry], int]:
    """Every entry under ``root`` (but ``.envfs``), with sha256 of files; check no file
    contains a ``forbidden`` path (the staging dir): that would name the builder.

    ``known`` gives digests of files already hashed (by device and inode), such as those
    linked from a captured interpreter: they are neither read again nor searched.
    ``cache`` does the same across builds for files shared with uv's cache (hardlinks,
    unchanged since hashed): wheels' files, which cannot name a staging dir.
    """
    known = known or {}
    learned: list[tuple[os.stat_result, str]] = []
    entries: list[ManifestEntry] = []
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        if rel_dir == ".":
            dirnames[:] = [d for d in dirnames if d != META]
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            rel = os.path.normpath(os.path.join(rel_dir, name))
            st = os.lstat(path)
            mode = stat.S_IMODE(st.st_mode) & ~0o222
            if stat.S_ISLNK(st.st_mode):
                target = os.readlink(path)
                entries.append(ManifestEntry(path=rel, type="symlink", mode=0o777, target=target))
                continue
            if stat.S_ISDIR(st.st_mode):
                entries.append(ManifestEntry(path=rel, type="dir", mode=mode))
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            digest = known.get((st.st_dev, st.st_ino))
            shared = st.st_nlink > 1 and cache is not None
            if digest is None and shared and cache is not None:
                digest = cache.cached_digest(st)
            if digest is None:
                with open(path, "rb") as f:
                    data = f.read()
                for needle in forbidden:
                    if needle in data:
                        raise BuildFailed(
                            f"{rel} contains the builder path {needle.decode()}: the snapshot "
                            "would not be relocatable (please report this package)"
                        )
                digest = hashlib.sha256(data).hexdigest()
                if shared:
                    learned.append((st, digest))
            entries.append(
                ManifestEntry(path=rel, type="file", mode=mode, size=st.st_size, sha256=digest)
            )
            total += st.st_size
    if learned and cache is not None:
        cache.remember_digests(learned)
    entries.sort(key=lambda e: e.path)
    return entries, total


def check_records(root: Path, entries: list[ManifestEntry]) -> None:
    """Every installed file must match its wheel's ``RECORD``: a damaged uv cache entry fails
    the build naming the file, instead of being hardlinked into the snapshot and blessed by
    its manifest.  (Digests come from the manifest scan: nothing is hashed twice.)"""
    digests = {e.path: e.sha256 for e in entries if e.type == "file"}
    for record in sorted(root.glob("lib/python*/site-packages/*.dist-info/RECORD")):
        site = record.parent.parent
        for path, want in record_digests(record):
            rel = os.path.normpath(os.path.relpath(site / path, root))
            got = digests.get(rel)
            if got is not None and got != want:
                dist = record.parent.name.split("-")[0]
                raise BuildFailed(
                    f"{rel} does not match its wheel's RECORD (the uv cache entry of {dist} "
                    f"is damaged): run `UV_CACHE_DIR=<store>/uv-cache uv cache clean {dist}` "
                    "and build again"
                )


def tree_digest(entries: list[ManifestEntry]) -> str:
    """sha256 over (path, type, mode, content digest or link target) of every entry."""
    h = hashlib.sha256()
    for e in entries:
        h.update(json.dumps([e.path, e.type, e.mode, e.sha256, e.target]).encode() + b"\n")
    return h.hexdigest()
