"""Pydantic models for everything that crosses an edge: files on the store and JSON output."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

#: 1: a venv whose bin/python names the builder's interpreter; 2: a self-contained prefix
#: (the captured interpreter plus the locked packages).
LAYOUT_VERSION = 2

State = Literal["bound", "building", "ready", "failed"]


class Record(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, defer_build=True)


class Interpreter(Record):
    """An exact interpreter: what the snapshot id is computed from (the path is not)."""

    implementation: str  # "cpython"
    version: str  # "3.12.1"
    abi: str  # SOABI, e.g. "cpython-312-x86_64-linux-gnu"
    platform: str  # e.g. "linux-x86_64-glibc2.36"
    path: str  # where it was found on the node that wrote the spec
    digest: str | None = None  # the captured interpreter (interpreters/<digest>/); None: layout 1

    @property
    def key(self) -> str:
        return f"{self.implementation}-{self.version}-{self.abi}"

    @property
    def minor(self) -> str:
        return ".".join(self.version.split(".")[:2])


class Selection(Record):
    """What a frozen sync installs from a project's lock, beyond uv's default (the project's
    dependencies and its default groups, ``dev`` unless ``[tool.uv] default-groups`` says
    otherwise). The default selection is left out of the snapshot id."""

    extras: list[str] = []
    groups: list[str] = []
    no_dev: bool = False
    #: the project itself, as a wheel built at bind time (``specs/<id>/<file>``), with its
    #: sha256; installed non-editable, so the env never reads the project's sources
    project_wheel: str | None = None
    project_wheel_sha256: str | None = None

    def describe(self) -> str | None:
        """The options that chose this selection, None for the default."""
        args = self.sync_args() + (["--install-project"] if self.project_wheel else [])
        return " ".join(args) or None

    def sync_args(self) -> list[str]:
        args = [a for extra in self.extras for a in ("--extra", extra)]
        args += [a for group in self.groups for a in ("--group", group)]
        return [*args, "--no-dev"] if self.no_dev else args


class SpecInfo(Record):
    """``specs/<id>/spec.json``: the inputs of a snapshot."""

    snapshot_id: str
    kind: Literal["requirements", "project"]
    requirements: list[str] = []
    source: str | None = None  # the -r file or --project directory it came from
    interpreter: Interpreter
    layout_version: int = LAYOUT_VERSION
    lock_sha256: str
    created: float
    host: str
    selection: Selection = Selection()
    #: the indexes a requirement list was locked against, credentials removed (None: PyPI)
    index_url: str | None = None
    extra_index_urls: list[str] = []


class Revision(Record):
    """``bindings/<wf>/<node>/<rev>.json``: one append-only revision of a binding."""

    workflow: str
    node: str
    revision: int
    snapshot_id: str
    action: Literal["bind", "rollback"] = "bind"
    rollback_to: int | None = None
    time: float
    host: str
    user: str
    reason: str = ""


class ManifestEntry(Record):
    path: str
    type: Literal["file", "dir", "symlink"]
    mode: int
    size: int = 0
    sha256: str | None = None
    target: str | None = None


class Manifest(Record):
    """``snapshots/<id>/.envfs/manifest.json``."""

    snapshot_id: str
    tree_digest: str
    files: list[ManifestEntry]
    file_count: int
    total_bytes: int
    builder: str
    uv_version: str
    interpreter: Interpreter
    built_at: float
    durations: dict[str, float]


class LeaseInfo(Record):
    """``locks/<id>.lease``: who is building a snapshot."""

    snapshot_id: str
    host: str
    pid: int
    pid_start: int
    nonce: str
    started: float


class FailureInfo(Record):
    """``failed/<id>.json``: the last failed build of a snapshot."""

    snapshot_id: str
    host: str
    time: float
    reason: str
    log: str | None = None


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


class AuditEvent(Record):
    """One line of ``log/<host>.jsonl`` (`envfs.store.feed` owns the format)."""

    model_config = ConfigDict(extra="allow", frozen=True, defer_build=True)

    event: str  # bound, rolled_back, build_started, built, build_failed, lease_broken, ...
    snapshot_id: str | None = None
    host: str
    time: float
    workflow: str | None = None  # bound, rolled_back
    node: str | None = None
    revision: int | None = None


class InterpreterInfo(Record):
    """``interpreters/<digest>/.envfs/interpreter.json``: a captured, relocatable CPython."""

    digest: str  # sha256 over the relocated tree (paths, modes, contents; bytecode left out)
    implementation: str
    version: str
    abi: str
    platform: str
    executable: str  # relative to the tree, e.g. "bin/python3.12"
    stdlib: str  # relative, e.g. "lib/python3.12"
    site_packages: str  # relative, e.g. "lib/python3.12/site-packages"
    cache_tag: str = ""  # sys.implementation.cache_tag, e.g. "cpython-312"
    libraries: list[str]  # sonames bundled into lib/envfs-libs
    file_count: int
    total_bytes: int
    files: list[ManifestEntry]
    source: str  # the prefix it was captured from
    host: str
    captured_at: float

    def tag(self) -> str:
        """The bytecode cache tag (``__pycache__/<module>.<tag>.pyc``)."""
        if self.cache_tag:
            return self.cache_tag
        major, minor = self.version.split(".")[:2]
        return f"{self.implementation}-{major}{minor}"

    def interpreter(self) -> Interpreter:
        return Interpreter(
            implementation=self.implementation,
            version=self.version,
            abi=self.abi,
            platform=self.platform,
            path=self.source,
            digest=self.digest,
        )


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


class GcReport(Record):
    """What ``envfs gc --json`` prints."""

    dry_run: bool
    swept: list[str]  # snapshot ids moved to trash/ (or that would be)
    kept: dict[str, str]  # snapshot id -> why it is a root
    freed_bytes: int  # about: bytes whose last links were in the swept snapshots
    dead_builds: list[str] = []  # staging dirs crashed builds left (removed, or would be)
    stale_leases: list[str] = []  # build leases whose holder is gone (broken, or would be)
    trash_deleted: int = 0
    objects_deleted: int = 0
    links_deleted: int = 0


class ServedEnv(Record):
    path: str  # below the mountpoint: wf/node, wf/node@rev or .snapshots/<id>
    snapshot_id: str
    kernel: bool = False  # a read-only bind mount serves it (envfs.fs.kernel), not FUSE


class RunningBuild(Record):
    snapshot_id: str
    since: float


class FailedBuild(Record):
    snapshot_id: str
    errno: int
    reason: str
    at: float


class BuildStats(Record):
    running: list[RunningBuild] = []
    failed: list[FailedBuild] = []
    completed: int = 0


class DaemonStatus(Record):
    """``$XDG_RUNTIME_DIR/envfs/mounts/<hash>.json``, written by a daemon (`envfs.fs.mount`)."""

    mountpoint: str
    pid: int
    pid_start: int = 0  # the pid's start time (clock ticks since boot): a reused pid differs
    store: str | None = None  # the store it serves (absolute path)
    started: str
    envs: list[ServedEnv] = []
    builds: BuildStats = BuildStats()
    cache: dict[str, int] = {}
    refresh: dict[str, float | str | None] = {}
    alive: bool | None = None  # filled in by `envfs status`, not by the daemon


class DoctorFinding(Record):
    name: str
    level: Literal["ok", "warn", "error"]
    detail: str
    hint: str | None = None  # what to do about it


class DoctorReport(Record):
    """What ``envfs doctor --json`` prints."""

    ok: bool  # no finding is an error
    findings: list[DoctorFinding]
