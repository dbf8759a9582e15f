"""Compile once per content: bytecode reused across builds through the store's pool.

A pyc that envfs compiles (unchecked-hash, neutral path) depends on three things only: the
interpreter (its captured digest fixes the magic number and the compiler), the source's path
inside the env (compiled in as ``/lib/python3.X/site-packages/...``) and the source bytes.
Their digest is the key of ``bytecode/<xx>/<key>``, a symlink to the object in ``objects/``
that holds the compiled bytes.  A build links every pyc it finds there and compiles only
the rest, in parallel, and adds those to the pool: the served tree is byte for byte the one a
build from scratch makes (tested), as compilation is deterministic.

A pooled object is read and checked against its digest before it is linked into a new
snapshot; a damaged one is moved to ``trash/`` and its source compiled again, so damage in
the pool is not spread.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from envfs.store.layout import Store

#: Bumped if the way envfs compiles changes (flags, invalidation mode): new keys follow.
KEY_VERSION = 1

Known = dict[tuple[int, int], str]
Compile = Callable[[list[Path]], None]


@dataclass(slots=True)
class Stats:
    sources: int = 0
    reused: int = 0
    compiled: int = 0
    damaged: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        text = f"bytecode: {self.sources} modules, {self.reused} reused, {self.compiled} compiled"
        if self.damaged:
            text += f", {self.damaged} damaged pool entries replaced"
        return text


def key_of(interpreter: str, rel_path: str, source_digest: str) -> str:
    """The pool key of one module's bytecode (``rel_path`` as compiled in, e.g. ``/lib/…``)."""
    blob = json.dumps([KEY_VERSION, interpreter, rel_path, source_digest])
    return hashlib.sha256(blob.encode()).hexdigest()


def _object_digest(obj: Path) -> str:
    return obj.name.split(".", 1)[0]


def compile_with_pool(
    store: Store,
    root: Path,
    target: Path,
    interpreter: str,
    cache_tag: str,
    compile_files: Compile,
    known: Known,
    say: Callable[[str], None],
    cached: Callable[[os.stat_result], str | None] | None = None,
    learn: Callable[[list[tuple[os.stat_result, str]]], None] | None = None,
) -> Stats:
    """Give every ``.py`` under ``target`` its pyc: linked from the pool, or compiled.

    ``compile_files`` compiles a list of sources in place (see `envfs.build.builder`).  Source and
    bytecode digests computed here go into ``known`` for the manifest.  ``cached`` gives the
    digest of a source shared with uv's cache that an earlier build hashed (by inode, size
    and mtime, as the manifest scan trusts it), so a new env of known packages reads only
    its pooled bytecode; ``learn`` is told the digests of shared sources hashed here.
    """
    t0 = time.monotonic()
    stats = Stats()
    missing: list[tuple[Path, Path, str]] = []  # (source, pyc, key)
    learned: list[tuple[os.stat_result, str]] = []
    for dirpath, dirnames, filenames in os.walk(target):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            source = Path(dirpath, name)
            st = os.lstat(source)
            if not stat.S_ISREG(st.st_mode):
                continue
            digest = known.get((st.st_dev, st.st_ino))
            if digest is None and cached is not None and st.st_nlink > 1:
                digest = cached(st)
            if digest is None:
                digest = hashlib.sha256(source.read_bytes()).hexdigest()
                if st.st_nlink > 1:
                    learned.append((st, digest))
            known[(st.st_dev, st.st_ino)] = digest
            pyc = Path(dirpath, "__pycache__", f"{name[:-3]}.{cache_tag}.pyc")
            if pyc.exists():
                continue  # the wheel ships it (and its RECORD names it): leave it be
            stats.sources += 1
            key = key_of(interpreter, "/" + str(source.relative_to(root)), digest)
            obj = store.bytecode_object(key)
            if obj is not None and _link_verified(store, obj, pyc, known, stats, say):
                stats.reused += 1
            else:
                missing.append((source, pyc, key))
    if learn is not None and learned:
        learn(learned)
    if missing:
        say(f"compiling {len(missing)} of {stats.sources} modules (the rest from earlier builds)")
        compile_files([source for source, _pyc, _key in missing])
    for _source, pyc, key in missing:
        try:
            data = pyc.read_bytes()
        except FileNotFoundError:
            continue  # a source compileall could not compile (e.g. Python 2 test data)
        digest = hashlib.sha256(data).hexdigest()
        mode = stat.S_IMODE(os.lstat(pyc).st_mode) & ~0o222
        store.pool_file(str(pyc), digest, mode, data=data)
        st = os.lstat(pyc)
        known[(st.st_dev, st.st_ino)] = digest
        store.record_bytecode(key, digest, mode)
        stats.compiled += 1
    stats.seconds = time.monotonic() - t0
    return stats


def _link_verified(
    store: Store, obj: Path, pyc: Path, known: Known, stats: Stats, say: Callable[[str], None]
) -> bool:
    """Link a pooled pyc into place if it still holds the bytes its name promises."""
    try:
        data = obj.read_bytes()
    except FileNotFoundError:
        return False  # the object was collected: compile again
    expected = _object_digest(obj)
    if hashlib.sha256(data).hexdigest() != expected:
        moved = store.quarantine(obj)
        stats.damaged += 1
        say(f"damaged bytecode in the pool ({obj.name}), moved to {moved}; compiling again")
        return False
    pyc.parent.mkdir(exist_ok=True)
    try:
        os.link(obj, pyc)
    except FileNotFoundError:
        return False  # dropped meanwhile (a failed build's): compile again
    st = os.lstat(pyc)
    known[(st.st_dev, st.st_ino)] = expected
    return True
