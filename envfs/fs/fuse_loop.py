"""Cheaper request dispatch for pyfuse3's main loop on trio.

pyfuse3 reaches trio through one module global, ``pyfuse3.trio`` (the hook its own asyncio
mode uses to swap the event loop).  Before every request, a worker task enters a
``trio.Lock()`` and awaits ``trio.lowlevel.wait_readable(fd)`` on /dev/fuse.  On a warm
import that costs more than the handlers themselves: each request takes two scheduler
checkpoints for the lock and an epoll registration plus a scheduler pass for the wait, even
when the next request is already queued (a RELEASE right after its OPEN, a burst of
lookups).

`install` hands pyfuse3 a stand-in for the trio module that differs in two places:

- ``Lock``: an uncontended acquire returns without checkpoints (a contended one parks, and
  release hands the lock to the next waiter, as trio's does);
- ``lowlevel.wait_readable``: returns at once if ``poll(fd, 0)`` says a request is already
  waiting, except on every `YIELD_EVERY`-th call, which waits through trio as usual, so other
  tasks (worker-thread results, the status loop) always get their turn.

Everything else is trio itself.  `scripts/bench/imports` measures the effect; if a future
pyfuse3 stops reaching trio this way, `install` changes nothing and says so in the log.
"""

from __future__ import annotations

import logging
import select
import types
from typing import Any

import pyfuse3
import trio

log = logging.getLogger(__name__)

#: Every this many waits, go through the scheduler even if a request is already queued.
YIELD_EVERY = 16


class _Lock:
    """A mutex for trio tasks with no checkpoint on an uncontended acquire."""

    def __init__(self) -> None:
        self._held = False
        self._waiters = trio.lowlevel.ParkingLot()

    async def __aenter__(self) -> None:
        if self._held:
            await self._waiters.park()  # woken by __aexit__, which hands over the lock
        else:
            self._held = True

    async def __aexit__(self, *exc_info: object) -> None:
        if self._waiters:
            self._waiters.unpark()  # still held: now by the task just woken
        else:
            self._held = False


class _LowLevel:
    """``trio.lowlevel`` with a fast path in `wait_readable`."""

    def __init__(self) -> None:
        self._poll = select.poll()
        self._registered: set[int] = set()
        self._calls = 0

    async def wait_readable(self, fd: int) -> None:
        self._calls += 1
        if self._calls % YIELD_EVERY:
            if fd not in self._registered:
                self._poll.register(fd, select.POLLIN)
                self._registered.add(fd)
            ready = self._poll.poll(0)
            if ready and ready[0][1] == select.POLLIN:
                return
        await trio.lowlevel.wait_readable(fd)

    def __getattr__(self, name: str) -> Any:
        return getattr(trio.lowlevel, name)


class _Trio(types.SimpleNamespace):
    """What pyfuse3 sees as ``trio``."""

    def __getattr__(self, name: str) -> Any:
        return getattr(trio, name)


def install() -> bool:
    """Give pyfuse3 the tuned stand-in (before `pyfuse3.main`); False if it can't take it."""
    if getattr(pyfuse3, "trio", None) is not trio:
        log.info("pyfuse3 does not reach trio through pyfuse3.trio: default request loop")
        return False
    pyfuse3.trio = _Trio(Lock=_Lock, lowlevel=_LowLevel())  # type: ignore[attr-defined]
    return True


def uninstall() -> None:
    """Give pyfuse3 the real trio module back."""
    if isinstance(getattr(pyfuse3, "trio", None), _Trio):
        pyfuse3.trio = trio  # type: ignore[attr-defined]
