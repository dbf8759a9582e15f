"""What the CLI and the API print (as JSON): an env as shown, interpreters in use, verify,
du and doctor reports."""

from __future__ import annotations

from typing import Literal

from envfs.core.records import Record

State = Literal["bound", "building", "ready", "failed"]


class EnvInfo(Record):
    """What ``envfs show`` prints."""

    workflow: str
    node: str
    revision: int
    snapshot_id: str
    state: State
    snapshot_path: str
    python: str
    layout: Literal["self-contained", "venv"] = "self-contained"
    reason: str | None = None
    #: a project's sync options (`--extra X --no-dev ...`); the index a list was locked on
    selection: str | None = None
    index_url: str | None = None


class InterpreterUse(Record):
    """What ``envfs python ls`` prints for one captured interpreter."""

    digest: str
    implementation: str
    version: str
    abi: str
    platform: str
    total_bytes: int
    file_count: int
    libraries: list[str]
    source: str
    captured_at: float
    envs: list[str]  # bindings whose current snapshot runs it


class VerifyReport(Record):
    """What ``envfs verify --json`` prints."""

    checked: int  # snapshots checked
    damaged: dict[str, list[str]]  # snapshot id -> problems (paths relative to the snapshot)
    gone: list[str] = []  # bindings whose built snapshot is no longer in the store
    uv_cache_checked: int = 0  # files of unpacked wheels checked against their RECORD
    uv_cache: list[str] = []  # problems, as paths under uv-cache/
    corrupt: list[str] = []  # store records that cannot be read: "<file> is corrupt: <why>"

    @property
    def ok(self) -> bool:
        return not (self.damaged or self.gone or self.uv_cache or self.corrupt)


class DiskUsage(Record):
    """What ``envfs du --json`` prints."""

    snapshots: int
    real_bytes: int  # file sizes of distinct inodes
    disk_bytes: int  # blocks of those inodes
    apparent_bytes: int  # as if every env were a copy
    uv_cache_extra_bytes: int  # uv cache files no snapshot links
    per_snapshot: dict[str, dict[str, int]]


class DoctorFinding(Record):
    name: str
    level: Literal["ok", "warn", "error"]
    detail: str
    hint: str | None = None  # what to do about it


class DoctorReport(Record):
    """What ``envfs doctor --json`` prints."""

    ok: bool  # no finding is an error
    findings: list[DoctorFinding]


class ImportReport(Record):
    """What ``envfs import`` did."""

    snapshot_id: str
    added: list[str]  # what the store lacked: interpreter, spec, snapshot
    binding: str | None = None
    revision: int | None = None
