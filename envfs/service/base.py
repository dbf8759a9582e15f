"""What every part of `Service` stands on: the settings, the store, the index (opened on
first use, caught up with the feed), progress."""

from __future__ import annotations

import threading
from collections.abc import Callable

from envfs.build import spec
from envfs.core.config import Settings
from envfs.core.errors import NotFound
from envfs.node.index import Index, open_index
from envfs.store.layout import Store

Progress = Callable[[str], None]


class ServiceBase:
    """The store and the index of one node's settings."""

    def __init__(self, settings: Settings, progress: Progress | None = None) -> None:
        self.settings = settings
        self.host = settings.host
        self.store = Store(settings.store)
        self.progress = progress
        self._index: Index | None = None
        self._index_lock = threading.Lock()
        self._indexes = spec.Indexes()
        self.user: str | None = None  # who revisions name (default: this process's user)
        self._store_checked = False

    def _say(self, message: str) -> None:
        if self.progress is not None:
            self.progress(message)

    def require_store(self) -> None:
        """Only `build`, `bind` and `python add` create a store; everything else needs one.
        Checked once per process (the API asks on every request: on a NAS, the layout
        check is dozens of round trips)."""
        if self._store_checked:
            return
        if not self.store.exists():
            raise NotFound(
                f"no envfs store at {self.store.root}; pass the right --store (ENVFS_STORE), "
                "or create it with `envfs build`, `envfs bind` or `envfs python add`"
            )
        self.store.ensure()  # a store of an older version may lack newer directories
        self._store_checked = True

    @property
    def index(self) -> Index:
        with self._index_lock:  # threads of one process (the API) share one LMDB handle
            if self._index is None:
                self.require_store()
                index = open_index(self.settings.index, self.store)
                # what other processes and nodes logged since this node's index last looked
                # (a daemon or the API also follow it; see Index.follow_changes)
                index.follow_changes()
                self._index = index
            return self._index
