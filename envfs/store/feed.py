"""The change feed: what happened in the store, one append-only log per host.

``log/<host>.jsonl`` holds one JSON object (`envfs.store.formats.AuditEvent`) per line, written by
that host only: appends from many NFS clients to one file are not atomic, appends of one
client are.  Readers follow every host's log from a `Cursor` (per file: its inode and the
offset read up to), and never stop on what they cannot read: a line that is not a JSON
object of the right shape is skipped and counted; a file that shrank or was replaced (a
rotation) is read again from its start; a last line without its newline waits for it.  A
writer starts its line on a fresh line if a crash left the file without a final newline.

**The beacon.** After each line a writer appends one byte to ``log/beacon``. A reader
that has caught up asks "has anything changed?" with one ``fstat`` of it (`Probe`): its
size, inode and mtime move with every line, whatever the number of hosts and logs, so a
node at rest costs the NAS one request per probe (CernVM-FS's one cheap request per
repository and TTL). The beacon is cut back to empty past `BEACON_MAX` bytes (that too
is a change).

The logs are a hint, the binding files the truth: a writer logs ``binding_intent`` for a
binding before it changes its files, so a reader re-reads a binding whose writer died
between its change and its ``bound`` line (`envfs.node.index.Index.follow_changes`).
``log/audit.jsonl`` of stores written before per-host logs is read as one more log.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import pydantic

from envfs.core import crashpoints
from envfs.core.config import node_time
from envfs.store.formats import AuditEvent

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def log_name(host: str) -> str:
    """The log file of a host: its id with anything but ``[A-Za-z0-9._-]`` replaced."""
    return (_UNSAFE.sub("_", host).lstrip(".") or "host") + ".jsonl"


BEACON = "beacon"
#: Bytes past which a writer cuts the beacon back to empty.
BEACON_MAX = 1 << 20


def ring(log_dir: Path) -> None:
    """Tell readers that a log has grown: one more byte in the beacon."""
    fd = os.open(log_dir / BEACON, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o664)
    try:
        if os.fstat(fd).st_size >= BEACON_MAX:
            os.ftruncate(fd, 0)
        os.write(fd, b".")
    finally:
        os.close(fd)


class Probe:
    """One ``fstat`` of the beacon per call to `changed` (its descriptor is kept open)."""

    def __init__(self, log_dir: Path) -> None:
        self.path = log_dir / BEACON
        self._fd: int | None = None
        self._stamp: tuple[int, int, int, int] | None = None

    def changed(self) -> bool:
        """Whether any log may have grown since the last call (True the first time, and
        whenever the beacon cannot be read: then every log is read, as without it)."""
        try:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            st = os.fstat(self._fd)
            if st.st_nlink == 0:  # replaced or removed: follow the new one
                self.close()
                return True
        except OSError:
            self.close()
            return True
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        return True

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
        self._fd = None
        self._stamp = None


def append(log_dir: Path, host: str, event: str, snapshot_id: str | None, **fields: Any) -> None:
    """Append one event to this host's log: one ``write()`` with ``O_APPEND``; then ring."""
    record = {"event": event, "snapshot_id": snapshot_id, "host": host, "time": node_time()}
    record.update(fields)
    line = (json.dumps(record, sort_keys=True) + "\n").encode()
    fd = os.open(log_dir / log_name(host), os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line  # a writer died mid-line: do not glue onto its fragment
        if crashpoints.armed("log") and "revision" in fields:  # a binding's line
            os.write(fd, line[: len(line) // 2])
            crashpoints.reached("log")
        os.write(fd, line)
    finally:
        os.close(fd)
    ring(log_dir)


@dataclass
class Cursor:
    """How far each log has been read: file name -> (inode, offset)."""

    files: dict[str, tuple[int, int]] = field(default_factory=dict)

    def dumps(self) -> bytes:
        return json.dumps(self.files, sort_keys=True).encode()

    def size(self) -> int:
        """The bytes of logs read up to it."""
        return sum(offset for _inode, offset in self.files.values())

    @classmethod
    def loads(cls, raw: bytes | None) -> Cursor:
        try:
            data = json.loads(raw or b"{}")
            return cls({str(k): (int(v[0]), int(v[1])) for k, v in data.items()})
        except (ValueError, TypeError, IndexError, AttributeError):
            return cls()  # unreadable: read every log again (events are idempotent)


@dataclass
class Changes:
    events: list[AuditEvent]
    cursor: Cursor
    skipped: int  # lines that were not events
    reread: list[str]  # logs read again from their start (shrunk or replaced)


class Entry(NamedTuple):
    """A log line as `scan_since` gives it: the fields that say what changed, checked for
    their types, and the line itself (the rest of it is read with `parse_line` if needed)."""

    time: float
    event: str
    workflow: str | None
    node: str | None
    snapshot_id: str | None
    revision: int | None
    first: int | None
    line: bytes


@dataclass
class Scan:
    entries: list[Entry]
    cursor: Cursor
    skipped: int
    reread: list[str]


def _logs(log_dir: Path) -> list[os.DirEntry[str]]:
    try:
        return sorted(
            (e for e in os.scandir(log_dir) if e.name.endswith(".jsonl") and e.is_file()),
            key=lambda e: e.name,
        )
    except FileNotFoundError:
        return []


def parse_line(line: bytes) -> AuditEvent | None:
    """One log line as an event, or None if it is not one (garbage, a fragment)."""
    try:
        data = json.loads(line)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    try:
        return AuditEvent.model_validate(data)
    except pydantic.ValidationError:
        return None


class _Reading:
    """The complete, non-blank lines appended to each log since ``cursor``, as lists
    (`batches`); then ``cursor`` is the one after them and ``reread`` the logs read again
    from their start (shrunk or replaced)."""

    def __init__(self, log_dir: Path, cursor: Cursor) -> None:
        self.log_dir = log_dir
        self.start = cursor
        self.files: dict[str, tuple[int, int]] = {}
        self.reread: list[str] = []

    @property
    def cursor(self) -> Cursor:
        return Cursor(dict(self.files))

    def batches(self, chunk: int | None = None) -> Iterator[list[bytes]]:
        """A list of lines per log, or with ``chunk``, per ``chunk`` bytes read, the next
        read under way meanwhile (a NAS's latency hidden behind the parsing)."""
        for entry in _logs(self.log_dir):
            try:
                st = entry.stat()
            except FileNotFoundError:
                continue
            inode, offset = self.start.files.get(entry.name, (st.st_ino, 0))
            if inode != st.st_ino or st.st_size < offset:
                self.reread.append(entry.name)
                offset = 0
            if st.st_size == offset:
                self.files[entry.name] = (st.st_ino, offset)
                continue
            try:
                f = open(entry.path, "rb")  # noqa: SIM115  (closed below, after the reads)
            except FileNotFoundError:
                continue
            with f:
                f.seek(offset)
                rest = b""
                for data in _read_ahead(f, chunk) if chunk else [f.read()]:
                    data = rest + data
                    end = data.rfind(b"\n") + 1  # a last line without its newline waits
                    rest = data[end:]
                    offset += end
                    yield [line for line in data[:end].splitlines() if line.strip()]
            self.files[entry.name] = (st.st_ino, offset)


def _read_ahead(f: BinaryIO, size: int) -> Iterator[bytes]:
    """``f`` in reads of ``size`` bytes, each next one started before this one is used."""
    with ThreadPoolExecutor(1, thread_name_prefix="envfs-feed") as pool:
        pending = pool.submit(f.read, size)
        while data := pending.result():
            pending = pool.submit(f.read, size)
            yield data


def changes_since(log_dir: Path, cursor: Cursor) -> Changes:
    """Every complete event appended to any log since ``cursor``, and the new cursor."""
    reading = _Reading(log_dir, cursor)
    events: list[AuditEvent] = []
    skipped = 0
    for lines in reading.batches():
        for line in lines:
            event = parse_line(line)
            if event is None:
                skipped += 1
            else:
                events.append(event)
    return Changes(events, reading.cursor, skipped, reading.reread)


def _objects(lines: list[bytes]) -> list[Any]:
    """Each line's JSON value (None where a line is not JSON). One parse of them all as an
    array, kept when it gives one object per line, each with the ``time`` its line holds
    (so no damaged line can shift values onto its neighbours); else a parse per line."""
    try:
        values = json.loads(b"[" + b",".join(lines) + b"]")
    except ValueError:
        values = None
    if values is not None and len(values) == len(lines):
        for value, line in zip(values, lines, strict=True):
            if type(value) is not dict or b'"time": %r' % (value.get("time"),) not in line:
                break
        else:
            return list(values)
    out: list[Any] = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            out.append(None)
    return out


_TEXT = (str, type(None))
_NUMBER = (int, type(None))


def _entry(data: object, line: bytes) -> Entry | None:
    """The line's fields if they have the types `AuditEvent` gives them (a per-line hot path
    of a seed: plain lookups and ``type`` checks, no call per field)."""
    if type(data) is not dict:
        return None
    event, host, when = data.get("event"), data.get("host"), data.get("time")
    wf, node, sid = data.get("workflow"), data.get("node"), data.get("snapshot_id")
    rev, first = data.get("revision"), data.get("first")
    if (
        type(event) is str
        and type(host) is str
        and (type(when) is float or type(when) is int)
        and type(wf) in _TEXT
        and type(node) in _TEXT
        and type(sid) in _TEXT
        and type(rev) in _NUMBER
        and type(first) in _NUMBER
    ):
        return Entry(float(when), event, wf, node, sid, rev, first, line)
    return None


#: Lines `scan_since` parses at once, and bytes it reads at once.
_BATCH = 4096
_CHUNK = 4 << 20


def scan_since(log_dir: Path, cursor: Cursor) -> Scan:
    """What `changes_since` reads, for a reader of every line at once (an index seeded from
    the whole feed): the lines' main fields, checked as an `AuditEvent` checks them, without
    a model per line."""
    reading = _Reading(log_dir, cursor)
    entries: list[Entry] = []
    skipped = 0
    for lines in reading.batches(_CHUNK):
        for start in range(0, len(lines), _BATCH):  # the parsed lines are let go batch by batch
            batch = lines[start : start + _BATCH]
            for data, line in zip(_objects(batch), batch, strict=True):
                entry = _entry(data, line)
                if entry is None:
                    skipped += 1
                else:
                    entries.append(entry)
    return Scan(entries, reading.cursor, skipped, reading.reread)


def end_cursor(log_dir: Path) -> Cursor:
    """A cursor at the current end of every log (nothing before it needs reading)."""
    files = {}
    for entry in _logs(log_dir):
        try:
            st = entry.stat()
        except FileNotFoundError:
            continue
        files[entry.name] = (st.st_ino, st.st_size)
    return Cursor(files)


def all_events(log_dir: Path) -> list[AuditEvent]:
    """Every event in every log, in time order (for reports and tests)."""
    events = changes_since(log_dir, Cursor()).events
    return sorted(events, key=lambda e: e.time)
