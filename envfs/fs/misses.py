"""Names the store does not know, and what asking the store for them may cost: a missing
binding is remembered for `NEGATIVE_TTL` (at most `MAX_NEGATIVE` names), and each user
(uid) has a budget of store lookups for unknown names (`STORE_LOOKUP_RATE` a second, bursts
of as many), so that a flood of missing names (a scanner, a typo in a loop) never turns into
as many NAS round trips, nor uses up the lookups of the node's other users."""

from __future__ import annotations

import threading
from collections.abc import Callable

#: How long an unknown ``<wf>/<node>`` stays unknown before the store is asked again.
NEGATIVE_TTL = 3.0
#: At most this many missing names are remembered, and looked up in the store per second by
#: each user (uid), so that one user's flood of unknown names never starves another's.
MAX_NEGATIVE = 4096
STORE_LOOKUP_RATE = 50.0
#: Users whose lookup budgets are remembered (the least recently asking is forgotten).
MAX_LOOKUP_USERS = 1024


class Misses:
    """Missing names (``(wf, node)``; ``(wf, "")`` for a workflow) and the lookup budgets."""

    def __init__(self, clock: Callable[[], float], lock: threading.Lock) -> None:
        self._clock = clock
        self._lock = lock  # the namespace's: its tables change under one lock
        self.negative: dict[tuple[str, str], float] = {}  # (wf, node) -> expiry
        self._tokens: dict[int, tuple[float, float]] = {}  # uid -> (tokens, at)

    def known_missing(self, wf: str, node: str) -> bool:
        """Whether ``wf/node`` was missing less than `NEGATIVE_TTL` ago."""
        expiry = self.negative.get((wf, node))
        return expiry is not None and expiry > self._clock()

    def forget(self, wf: str, node: str) -> None:
        """``wf/node`` may exist now (a binding changed): ask again. Under the lock."""
        self.negative.pop((wf, node), None)

    def take(self, uid: int) -> bool:
        """A token of ``uid``'s for one store lookup of an unknown name, if it has one."""
        with self._lock:
            now = self._clock()
            tokens, last = self._tokens.pop(uid, (STORE_LOOKUP_RATE, now))
            tokens = min(STORE_LOOKUP_RATE, tokens + (now - last) * STORE_LOOKUP_RATE)
            took = tokens >= 1
            self._tokens[uid] = (tokens - took, now)  # newest last
            if len(self._tokens) > MAX_LOOKUP_USERS:
                del self._tokens[next(iter(self._tokens))]
            return took

    def remember(self, wf: str, node: str) -> None:
        """Cache a missing binding for `NEGATIVE_TTL`, keeping at most `MAX_NEGATIVE` names."""
        with self._lock:
            now = self._clock()
            if len(self.negative) >= MAX_NEGATIVE:
                for key in [k for k, expiry in self.negative.items() if expiry <= now]:
                    del self.negative[key]
                while len(self.negative) >= MAX_NEGATIVE:
                    del self.negative[next(iter(self.negative))]  # the oldest
            self.negative[(wf, node)] = now + NEGATIVE_TTL
