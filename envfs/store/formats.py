"""The records of the store (pydantic), one model per file format on it: specs, revisions,
manifests, leases, failures, the change feed's events, captured interpreters; and what gc
reports. Their fields are the store format: change them only with ``LAYOUT_VERSION``."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field

from envfs.core.records import Record

#: 1: a venv whose bin/python names the builder's interpreter; 2: a self-contained prefix
#: (the captured interpreter plus the locked packages).
LAYOUT_VERSION = 2


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


class StoreConfig(Record):
    """``envfs.toml`` at the store's root: what the store is, and its defaults."""

    format: int
    uuid: str
    #: how builds treat packages that need a source build (``envfs build --build-policy``):
    #: ``sandboxed`` (built unprivileged) or ``wheels-only`` (refused)
    build_policy: Literal["sandboxed", "wheels-only"] = "sandboxed"


class BundleInfo(Record):
    """``envfs-bundle.json``, the head of a bundle (`envfs.store.bundle` owns the format)."""

    format: int = 1
    snapshot_id: str
    interpreter: str | None = None  # the digest of the captured interpreter it carries
    exported_from: str | None = None  # the binding it was exported as, ``wf/node@rev``


#: A byte range of a file: start, end (excluded).
Range = tuple[int, int]


class AccessTrace(Record):
    """``snapshots/<id>/.envfs/trace.json``: the files (relative paths) a first import of
    the env's direct requirements read, in the order it read them (`envfs.build.trace`)."""

    files: list[str]
    #: of the big traced files the import mapped and touched a part of (a shared library:
    #: not its debug sections, not the code it did not run), the byte ranges it touched
    ranges: dict[str, list[Range]] = {}


class PackMember(Record):
    """One file of a pack: where it is in the snapshot, and its content."""

    path: str
    sha256: str
    size: int


class Pack(Record):
    """A pack: its members' bytes back to back, in this order, in the file
    ``.envfs/packs/<sha256>.pack`` (the sha256 of those bytes; a pool object, so every
    snapshot with the same files shares one)."""

    sha256: str
    size: int
    members: list[PackMember]


class PackIndex(Record):
    """``snapshots/<id>/.envfs/packs.json``: the packs of the small files the access trace
    names (`envfs.build.packs`), which a fresh node reads in a few large reads."""

    packs: list[Pack]


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


#: The mode of a workflow's directory under an ACL that does not name one: the group reads.
DEFAULT_ACL_MODE = 0o750


class WorkflowAcl(Record):
    """``acls/<workflow>.json``: who may read a workflow's envs on every node (`envfs acl`).
    A node shows ``/envs/<workflow>`` as owned by root and ``group``, with ``mode`` (no
    bits for others), so the kernel refuses every path into it to anyone outside the group."""

    workflow: str
    group: str
    mode: int = DEFAULT_ACL_MODE
    user: str
    time: float


class IndexCheckpoint(Record):
    """``checkpoint/current.json``: the index checkpoint a fresh node starts from
    (`envfs.store.checkpoint` owns the files, `envfs.node.checkpoints` the tables in them)."""

    file: str = Field(pattern=r"^[0-9a-f]{64}\.mdb$")  # in checkpoint/, named by its sha256
    sha256: str
    size: int
    index_schema: str  # the index schema its tables are written in: a node of another ignores it
    store_uuid: str
    host: str  # the node that wrote it
    written: float
    bindings: int
    #: the feed it covers: the bytes of logs read (its cursor's offsets summed); the cursor
    #: itself is in the file, with the tables it matches
    log_bytes: int
    #: bindings a ``binding_intent`` line names that no later line settled yet: the node
    #: that starts from it re-reads their files for a while, as the writer did
    pending: list[tuple[str, str]] = []


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
    #: bound, rolled_back: the binding's lowest revision number once this one was appended
    #: (its revisions are first..revision, contiguous: gc needs no listing to know them)
    first: int | None = None


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
