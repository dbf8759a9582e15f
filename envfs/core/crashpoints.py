"""Crash points for the crash-matrix tests: ``ENVFS_CRASH_AT=PHASE`` SIGKILLs this process
when it reaches PHASE, so a test can kill a real build at an exact place with a real signal.

Phases, in build order: ``lock`` (uv lock running), ``venv`` (interpreter linked), ``sync``
(uv sync running), ``compile`` (the bytecode compiler running), ``dedup`` (generated files
pooled), ``manifest`` (manifest written, build log not), ``rename`` (snapshot published,
lease still held), ``bind`` (revision file written, not logged), ``log`` (half the
binding's audit line written).

``ENVFS_STOP_AT=PHASE`` stops it there instead (SIGSTOP: a frozen node, resumed by the
test with SIGCONT); ``leased`` (the build lease just taken, nothing done under it) is a
phase for that too.

``ENVFS_FILL_AT=PHASE:FILE`` instead fills the filesystem holding FILE (with FILE) at that
point and goes on, so the build meets a real ENOSPC in its next write.
Unset, a crash point costs a dictionary lookup or two.
"""

from __future__ import annotations

import os
import signal

VARIABLE = "ENVFS_CRASH_AT"
STOP_VARIABLE = "ENVFS_STOP_AT"
FILL_VARIABLE = "ENVFS_FILL_AT"
PHASES = ("lock", "venv", "sync", "compile", "dedup", "manifest", "rename", "bind", "log")


def armed(phase: str) -> bool:
    """True if this process is to die at ``phase`` (for crash points that act first)."""
    return os.environ.get(VARIABLE) == phase


def reached(phase: str) -> None:
    """Die here by SIGKILL if ``ENVFS_CRASH_AT`` names ``phase`` (stop if
    ``ENVFS_STOP_AT`` does)."""
    if armed(phase):
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get(STOP_VARIABLE) == phase:
        os.kill(os.getpid(), signal.SIGSTOP)
    fill = os.environ.get(FILL_VARIABLE, "")
    if fill.partition(":")[0] == phase:
        _fill(fill.partition(":")[2])


def _fill(path: str) -> None:
    """Append zeros to ``path`` until its filesystem has no block left."""
    with open(path, "ab", buffering=0) as f:
        for chunk in (1 << 20, 1 << 12, 1):
            try:
                while True:
                    f.write(b"\0" * chunk)
            except OSError:
                continue
