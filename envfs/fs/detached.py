"""Running the daemon detached from the command that started it (`envfs mount` without
``--foreground``): fork, a new session, and the mount's outcome passed back on a pipe."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable

from envfs.core.errors import EnvfsError, EnvironmentProblem

log = logging.getLogger(__name__)


def run_detached(serve: Callable[[Callable[[], None]], None]) -> None:
    """Fork; the child serves in a new session, the parent returns when the mount is ready."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as pipe:
            answer = pipe.read().decode(errors="replace")
        if answer != "ok":
            os.waitpid(pid, 0)
            raise EnvironmentProblem(answer or "the envfs daemon exited before mounting")
        return
    os.close(read_fd)
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    code = 0

    def ready() -> None:
        os.write(write_fd, b"ok")
        os.close(write_fd)

    try:
        serve(ready)
    except EnvfsError as e:
        with contextlib.suppress(OSError):
            os.write(write_fd, e.message.encode())
        code = e.exit_code
    except Exception as e:
        log.exception("envfs daemon failed")
        with contextlib.suppress(OSError):
            os.write(write_fd, f"envfs daemon failed: {e}".encode())
        code = 1
    os._exit(code)
