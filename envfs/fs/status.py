"""The daemon's status file (``$XDG_RUNTIME_DIR/envfs/mounts/<hash>.json``): what it serves,
its builds, its caches; written by the daemon, read by ``envfs status`` and ``umount``."""

from __future__ import annotations

from envfs.core.records import Record


class ServedEnv(Record):
    path: str  # below the mountpoint: wf/node, wf/node@rev or .snapshots/<id>
    snapshot_id: str
    kernel: bool = False  # a read-only bind mount serves it (envfs.fs.kernel), not FUSE
    #: with kernel: an overlay of what a fresh node holds serves it, FUSE the rest, until
    #: the node holds it whole (envfs.node.early)
    early: bool = False


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
