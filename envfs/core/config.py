"""Where things live: the store, the node-local index, and this node's host id."""

from __future__ import annotations

import hashlib
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

#: The user ``serve-api``'s HTTP side runs as when started as root (`envfs.api.privsep`):
#: made by scripts/setup, checked by `envfs doctor`.
API_USER = "envfs-api"


def _xdg(var: str, fallback: str) -> Path:
    value = os.environ.get(var)
    return Path(value) if value else Path.home() / fallback


def default_store() -> Path:
    """The embedded store: ``$XDG_DATA_HOME/envfs/store``."""
    return _xdg("XDG_DATA_HOME", ".local/share") / "envfs" / "store"


def default_index(store: Path) -> Path:
    """A node-local index per store: ``$XDG_CACHE_HOME/envfs/index/<hash of store path>``."""
    key = hashlib.sha256(str(store).encode()).hexdigest()[:16]
    return _xdg("XDG_CACHE_HOME", ".cache") / "envfs" / "index" / key


def runtime_dir() -> Path:
    """Where daemons leave their status files: ``$XDG_RUNTIME_DIR/envfs`` or a /tmp fallback."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    return Path(base) / "envfs" if base else Path(f"/tmp/envfs-{os.getuid()}")


def node_time() -> float:
    """This node's wall clock, as stamped into records (``ENVFS_CLOCK_OFFSET`` skews it, to
    test that nothing across nodes depends on it: staleness and ordering use the store's
    clock, file mtimes written by the store)."""
    return time.time() + float(os.environ.get("ENVFS_CLOCK_OFFSET") or 0)


def host_id() -> str:
    """This node's name in leases and audit lines (``ENVFS_HOST`` overrides the hostname)."""
    return os.environ.get("ENVFS_HOST") or socket.gethostname()


@dataclass(frozen=True, slots=True)
class Settings:
    store: Path
    index: Path
    host: str

    @classmethod
    def resolve(cls, store: Path | None = None, index: Path | None = None) -> Settings:
        store_path = (store or default_store()).expanduser().absolute()
        index_path = (index or default_index(store_path)).expanduser().absolute()
        return cls(store=store_path, index=index_path, host=host_id())
