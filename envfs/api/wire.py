"""What the API server is on the wire: uvicorn, its h11 protocol with a deadline for each
request head, and the bound on bodies."""

from __future__ import annotations

import os
import socket
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse

from envfs.core.errors import EnvironmentProblem

#: Largest request body accepted (a big uv.lock is a few hundred KiB).
MAX_BODY = 4 * 1024 * 1024


#: Seconds a client has to send a request's head (line and headers) once connected or after
#: its last response; ``ENVFS_API_HEADER_TIMEOUT`` overrides it (tests).
HEADER_TIMEOUT = float(os.environ.get("ENVFS_API_HEADER_TIMEOUT") or 10.0)


ASGIApp = Callable[
    [MutableMapping[str, Any], Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]],
    Awaitable[None],
]


class BodyLimit:
    """Refuse a request body over ``limit`` bytes (413), declared or streamed."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY) -> None:
        self.app, self.limit = app, limit

    async def __call__(
        self,
        scope: MutableMapping[str, Any],
        receive: Callable[[], Awaitable[Any]],
        send: Callable[[Any], Awaitable[None]],
    ) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await _too_large(self.limit)(scope, receive, send)
            return
        seen = 0

        async def limited() -> Any:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise HTTPException(413, f"request body over {self.limit} bytes")
            return message

        await self.app(scope, limited, send)


def _too_large(limit: int) -> JSONResponse:
    return JSONResponse({"detail": f"request body over {limit} bytes"}, status_code=413)


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port``; `EnvironmentProblem` in one line if not."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as exc:
        raise EnvironmentProblem(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def serve(app: FastAPI, sock: socket.socket) -> None:
    """Run ``app`` with uvicorn on ``sock`` until SIGTERM/SIGINT, then return (a stop asked
    for is a clean exit, as for the daemon; uvicorn would re-raise the signal)."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            super().handle_exit(sig, frame)
            self._captured_signals.clear()

    config = uvicorn.Config(app, log_level="warning", access_log=False, http=_head_deadline())
    Server(config).run(sockets=[sock])


def _head_deadline() -> type[Any]:
    """uvicorn's h11 protocol with a deadline for each request's head: uvicorn itself waits
    for headers forever, so slow-header clients (slowloris) could hold every connection."""
    import asyncio

    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeadDeadline(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()  # the next request's head

        def connection_lost(self, exc: Exception | None) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            self._head_timer = self.loop.call_later(HEADER_TIMEOUT, self._too_slow)

        def _too_slow(self) -> None:
            waiting = self.cycle is None or self.cycle.response_complete  # no head yet
            if waiting and not self.transport.is_closing():
                self.transport.close()

    return HeadDeadline
