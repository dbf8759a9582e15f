"""A snapshot's packs (``.envfs/packs/<sha256>.pack``, indexed by ``.envfs/packs.json``:
`envfs.store.formats.PackIndex`): the small files its access trace names, grouped by the
package (or the standard library) they belong to, each group's bytes back to back in one
file. A fresh node reads a pack in a few large reads where it would copy its files one by
one (a NAS answers each file with a lookup, an open, a read, a flush and a release): for
the pandas env, 537 files in 3,399 requests and 0.73 s at 1 ms, against 153 requests and
0.13 s as packs.

Members are sorted by path, so a group of the same files gives the same bytes in every
env; a pack is then a pool object (`Store.pool_file`), one inode for every snapshot that
holds it, and gc drops it with the last of them. Big files stay out: they come in large
reads anyway, and packing them would cost their bytes twice on the NAS.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

from envfs.store.files import META, PACKS
from envfs.store.formats import AccessTrace, Manifest, ManifestEntry, Pack, PackIndex, PackMember
from envfs.store.layout import Store

#: Traced files smaller than this go into packs.
PACK_FILE_MAX = 256 << 10
#: A group of fewer files than this is left to be copied one by one.
PACK_MIN_FILES = 2
_SITE = "site-packages/"


def group_of(rel: str) -> str:
    """The pack a file belongs in: its top-level name under site-packages (``numpy``,
    ``numpy.libs``, ``pandas-2.2.3.dist-info``), else its directory (the standard library)."""
    head, sep, tail = rel.partition(_SITE)
    if sep:
        return head + _SITE + tail.split("/", 1)[0]
    return os.path.dirname(rel)


def write_packs(store: Store, staged: Path, trace: AccessTrace, manifest: Manifest) -> PackIndex:
    """Write the packs of ``trace``'s small files into ``staged/.envfs/`` (pooled) and
    their index; the index."""
    files = {e.path: e for e in manifest.files if e.type == "file" and e.sha256 is not None}
    groups: dict[str, dict[str, ManifestEntry]] = {}
    for rel in trace.files:
        entry = files.get(rel)
        if entry is not None and entry.size < PACK_FILE_MAX:
            groups.setdefault(group_of(rel), {})[rel] = entry
    where = staged / META / PACKS
    where.mkdir(exist_ok=True)
    packs = []
    for key in sorted(groups):
        members = [groups[key][rel] for rel in sorted(groups[key])]
        if len(members) < PACK_MIN_FILES:
            continue
        packs.append(_write_pack(store, staged, where, members))
    index = PackIndex(packs=packs)
    (staged / META / "packs.json").write_text(index.model_dump_json())
    return index


def _write_pack(store: Store, staged: Path, where: Path, members: list[ManifestEntry]) -> Pack:
    tmp = where / f".{uuid.uuid4().hex}.tmp"
    digest = hashlib.sha256()
    size = 0
    with open(tmp, "wb") as out:
        for entry in members:
            data = (staged / entry.path).read_bytes()
            out.write(data)
            digest.update(data)
            size += len(data)
    sha = digest.hexdigest()
    final = where / f"{sha}.pack"
    os.replace(tmp, final)
    os.chmod(final, 0o444)
    store.pool_file(str(final), sha, 0o444)
    listed = [PackMember(path=e.path, sha256=e.sha256 or "", size=e.size) for e in members]
    return Pack(sha256=sha, size=size, members=listed)
