"""The change feed read two ways: event by event (`changes_since`, typed models) and in bulk
(`scan_since`, what a fresh index is seeded from). Both must read the same lines and skip
the same damage, and an index seeded from the feed must answer as one read from the files."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest

from envfs.node.index import Index
from envfs.node.records import LINE, revision_of
from envfs.node.seed import BATCH
from envfs.store import feed
from envfs.store.formats import Revision
from envfs.store.layout import Store

SID = "ab" * 32
OTHER = "cd" * 32


def _line(**fields: object) -> bytes:
    return json.dumps(fields, sort_keys=True).encode() + b"\n"


def _bound(node: str, revision: int, sid: str, time: float, **extra: object) -> bytes:
    fields = dict(event="bound", host="h", workflow="wf", node=node, revision=revision)
    return _line(**fields, first=1, snapshot_id=sid, time=time, **extra)


def _reasons(time: float) -> dict[str, object]:
    return {"reason": "why", "user": "u", "revision_time": time}


GOOD = [
    _line(event="built", host="h", snapshot_id=SID, time=1.0),
    _line(event="binding_intent", host="h", workflow="wf", node="a", snapshot_id=SID, time=2.0),
    _bound("a", 1, SID, 3.0, **_reasons(2.5)),
    _bound("b", 1, SID, 4.0),  # a line from before reasons were logged
    _line(event="binding_intent", host="h", workflow="wf", node="c", snapshot_id=SID, time=5.0),
    _line(event="built", host="h", snapshot_id=OTHER, time=6.0),
    _line(event="gc_swept", host="h", snapshot_id=OTHER, time=7.0),
]
DAMAGE = [
    b"42\n",
    b"\xff\xfe not json\n",
    b'{"event": "bound", "host": 7, "time": 8.0}\n',  # a field of the wrong type
    b'{"event": "bound", "time": 8.0}\n',  # no host
]
SHIFTING = [
    # two lines that only parse joined, around a line holding two objects: read together
    # as one array they give one value per line, each shifted onto the wrong line
    b'{"a": [{"b": 1}\n',
    b'{"c": 2}]}\n',
    _line(event="built", host="h", snapshot_id="ee" * 32, time=9.0).rstrip() + b", {}\n",
]


def _write(log_dir: Path, lines: list[bytes], tail: bytes = b'{"event": "bou') -> None:
    log_dir.mkdir(parents=True, exist_ok=True)
    (log_dir / "h.jsonl").write_bytes(b"".join(lines) + tail)  # and a line not yet complete


@pytest.mark.parametrize("damage", [[], DAMAGE, SHIFTING], ids=["clean", "damaged", "shifting"])
def test_scan_reads_the_lines_changes_since_reads(tmp_path: Path, damage: list[bytes]) -> None:
    lines = GOOD[:3] + damage + GOOD[3:]
    _write(tmp_path, lines)
    events = feed.changes_since(tmp_path, feed.Cursor())
    scan = feed.scan_since(tmp_path, feed.Cursor())
    assert scan.cursor == events.cursor and scan.reread == events.reread == []
    assert scan.skipped == events.skipped == len(damage)
    assert len(scan.entries) == len(events.events) == len(GOOD)
    for entry, event in zip(scan.entries, events.events, strict=True):
        assert (entry.event, entry.time, entry.snapshot_id) == (
            event.event,
            event.time,
            event.snapshot_id,
        )
        assert (entry.workflow, entry.node, entry.revision) == (
            event.workflow,
            event.node,
            event.revision,
        )
        assert feed.parse_line(entry.line) == event  # each value came from its own line


def test_a_seeded_index_answers_from_the_lines_as_the_files_would(tmp_path: Path) -> None:
    store = Store(tmp_path / "store").ensure()
    _write(store.log_dir, GOOD + DAMAGE + SHIFTING, tail=b"")
    index = Index(tmp_path / "index", store)
    try:
        assert index.rebuilt and {b.node for b in index.all_bindings()} == {"a", "b"}
        (rev,) = index.revisions("wf", "a") or []
        assert rev == Revision(
            workflow="wf", node="a", revision=1, snapshot_id=SID, action="bind",
            time=2.5, host="h", user="u", reason="why",
        )  # fmt: skip
        assert index.revisions("wf", "b") is None  # only its snapshot id: read the files
        assert index.at_revision("wf", "b", 1) is not None
        assert index.is_ready(SID) and not index.is_ready(OTHER)
        assert index.settled_bindings().keys() == {("wf", "a"), ("wf", "b")}  # c: unsettled
    finally:
        index.close()


def test_a_revision_value_that_is_no_line_is_damage() -> None:
    with pytest.raises(ValueError):
        revision_of(LINE + b"{ not a line")
    assert revision_of(SID.encode()) == SID


def _open_and_count(index: str, store: str) -> int:
    opened = Index(Path(index), Store(Path(store)))
    try:
        return len(opened.all_bindings())
    finally:
        opened.close()


def test_processes_that_open_one_fresh_index_at_once_all_see_it_whole(tmp_path: Path) -> None:
    """A seed is written in batches: a process must never take an index another is still
    filling (or empty again under it) as done."""
    store = Store(tmp_path / "store").ensure()
    n = 3 * BATCH + 7
    _write(store.log_dir, [_bound(f"n{i:05d}", 1, SID, float(i)) for i in range(n)], tail=b"")
    args = [(str(tmp_path / "index"), str(store.root))] * 4
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        assert pool.starmap(_open_and_count, args) == [n] * 4


def test_a_seed_keeps_every_revision_whatever_order_its_keys_sort_in(tmp_path: Path) -> None:
    """Keys are appended in byte order: ``a/b@10`` before ``a/b@9``, ``a/b0@1`` before
    ``a/b@1``, ``a.b/x`` before ``a/b``: none may be lost or refused."""
    store = Store(tmp_path / "store").ensure()
    lines, t = [], 0.0
    for wf, node, count in [("a", "b", 12), ("a", "b0", 1), ("a.b", "x", 2), ("a", "b.c", 3)]:
        for n in range(1, count + 1):
            t += 1
            fields = dict(event="bound", host="h", workflow=wf, node=node, revision=n, first=1)
            lines.append(_line(**fields, snapshot_id=SID, time=t, **_reasons(t)))
    _write(store.log_dir, lines, tail=b"")
    index = Index(tmp_path / "index", store)
    try:
        for wf, node, count in [("a", "b", 12), ("a", "b0", 1), ("a.b", "x", 2), ("a", "b.c", 3)]:
            current = index.current(wf, node)
            assert current is not None and current.revision == count, (wf, node)
            assert [r.revision for r in index.revisions(wf, node) or []] == list(
                range(1, count + 1)
            )
    finally:
        index.close()


@pytest.mark.parametrize("chunk", [1, 37, 4096])
def test_lines_read_in_chunks_are_the_lines_read_whole(
    tmp_path: Path, chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A seed reads logs a few MB at a time (the next read under way while it parses): a
    line cut by a chunk's end is read whole with the next, a last one without its newline
    waits, and the cursor ends where the complete lines do."""
    _write(tmp_path, GOOD + DAMAGE + GOOD)
    whole = feed.changes_since(tmp_path, feed.Cursor())
    monkeypatch.setattr(feed, "_CHUNK", chunk)
    scan = feed.scan_since(tmp_path, feed.Cursor())
    assert scan.cursor == whole.cursor and scan.skipped == whole.skipped == len(DAMAGE)
    assert [e.line for e in scan.entries] == [line.rstrip(b"\n") for line in GOOD + GOOD]
    (size,) = [offset for _inode, offset in scan.cursor.files.values()]
    assert size == len(b"".join(GOOD + DAMAGE + GOOD))  # up to the incomplete last line
