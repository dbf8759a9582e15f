"""How the HTTP side calls the privileged side (`envfs.api.backend`); this module owns the
format. One JSON request per call, ``{"op", "caller", "args"}``, and one JSON answer,
``{"ok": result}`` or ``{"error": {"status", "detail", "headers"}}``; an export's answer
also carries a file descriptor (the read end of its `envfs.api.stream`). The arguments
and the result are checked against the backend method's annotations on each side, and
only `OPERATIONS` are callable.

Over socket pairs between the two processes of ``serve-api`` as root (`SocketLink`: one
call at a time per pair, frames of a 4-byte length, the descriptor as ``SCM_RIGHTS``), or
as a direct call in one process (`LocalLink`): the same JSON either way.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import queue
import socket
import struct
import typing
from collections.abc import Sequence
from typing import Any

import pydantic
import pydantic_core
from fastapi import HTTPException

from envfs.api.backend import OPERATIONS, STATUS, Backend, Caller
from envfs.core.errors import EnvfsError

log = logging.getLogger("envfs.api")

#: Operations whose result is file descriptors, passed alongside the answer.
FD_OPERATIONS = frozenset({"export"})
_HEAD = struct.Struct(">I")
#: The most descriptors one answer carries.
_MAX_FDS = 4
#: The largest frame either side accepts (a request body is at most 4 MiB; a page of 1,000
#: envs, or a long history, well under this).
MAX_FRAME = 64 << 20


class _Request(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    op: str
    caller: Caller
    args: dict[str, Any]


def validation_message(errors: Sequence[Any]) -> str:
    """Validation errors (pydantic's, or FastAPI's of a request) as one sentence a person
    understands: each as ``field: what is wrong``."""
    parts = []
    for err in errors:
        where = ".".join(str(x) for x in err["loc"] if x not in ("body", "query", "path"))
        msg = str(err["msg"]).removeprefix("Value error, ")
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts)


@functools.cache
def _signature(op: str) -> tuple[type[pydantic.BaseModel], pydantic.TypeAdapter[Any]]:
    """The model of ``op``'s arguments (after the caller) and the adapter of its result."""
    method = getattr(Backend, op)
    hints = typing.get_type_hints(method, include_extras=True)
    params = list(inspect.signature(method).parameters.values())[2:]  # self, caller
    fields: dict[str, Any] = {
        p.name: (hints[p.name], ... if p.default is p.empty else p.default) for p in params
    }
    config = pydantic.ConfigDict(extra="forbid")
    args = pydantic.create_model(f"{op}_args", __config__=config, **fields)
    return args, pydantic.TypeAdapter(hints["return"])


def dispatch(backend: Backend, data: bytes) -> tuple[bytes, list[int]]:
    """Answer one request (``data``) on ``backend``: the answer, and the descriptors it
    carries (the caller's to close)."""
    fds: list[int] = []
    op = "?"
    answer: dict[str, Any]
    try:
        request = _Request.model_validate_json(data)
        op = request.op
        if op not in OPERATIONS:
            raise HTTPException(400, f"no such operation: {op!r}")
        model, result = _signature(op)
        args = model.model_validate(request.args)
        value = getattr(backend, op)(request.caller, **dict(args))
        if op in FD_OPERATIONS:
            fds, answer = [int(fd) for fd in value], {"ok": None}
        else:
            answer = {"ok": result.dump_python(value, mode="json")}
    except HTTPException as exc:
        error = {"status": exc.status_code, "detail": exc.detail, "headers": exc.headers}
        answer = {"error": error}
    except pydantic.ValidationError as exc:
        answer = {"error": {"status": 422, "detail": validation_message(exc.errors())}}
    except EnvfsError as exc:
        code = next((c for t, c in STATUS.items() if isinstance(exc, t)), 500)
        answer = {"error": {"status": code, "detail": backend.public(exc.message)}}
    except Exception:  # a bug: say so in the server's log, not to the client
        log.exception("the API's operation %s failed", op)
        answer = {"error": {"status": 500, "detail": "internal error (see the server's log)"}}
    return json.dumps(answer).encode(), fds


class Link:
    """The privileged side as the HTTP side sees it."""

    def call(self, op: str, caller: Caller, **args: Any) -> Any:
        """``op`` with ``args`` for ``caller``: its result, typed as the backend's method
        says (the descriptors for `FD_OPERATIONS`); `HTTPException` for a refusal."""
        request = {"op": op, "caller": caller.model_dump(), "args": args}
        answer, fds = self._exchange(json.dumps(pydantic_core.to_jsonable_python(request)).encode())
        raw = json.loads(answer)
        if "error" in raw or op not in FD_OPERATIONS:
            for fd in fds:
                os.close(fd)
        if "error" in raw:
            err = raw["error"]
            raise HTTPException(err["status"], err["detail"], headers=err.get("headers"))
        if op in FD_OPERATIONS:
            return _signature(op)[1].validate_python(fds)
        return _signature(op)[1].validate_python(raw["ok"])

    def _exchange(self, data: bytes) -> tuple[bytes, list[int]]:
        raise NotImplementedError

    def close(self) -> None:
        """Nothing more will be asked."""


class LocalLink(Link):
    """The backend in this process (``serve-api`` not as root)."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    def _exchange(self, data: bytes) -> tuple[bytes, list[int]]:
        return dispatch(self.backend, data)

    def close(self) -> None:
        self.backend.stop()


class SocketLink(Link):
    """The backend in another process, one call at a time on each of ``socks``."""

    def __init__(self, socks: list[socket.socket]) -> None:
        self.free: queue.Queue[socket.socket] = queue.Queue()
        for sock in socks:
            self.free.put(sock)

    def _exchange(self, data: bytes) -> tuple[bytes, list[int]]:
        sock = self.free.get()
        try:
            send(sock, data)
            return receive(sock)
        except (OSError, EOFError):
            raise HTTPException(503, "the server's privileged side is not running") from None
        finally:
            self.free.put(sock)


def serve_connection(backend: Backend, sock: socket.socket) -> None:
    """Answer the requests that come on ``sock`` until the other side closes it."""
    with sock:
        while True:
            try:
                data, fds = receive(sock)
            except (OSError, EOFError, ValueError):
                return
            for fd in fds:  # the HTTP side has nothing to hand over
                os.close(fd)
            answer, fds = dispatch(backend, data)
            try:
                send(sock, answer, fds)
            except OSError:
                return
            finally:
                for fd in fds:
                    os.close(fd)


def send(sock: socket.socket, data: bytes, fds: Sequence[int] = ()) -> None:
    """One frame (and ``fds``, with its first bytes)."""
    head = _HEAD.pack(len(data))
    if not fds:
        sock.sendall(head + data)
        return
    sent = socket.send_fds(sock, [head], list(fds))
    sock.sendall(head[sent:] + data)


def receive(sock: socket.socket) -> tuple[bytes, list[int]]:
    """One frame, and the descriptors that came with it; `EOFError` when the other side
    has closed, `ValueError` for a frame over `MAX_FRAME`."""
    fds: list[int] = []
    head = _exactly(sock, _HEAD.size, fds)
    (size,) = _HEAD.unpack(head)
    if size > MAX_FRAME:
        for fd in fds:
            os.close(fd)
        raise ValueError(f"a frame of {size} bytes")
    return _exactly(sock, size, fds), fds


def _exactly(sock: socket.socket, size: int, fds: list[int]) -> bytes:
    buf = bytearray()
    while len(buf) < size:
        chunk, got, _flags, _addr = socket.recv_fds(sock, min(size - len(buf), 1 << 20), _MAX_FDS)
        fds.extend(got)
        if not chunk:
            for fd in fds:
                os.close(fd)
            raise EOFError
        buf += chunk
    return bytes(buf)
