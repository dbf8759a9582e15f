"""One error family: every envfs error carries an errno (for FUSE) and an exit code (for the CLI).

Exit codes are part of the CLI contract (docs/operations.md lists them):

    0  success
    1  unexpected internal error (a bug: please report it)
    2  usage error (click: unknown option, missing argument)
    3  bad input: a name, a requirement, a project directory, a file
    4  not found: no such binding, revision or snapshot
    5  build failed: uv could not lock or install the spec
    6  interpreter not found: the requested Python is not installed here
    7  busy: a lease or lock could not be had in time
    8  environment problem: uv, FUSE or the store is not usable
    9  capture failed: an interpreter cannot be made self-contained (e.g. a library it
       needs cannot be found on this node); nothing of it is left in the store
"""

from __future__ import annotations

import errno as _errno


class EnvfsError(Exception):
    """Base of every error envfs reports to a user; the message is one line saying what to do."""

    exit_code = 1
    errno = _errno.EIO

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadInput(EnvfsError):
    exit_code = 3
    errno = _errno.EINVAL


class NotFound(EnvfsError):
    exit_code = 4
    errno = _errno.ENOENT


class BuildFailed(EnvfsError):
    exit_code = 5
    errno = _errno.EIO


class InterpreterNotFound(EnvfsError):
    exit_code = 6
    errno = _errno.ENOENT


class Busy(EnvfsError):
    exit_code = 7
    errno = _errno.ETIMEDOUT


class EnvironmentProblem(EnvfsError):
    exit_code = 8
    errno = _errno.EIO


class CorruptRecord(EnvironmentProblem):
    """A record in the store (a binding revision, a spec, a manifest) that cannot be read.
    Commands over many names skip it (and say so once); ``envfs verify`` reports it."""


class CaptureFailed(EnvfsError):
    exit_code = 9
    errno = _errno.EIO
