"""Garbage collection: sweep snapshots nothing needs, into ``trash/``, then delete them.

Roots (kept): each binding's current revision and its last ``keep`` earlier ones, snapshots
younger than ``min_age``, and snapshots a node serves (``leases/<id>/<host>``, refreshed by
every daemon for each snapshot it has attached, judged by the store's clock).  Captured
interpreters are always kept.  The sweep moves snapshots to ``trash/`` (one rename each),
removes what crashed builds left (their staging dirs and stale build leases), deletes
trash older than ``quarantine``, then pool objects and bytecode links nothing uses
any more, then runs ``uv cache prune``; all under the store's gc fence (exclusive), which
builds and binds hold shared, so a build and a sweep never race.
"""

from __future__ import annotations

import os
import subprocess
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from envfs.core.errors import EnvfsError, EnvironmentProblem
from envfs.store.files import META, regular_files, remove_tree, remove_unshared
from envfs.store.formats import GcReport, Revision
from envfs.store.layout import Store

#: Threads that read binding files for the roots (on a NAS, each is a few round trips).
READERS = 16


def _manifest_age(store: Store, snapshot_id: str, now: float) -> float:
    try:
        return now - os.stat(store.snapshot_dir(snapshot_id) / META / "manifest.json").st_mtime
    except FileNotFoundError:
        return float("inf")  # no manifest: an incomplete snapshot, never a root


#: The snapshot id of revision N of WF/NODE where the caller knows it for certain (a
#: revision never changes once written, and its number is never reused), else None.
Known = Callable[[str, str, int], str | None]


def _unknown(_wf: str, _node: str, _number: int) -> str | None:
    return None


@dataclass(frozen=True)
class IndexView:
    """What a node's index vouches for, asked under the gc fence once it has caught up
    with the change feed: ``settled`` bindings' (first, current) revision numbers (their
    files are ``first..current``: `Bindings.append_revision`), so they are not listed;
    ``known``, the snapshot of a revision it has, so that file is not read."""

    settled: dict[tuple[str, str], tuple[int, int]] = field(default_factory=dict)
    known: Known = _unknown


def _binding_roots(
    store: Store, wf: str, node: str, keep: int, view: IndexView
) -> list[tuple[str, str]]:
    """(snapshot id, why) for a binding's current revision and its last ``keep`` earlier
    ones: which revisions exist is the index's word for a settled binding, else the
    binding's listing; only those files whose record the index lacks are read."""
    span = view.settled.get((wf, node))
    if span is None:
        numbers = store.revision_numbers(wf, node)
    else:
        numbers = list(range(max(span[0], span[1] - keep), span[1] + 1))
    out = []
    for i, number in enumerate(reversed(numbers[-(keep + 1) :])):
        sid = view.known(wf, node, number)
        if sid is None:
            path = store.binding_dir(wf, node) / f"{number}.json"
            try:
                sid = store.read_model(path, Revision).snapshot_id
            except FileNotFoundError:
                continue
            except EnvfsError as exc:  # unknown references: sweeping could break this binding
                raise EnvironmentProblem(
                    f"binding {wf}/{node} is unreadable ({exc.message}); fix or remove it before gc"
                ) from exc
        why = f"current revision of {wf}/{node}" if i == 0 else f"revision {number} of {wf}/{node}"
        out.append((sid, why))
    return out


def roots(store: Store, keep: int, view: IndexView | None = None) -> dict[str, str]:
    """Snapshot id -> why it is kept, from the bindings (current and last ``keep``) the
    store's listings name (one per workflow), each read as far as ``view`` does not say
    it, by `READERS` threads (on a NAS each binding read is a few round trips)."""
    from concurrent.futures import ThreadPoolExecutor

    names = list(store.binding_names())
    why: dict[str, str] = {}
    view = view or IndexView()

    def one(name: tuple[str, str]) -> list[tuple[str, str]]:
        return _binding_roots(store, name[0], name[1], keep, view)

    with ThreadPoolExecutor(READERS) as pool:
        for found in pool.map(one, names):
            for sid, reason in found:
                why.setdefault(sid, reason)
    return why


def _freed_bytes(store: Store, swept: list[str]) -> int:
    """Bytes whose last links (but the pool's) are in the swept snapshots."""
    count: Counter[tuple[int, int]] = Counter()
    size: dict[tuple[int, int], tuple[int, int]] = {}
    for sid in swept:
        for _path, st in regular_files(store.snapshot_dir(sid)):
            key = (st.st_dev, st.st_ino)
            count[key] += 1
            size[key] = (st.st_size, st.st_nlink)
    return sum(s for key, (s, nlink) in size.items() if nlink - count[key] <= 1)


def collect(
    store: Store,
    host: str,
    *,
    keep: int,
    min_age: float,
    quarantine: float,
    dry_run: bool,
    say: Callable[[str], None],
    uv: str | None = None,
    uv_env: dict[str, str] | None = None,
    index: Callable[[], IndexView] = IndexView,
) -> GcReport:
    """Sweep (see the module). ``index`` is asked once the fence is held: no binding
    changes then, so an index caught up with the feed knows every binding but those an
    intent line names."""
    with store.gc_fence(exclusive=True):
        now = store.store_now()
        # what nodes serve, read before and after the (long, on a big store) walk of the
        # bindings: a snapshot served at either moment is kept
        served = store.served_snapshots(now)
        kept = roots(store, keep, index())
        for sid, hosts in store.served_snapshots(now).items():
            served[sid] = sorted({*served.get(sid, []), *hosts})
        swept: list[str] = []
        for sid in store.snapshot_ids():
            if sid in kept:
                continue
            if sid in served:
                kept[sid] = f"served by {', '.join(sorted(served[sid]))}"
                continue
            if _manifest_age(store, sid, now) < min_age:
                kept[sid] = "younger than --min-age"
                continue
            swept.append(sid)
        dead = store.dead_staging(fenced=True)  # no build runs while we hold the fence
        stale = store.stale_leases(host)
        freed = _freed_bytes(store, swept)
        say(f"gc: {len(swept)} snapshot(s) to sweep, {len(kept)} kept, about {freed} bytes")
        report = GcReport(
            dry_run=dry_run,
            swept=swept,
            kept=dict(sorted(kept.items())),
            freed_bytes=freed,
            dead_builds=[p.name for p in dead],
            stale_leases=[f"{x.snapshot_id} ({x.host}, pid {x.pid})" for x in stale],
        )
        if dry_run:
            return report
        for sid in swept:
            store.trash_snapshot(sid, now)
            store.audit("gc_swept", host, sid)
        store.remove_staging(dead)
        for lease in stale:
            if store.break_lease(lease.snapshot_id, lease):
                store.audit("lease_broken", host, lease.snapshot_id, holder=lease.host)
        deleted = 0
        for path, when in store.trashed():
            if now - when >= quarantine:
                remove_tree(path)
                deleted += 1
        objects, links = _prune_pools(store)
        if uv is not None:
            subprocess.run(
                [uv, "cache", "prune"], env=uv_env, capture_output=True, text=True, check=False
            )
        return report.model_copy(
            update={"trash_deleted": deleted, "objects_deleted": objects, "links_deleted": links}
        )


def _prune_pools(store: Store) -> tuple[int, int]:
    """Delete pool objects only the pool links, and bytecode links whose object is gone."""
    objects = remove_unshared(store.objects)
    links = 0
    for dirpath, _dirs, files in os.walk(store.bytecode):
        for name in files:
            link = Path(dirpath, name)
            if link.is_symlink() and not link.exists():
                link.unlink()
                links += 1
    return objects, links
