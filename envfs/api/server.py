"""The HTTP API (`envfs serve-api`): the CLI's operations for workflow platforms, over the
same `Service` (no logic of its own but HTTP: parsing, auth, status codes, metrics).

- ``POST /envs`` resolves and binds at once and never waits for a build: ``200`` when the
  snapshot exists (reused), ``202`` otherwise, the build then running in this server's
  background pool (``build: "now"``) or on first access through a mount (``"lazy"``).
  Clients poll ``GET /envs/{wf}/{node}`` for ``state``.
- Every mutation needs ``Authorization: Bearer <token>``; without it ``401`` and nothing
  is written. With scoped tokens (``--tokens``, `envfs.api.tokens`) every route but
  ``/healthz`` and ``/metrics`` needs one, a token reaches only its workflows (``403``
  otherwise, lists filtered) and a ``read`` token changes nothing. Names and
  requirements are validated as in the CLI (``422`` with the CLI's one-line message);
  only packages from http(s) indexes are accepted (no path, git or URL requirement or
  project source of any form, checked before uv runs); bodies are bounded (``413``).
- ``GET /metrics``: Prometheus text (builds, build seconds, reuse hits, requests by route
  and code, store bytes, snapshots, bindings).

This is the HTTP side only: every operation, and whether the caller may do it, is the
privileged side's (`envfs.api.backend`), called through a `Link`; as root, this side runs
in a process of the unprivileged API user (`envfs.api.privsep`).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pydantic
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import generate_latest
from starlette.datastructures import UploadFile

from envfs import __version__
from envfs.api import stream
from envfs.api.backend import Admitted, Caller, EnvAnswer, Format
from envfs.api.link import Link, validation_message
from envfs.api.metrics import RequestMetrics
from envfs.api.models import (
    _ERRORS,
    BatchAnswer,
    BatchRequest,
    EnvPage,
    EnvRequest,
    EnvView,
    Health,
    Node,
    RollbackRequest,
    Wf,
)
from envfs.api.tokens import NEEDS_TOKEN, OPEN_ROUTES, READS
from envfs.api.wire import BodyLimit
from envfs.store.formats import Revision

#: Media type and file name suffix of each export format.
EXPORTS = {
    "bundle": ("application/zstd", "envfs"),
    "oci-archive": ("application/x-tar", "oci.tar"),
    "template": ("application/x-tar", "template.tar"),
}


def caller(request: Request) -> Caller:
    """Who asks, as the privileged side is told: the header as sent, and the peer."""
    client = request.client.host if request.client is not None else "unknown"
    return Caller(authorization=request.headers.get("authorization", ""), client=client)


async def _read_json(request: Request) -> dict[str, Any]:
    """A JSON object body (422 for anything else, nested too deeply included)."""
    try:
        raw = json.loads(await request.body())
    except ValueError as exc:
        raise HTTPException(422, f"the body is not JSON: {exc}") from None
    except RecursionError:
        raise HTTPException(422, "the body is nested too deeply") from None
    if not isinstance(raw, dict):
        raise HTTPException(422, "the body must be a JSON object")
    return raw


async def _read_env_request(request: Request) -> EnvRequest:
    """The body of ``POST /envs``, as JSON or as form fields (``packages`` repeated,
    ``pyproject``/``uv_lock``/``requirements`` as text or file parts)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    raw: dict[str, Any]
    if kind == "application/json":
        raw = await _read_json(request)
    elif kind in ("multipart/form-data", "application/x-www-form-urlencoded"):
        form = await request.form()
        raw = {}
        for key in set(form.keys()):
            values = []
            for value in form.getlist(key):
                if isinstance(value, UploadFile):
                    data = await value.read()
                    try:
                        values.append(data.decode())
                    except UnicodeDecodeError:
                        raise HTTPException(422, f"{key}: not UTF-8 text") from None
                else:
                    values.append(value)
            raw[key] = values if key == "packages" else values[-1]
    else:
        raise HTTPException(415, "send application/json or form fields (multipart or urlencoded)")
    try:
        return EnvRequest.model_validate(raw)
    except pydantic.ValidationError as exc:
        raise HTTPException(422, validation_message(exc.errors())) from None


_BODY_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/EnvRequest"}},
            "multipart/form-data": {"schema": {"$ref": "#/components/schemas/EnvRequest"}},
        },
    }
}


_BATCH_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/BatchRequest"}},
        },
    }
}


def create_app(link: Link) -> FastAPI:
    """The HTTP API over the privileged side ``link`` reaches (closed when the app stops)."""
    counted = RequestMetrics()

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        await run_in_threadpool(link.close)

    app = FastAPI(
        title="envfs",
        version=__version__,
        summary="Python environments at a fixed path: bind, build, inspect, roll back.",
        lifespan=lifespan,
        responses=_ERRORS,
    )
    app.add_middleware(BodyLimit)
    bearer = HTTPBearer(
        auto_error=False, description="A token of serve-api's --token-file or --tokens"
    )

    def authorized(
        request: Request,
        credentials: HTTPAuthorizationCredentials | None = Depends(bearer),  # noqa: B008
    ) -> None:
        """In the schema: the route needs a token (`token_first` has checked a body's
        already; a read's operation checks its own)."""
        admitted = getattr(request.state, "token", None) is not None
        if credentials is None or not (admitted or request.method in READS):
            raise HTTPException(401, NEEDS_TOKEN, headers={"WWW-Authenticate": "Bearer"})

    @app.middleware("http")
    async def token_first(request: Request, call_next: Callable[[Request], Awaitable[Any]]) -> Any:
        """Who calls, and whether it may call this route at all, before a body is read or
        parsed (which workflows a token reaches is each operation's to check). A read of
        the envs needs no asking first: its operation checks the token itself."""
        path = request.url.path
        envs = path == "/envs" or path.startswith("/envs/")
        if request.method in READS and (envs or path in OPEN_ROUTES):
            return await call_next(request)
        try:
            admitted: Admitted = await run_in_threadpool(
                link.call, "admit", caller(request), method=request.method, path=path
            )
        except HTTPException as exc:
            return JSONResponse({"detail": exc.detail}, exc.status_code)
        request.state.token = admitted.token
        if admitted.status != 200:
            headers = {"WWW-Authenticate": "Bearer"} if admitted.status == 401 else None
            return JSONResponse({"detail": admitted.detail}, admitted.status, headers=headers)
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": validation_message(exc.errors())}, status_code=422)

    @app.middleware("http")
    async def count(request: Request, call_next: Callable[[Request], Awaitable[Any]]) -> Any:
        code = 500
        try:
            response = await call_next(request)
            code = response.status_code
            return response
        finally:
            route = request.scope.get("route")
            path = getattr(route, "path", "unmatched")
            counted.requests.labels(path, request.method, str(code)).inc()

    @app.get("/healthz")
    def healthz(request: Request) -> Health:
        health: Health = link.call("health", caller(request))
        return health

    @app.post(
        "/envs",
        dependencies=[Depends(authorized)],
        openapi_extra=_BODY_DOC,
        responses={200: {"model": EnvView}, 202: {"model": EnvView}},
        status_code=202,
    )
    async def post_env(request: Request) -> JSONResponse:
        """Bind WF/NODE to an env; 200 if its snapshot exists, 202 if it is to be built."""
        req = await _read_env_request(request)
        answer: EnvAnswer = await run_in_threadpool(link.call, "post_env", caller(request), req=req)
        return JSONResponse(answer.view.model_dump(), status_code=answer.code)

    @app.post(
        "/envs:batch",
        dependencies=[Depends(authorized)],
        openapi_extra=_BATCH_DOC,
        response_model=BatchAnswer,
    )
    async def post_batch(request: Request) -> BatchAnswer:
        """Bind many nodes to snapshots the store has, each all or nothing (as
        `envfs bind --batch`); failed ones are listed with their index."""
        try:
            body = BatchRequest.model_validate(await _read_json(request))
        except pydantic.ValidationError as exc:
            raise HTTPException(422, validation_message(exc.errors())) from None
        answer: BatchAnswer = await run_in_threadpool(
            link.call, "post_batch", caller(request), body=body
        )
        return answer

    @app.get("/envs")
    def list_envs(
        request: Request,
        workflow: str | None = None,
        offset: int = Query(0, ge=0),
        limit: int = Query(100, ge=1, le=1000),
    ) -> EnvPage:
        page: EnvPage = link.call(
            "list_envs", caller(request), workflow=workflow, offset=offset, limit=limit
        )
        return page

    @app.get("/envs/{wf}/{node}")
    def get_env(request: Request, wf: Wf, node: Node) -> EnvView:
        view: EnvView = link.call("get_env", caller(request), wf=wf, node=node)
        return view

    @app.get("/envs/{wf}/{node}/history")
    def history(request: Request, wf: Wf, node: Node) -> list[Revision]:
        revisions: list[Revision] = link.call("history", caller(request), wf=wf, node=node)
        return revisions

    @app.post("/envs/{wf}/{node}/rollback", dependencies=[Depends(authorized)])
    def rollback(
        request: Request, wf: Wf, node: Node, body: RollbackRequest | None = None
    ) -> EnvView:
        to = body.to if body is not None else None
        view: EnvView = link.call("rollback", caller(request), wf=wf, node=node, to=to)
        return view

    @app.delete("/envs/{wf}/{node}", dependencies=[Depends(authorized)])
    def delete_env(request: Request, wf: Wf, node: Node) -> dict[str, int]:
        removed: dict[str, int] = link.call("delete_env", caller(request), wf=wf, node=node)
        return removed

    @app.get(
        "/envs/{wf}/{node}/export",
        dependencies=[Depends(authorized)],
        response_class=StreamingResponse,
        responses={200: {"content": {t: {} for t, _ in EXPORTS.values()}}},
    )
    def export(
        request: Request,
        wf: Wf,
        node: Node,
        format: Format = Query("bundle"),  # noqa: B008
    ) -> StreamingResponse:
        """The env as a bundle (``envfs import``), an OCI image archive (``podman load``)
        or its template (a tar of pyproject.toml, uv.lock, .python-version), streamed."""
        fds: tuple[int, int] = link.call("export", caller(request), wf=wf, node=node, format=format)
        media, suffix = EXPORTS[format]
        return StreamingResponse(
            stream.chunks(*fds),
            media_type=media,
            headers={"Content-Disposition": f'attachment; filename="{wf}-{node}.{suffix}"'},
        )

    @app.get(
        "/envs/{wf}/{node}/sbom",
        response_class=Response,
        responses={200: {"content": {"application/vnd.cyclonedx+json": {}}}},
    )
    def sbom(request: Request, wf: Wf, node: Node) -> Response:
        """The env's CycloneDX 1.6 SBOM (``envfs sbom``)."""
        text: str = link.call("sbom", caller(request), wf=wf, node=node)
        return Response(text, media_type="application/vnd.cyclonedx+json")

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics(request: Request) -> PlainTextResponse:
        theirs: str = link.call("metrics", caller(request))
        ours = generate_latest(counted.registry).decode()
        return PlainTextResponse(theirs + ours, media_type="text/plain; version=0.0.4")

    plain_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        """The generated document, plus the schema of POST /envs's body (read by hand there,
        to take JSON and form fields alike)."""
        if app.openapi_schema is None:
            doc = plain_openapi()
            schemas = doc.setdefault("components", {}).setdefault("schemas", {})
            schemas["EnvRequest"] = EnvRequest.model_json_schema(
                ref_template="#/components/schemas/{model}"
            )
            batch = BatchRequest.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(batch.pop("$defs", {}))
            schemas["BatchRequest"] = batch
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
