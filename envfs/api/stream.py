"""An export's bytes between the API's two sides (this module owns the format): two pipes,
one of the bytes as the writer writes them, one of a status byte once it is done, ok or
failed part way. The privileged side writes them (`produce`); the HTTP side streams the
bytes to the client (`chunks`) and cuts the answer short on a failure, so the client sees
a truncated, refused bundle rather than a short one that looks whole."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from typing import IO, Any

log = logging.getLogger(__name__)

OK, FAILED = b"\x00", b"\x01"
#: Bytes read from the pipe at a time.
CHUNK = 1 << 20


def pipes() -> tuple[tuple[int, int], tuple[int, int]]:
    """(data read end, status read end), (data write end, status write end)."""
    data_r, data_w = os.pipe()
    status_r, status_w = os.pipe()
    return (data_r, status_r), (data_w, status_w)


def produce(write: Callable[[IO[bytes]], Any], data_fd: int, status_fd: int) -> None:
    """Run ``write(out)`` with ``out`` the pipe ``data_fd``, then say how it went on
    ``status_fd``; both closed after. Run in a thread of its own."""
    status = FAILED
    try:
        with os.fdopen(data_fd, "wb") as out:
            write(out)
        status = OK
    except BrokenPipeError:
        pass  # the client went away
    except BaseException as exc:
        log.error("export failed while streaming: %s: %s", type(exc).__name__, exc)
    finally:
        with contextlib.suppress(OSError):
            os.write(status_fd, status)
        os.close(status_fd)


def chunks(data_fd: int, status_fd: int) -> Iterator[bytes]:
    """What ``produce`` wrote, chunk by chunk (both descriptors closed after);
    `RuntimeError` after the last if the writer failed part way."""
    with os.fdopen(data_fd, "rb") as src, os.fdopen(status_fd, "rb") as status:
        while chunk := src.read(CHUNK):
            yield chunk
        if status.read(1) != OK:
            raise RuntimeError("export failed while streaming")
