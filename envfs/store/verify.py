"""Checking the store: snapshots against their manifests, uv's cache against wheels' RECORDs.

Every check reports what it finds and goes on: one unreadable manifest does not stop the
others.  Problems name paths relative to the snapshot (or to ``uv-cache/``), so an operator
knows what to rebuild.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from envfs.core.errors import CorruptRecord, EnvfsError
from envfs.store.files import META, PACKS, read_packs, read_trace
from envfs.store.formats import Manifest, ManifestEntry, Revision, SpecInfo
from envfs.store.layout import Store
from envfs.store.wheel import record_digests

_SPECIAL = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


def snapshot_problems(store: Store, snapshot_id: str) -> list[str]:
    """What differs between ``snapshots/<id>`` and its manifest, and what its spec lacks
    (``specs/<id>/``: what it was built from, what a rebuild needs); empty when intact."""
    root = store.snapshot_dir(snapshot_id)
    problems = spec_problems(store, snapshot_id)
    try:
        manifest = store.read_manifest(snapshot_id)
    except EnvfsError as exc:
        return [f"manifest unreadable: {exc.message}", *problems]
    found = tree_problems(root, manifest.files) + _trace_problems(root, manifest)
    return found + _pack_problems(root, manifest) + problems


def _trace_problems(root: Path, manifest: Manifest) -> list[str]:
    """A damaged access trace (``.envfs/trace.json``): nodes ignore it and serve the env
    without a head start, so it is named, not fatal."""
    if not (root / META / "trace.json").exists():
        return []
    trace = read_trace(os.fsencode(root))
    if trace is None:
        return [f"{META}/trace.json: unreadable (fresh nodes prefetch nothing)"]
    files = {e.path for e in manifest.files if e.type == "file"}
    strangers = [rel for rel in [*trace.files, *trace.ranges] if rel not in files]
    if strangers:
        return [f"{META}/trace.json: names {strangers[0]}, not a file of the snapshot"]
    sizes = {e.path: e.size for e in manifest.files}
    for rel, ranges in trace.ranges.items():  # a range past the file: its copy would be short
        if any(not 0 <= start < end <= sizes[rel] for start, end in ranges):
            return [f"{META}/trace.json: a range of {rel} is not within the file"]
    return []


def _pack_problems(root: Path, manifest: Manifest) -> list[str]:
    """Damaged packs (``.envfs/packs/``): a fresh node skips what does not match and copies
    those files one by one, so they are named, not fatal."""
    if not (root / META / "packs.json").exists():
        return []
    index = read_packs(os.fsencode(root))
    if index is None:
        return [f"{META}/packs.json: unreadable (fresh nodes copy files one by one)"]
    files = {e.path: e for e in manifest.files if e.type == "file"}
    problems = []
    for pack in index.packs:
        rel = f"{META}/{PACKS}/{pack.sha256}.pack"
        stray = [m.path for m in pack.members if (e := files.get(m.path)) is None
                 or (e.sha256, e.size) != (m.sha256, m.size)]  # fmt: skip
        if stray:
            problems.append(f"{rel}: names {stray[0]}, not that file of the snapshot")
            continue
        try:
            with open(root / rel, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
        except OSError as exc:
            problems.append(f"{rel}: unreadable ({exc.strerror})")
            continue
        if digest != pack.sha256:
            problems.append(f"{rel}: does not match its name (fresh nodes skip what differs)")
    return problems


def spec_problems(store: Store, snapshot_id: str) -> list[str]:
    """A missing or unreadable ``spec.json``, ``pyproject.toml`` or ``uv.lock``."""
    spec_dir = store.spec_dir(snapshot_id)
    problems = []
    try:
        store.read_model(spec_dir / "spec.json", SpecInfo)
    except FileNotFoundError:
        problems.append(f"specs/{snapshot_id}/spec.json: missing")
    except CorruptRecord as exc:
        problems.append(exc.message)
    for name in ("pyproject.toml", "uv.lock"):
        if not (spec_dir / name).is_file():
            problems.append(f"specs/{snapshot_id}/{name}: missing")
    return problems


def corrupt_records(store: Store) -> list[str]:
    """Every binding revision file that cannot be read, one line each (the file and why);
    the commands that go over every binding skip these. And the index checkpoint, if it
    is damaged (a fresh node then reads the logs: slower, not wrong)."""
    checkpoint = store.checkpoint_problem()
    out = [] if checkpoint is None else [checkpoint]
    for wf, node in store.binding_names():
        for number in store.revision_numbers(wf, node):
            try:
                store.read_model(store.binding_dir(wf, node) / f"{number}.json", Revision)
            except CorruptRecord as exc:
                out.append(exc.message)
            except FileNotFoundError:
                continue  # removed meanwhile
    return out


def tree_problems(root: Path, files: list[ManifestEntry]) -> list[str]:
    """What differs between the tree at ``root`` (its ``.envfs/`` aside) and ``files``."""
    want = {e.path: e for e in files}
    problems: list[str] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        if rel_dir == ".":
            dirnames[:] = [d for d in dirnames if d != META]
        for name in sorted(dirnames + filenames):
            rel = os.path.normpath(os.path.join(rel_dir, name))
            seen.add(rel)
            got = _entry(Path(dirpath, name), rel)
            if isinstance(got, str):
                problems.append(f"{got}: {rel}")
            elif rel not in want:
                problems.append(f"unexpected: {rel}")
            elif got != want[rel]:
                problems.append(f"changed: {rel}")
    problems += [f"missing: {p}" for p in sorted(want.keys() - seen)]
    return problems


def _entry(path: Path, rel: str) -> ManifestEntry | str:
    st = os.lstat(path)
    kind = stat.S_IFMT(st.st_mode)
    mode = stat.S_IMODE(st.st_mode) & ~0o222
    if kind in _SPECIAL:
        return f"special file ({_SPECIAL[kind]})"
    if stat.S_ISLNK(st.st_mode):
        return ManifestEntry(path=rel, type="symlink", mode=0o777, target=os.readlink(path))
    if stat.S_ISDIR(st.st_mode):
        return ManifestEntry(path=rel, type="dir", mode=mode)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return ManifestEntry(
        path=rel, type="file", mode=mode, size=st.st_size, sha256=digest.hexdigest()
    )


def uv_cache_problems(store: Store) -> tuple[int, list[str]]:
    """Files of unpacked wheels in uv's cache that differ from their ``RECORD``.

    Returns how many files were checked and the problems, as paths under ``uv-cache/``.
    """
    checked = 0
    problems: list[str] = []
    archives = store.uv_cache / "archive-v0"
    try:
        entries = sorted(os.scandir(archives), key=lambda e: e.name)
    except FileNotFoundError:
        return 0, []
    for archive in entries:
        if not archive.is_dir(follow_symlinks=False):
            continue
        root = Path(archive.path)
        for record in sorted(root.glob("*.dist-info/RECORD")):
            for name, want in record_digests(record):
                rel = f"archive-v0/{archive.name}/{name}"
                checked += 1
                try:
                    data = (root / name).read_bytes()
                except FileNotFoundError:
                    problems.append(f"missing: {rel}")
                    continue
                if hashlib.sha256(data).hexdigest() != want:
                    problems.append(f"changed: {rel}")
    return checked, problems
