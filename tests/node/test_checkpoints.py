"""The index checkpoint: a fresh index starts from the store's checkpoint (real LMDB files,
a real store directory), reads the logs after its cursor, and falls back to the logs when
the checkpoint is damaged, gone or of another schema."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from envfs.node import checkpoints
from envfs.node.index import Index
from envfs.store.checkpoint import CLAIM, CLAIM_STALE, CURRENT
from envfs.store.formats import Revision
from envfs.store.layout import Store
from tests.store.test_feed import GOOD, SID, _line, _write


@pytest.fixture
def store(tmp_path: Path) -> Store:
    store = Store(tmp_path / "store").ensure()
    _write(store.log_dir, GOOD, tail=b"")
    return store


@pytest.fixture
def opened(tmp_path: Path) -> Iterator[Callable[[Store], Index]]:
    """Fresh indexes over a store, each closed after."""
    indexes: list[Index] = []

    def open_one(store: Store) -> Index:
        indexes.append(Index(tmp_path / f"index{len(indexes)}", store))
        return indexes[-1]

    yield open_one
    for index in indexes:
        index.close()


def _only_in_the_index(index: Index) -> None:
    """A binding no log line tells of (as a sweep finds one whose writer died)."""
    index.put_binding(
        [
            Revision(
                workflow="wf", node="z", revision=1, snapshot_id=SID, time=1.0, host="h", user="u"
            )
        ]
    )


def test_a_fresh_index_starts_from_the_checkpoint_then_reads_the_logs_after_it(
    store: Store, opened: Callable[[Store], Index]
) -> None:
    writer = opened(store)
    _only_in_the_index(writer)
    info = writer.write_checkpoint("h1")
    assert info.bindings == 3 and info.host == "h1" and info.pending == [("wf", "c")]
    assert info.log_bytes == (store.log_dir / "h.jsonl").stat().st_size
    assert (store.checkpoint_dir / info.file).stat().st_size == info.size

    fresh = opened(store)
    assert fresh.current("wf", "z") is not None  # only the checkpoint knew it
    assert fresh.all_bindings() == writer.all_bindings()
    assert fresh.revisions("wf", "a") == writer.revisions("wf", "a")
    assert fresh.settled_bindings() == writer.settled_bindings()
    assert fresh.feed_cursor() == writer.feed_cursor()
    assert fresh.is_ready(SID) and ("wf", "c") in fresh._pending
    assert not (fresh.path / checkpoints.COPY).exists()  # the copy is let go

    # a line after the checkpoint's cursor: read as any node reads the logs
    with open(store.log_dir / "h.jsonl", "ab") as f:
        f.write(_line(event="removed", host="h", workflow="wf", node="a", time=9.0))
    assert ("wf", "a") in fresh.follow_changes()
    assert fresh.current("wf", "a") is None and fresh.current("wf", "z") is not None


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _edit_record(path: Path, **fields: object) -> None:
    record = json.loads(path.read_text())
    record.update(fields)
    path.write_text(json.dumps(record))


DAMAGE: dict[str, Callable[[Path, Path], object]] = {
    "flipped": lambda record, data: _flip(data),
    "truncated": lambda record, data: os.truncate(data, 8192),
    "gone": lambda record, data: data.unlink(),
    "other schema": lambda record, data: _edit_record(record, index_schema="5"),
    "other store": lambda record, data: _edit_record(record, store_uuid="0" * 32),
    "garbage record": lambda record, data: record.write_bytes(b"{ not json"),
    "a path for a name": lambda record, data: _edit_record(record, file="../envfs.toml"),
}


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_a_checkpoint_that_cannot_be_taken_leaves_the_logs(
    store: Store, opened: Callable[[Store], Index], damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    writer = opened(store)
    _only_in_the_index(writer)
    info = writer.write_checkpoint("h1")
    assert store.checkpoint_problem() is None
    DAMAGE[damage](store.checkpoint_dir / CURRENT, store.checkpoint_dir / info.file)
    if damage not in ("other schema", "other store"):  # a checkpoint of another: not damage
        problem = store.checkpoint_problem()
        assert problem is not None and "fresh nodes read the logs instead" in problem
    with caplog.at_level(logging.INFO):
        fresh = opened(store)
    assert fresh.current("wf", "z") is None  # not from the checkpoint: from the logs
    assert {b.node for b in fresh.all_bindings()} == {"a", "b"}
    assert fresh.feed_cursor() == writer.feed_cursor()
    assert "seeded from checkpoint" not in caplog.text
    assert os.listdir(fresh.path).count(checkpoints.COPY) == 0


def test_one_writer_at_a_time_and_a_dead_writers_claim_goes_stale(store: Store) -> None:
    with store.checkpoint_claim() as first, store.checkpoint_claim() as second:
        assert first and not second
    with store.checkpoint_claim() as again:
        assert again  # the claim was let go
    claim = store.checkpoint_dir / CLAIM
    claim.touch()  # a writer died holding it
    with store.checkpoint_claim() as blocked:
        assert not blocked
    old = store.store_now() - CLAIM_STALE - 60
    os.utime(claim, (old, old))
    with store.checkpoint_claim() as stale:
        assert not stale and not claim.exists()  # taken away: the next look writes
    with store.checkpoint_claim() as taken:
        assert taken


def test_a_daemon_writes_a_checkpoint_once_the_logs_grew_past_the_last(
    store: Store, opened: Callable[[Store], Index], monkeypatch: pytest.MonkeyPatch
) -> None:
    index = opened(store)
    size = (store.log_dir / "h.jsonl").stat().st_size
    monkeypatch.setattr(checkpoints, "LAG", size + 1)
    index._checkpoint_if_behind("h1")
    assert store.checkpoint() is None and index.checkpoint_behind() == size  # not yet
    monkeypatch.setattr(checkpoints, "LAG", size)
    index._checkpoint_if_behind("h1")
    first = store.checkpoint()
    assert first is not None and first.log_bytes == size and index.checkpoint_behind() == 0
    index._checkpoint_if_behind("h1")
    assert store.checkpoint() == first  # nothing new past it
    with open(store.log_dir / "h.jsonl", "ab") as f:
        f.write(b"".join(GOOD))  # as much again: due
    index.follow_changes()
    index._checkpoint_if_behind("h1")
    second = store.checkpoint()
    assert second is not None and second.log_bytes == 2 * size


def test_a_checkpoint_of_an_index_that_lost_log_lines_has_the_fresh_node_walk_the_files(
    store: Store, opened: Callable[[Store], Index]
) -> None:
    """Lines lost under the writer (rotated logs) were not read into its tables: the node
    that starts from them trusts no binding for gc and walks every binding file."""
    writer = opened(store)
    with writer.env.begin(write=True) as txn:
        txn.put(b"walk_due", b"1", db=writer.meta)  # as a reader of replaced logs marks it
    writer.write_checkpoint("h1")
    fresh = opened(store)
    assert fresh._sweep.full_due and fresh.settled_bindings() == {}
    fresh.reconcile()  # the walk (a daemon's next refresh) clears it
    with fresh.env.begin() as txn:
        assert txn.get(b"walk_due", db=fresh.meta) is None


def test_a_checkpoint_due_after_the_index_closed_fails_cleanly(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A daemon stopping while its checkpoint thread runs: the thread meets a closed index
    and says so (no crash, nothing published)."""
    index = Index(tmp_path / "closing", store)
    index.close()
    monkeypatch.setattr(checkpoints, "LAG", 0)
    index._checkpoint_if_behind("h1")
    assert store.checkpoint() is None
    assert "cannot write a checkpoint" in caplog.text
