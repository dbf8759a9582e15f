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
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pydantic
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import generate_latest
from starlette.datastructures import UploadFile

from envfs import __version__
from envfs.api import exports
from envfs.api.audit import AuditRow, PgAudit
from envfs.api.metrics import Metrics
from envfs.api.models import (
    _ERRORS,
    BatchAnswer,
    BatchFailure,
    BatchRequest,
    EnvPage,
    EnvRequest,
    EnvView,
    Health,
    Node,
    RollbackRequest,
    Wf,
)
from envfs.api.tokens import NEEDS_TOKEN, Token, Tokens, admit
from envfs.api.wire import (
    BodyLimit,
)
from envfs.core.errors import (
    BadInput,
    Busy,
    EnvfsError,
    EnvironmentProblem,
    InterpreterNotFound,
    NotFound,
)
from envfs.core.names import validate_name
from envfs.service.binding import BatchReport
from envfs.service.envs import Inputs, Service
from envfs.service.reports import EnvInfo
from envfs.store.formats import Revision

log = logging.getLogger("envfs.api")

#: Builds the server runs at once (each is mostly uv and the compiler: I/O and CPU).
BUILD_WORKERS = 2
#: Seconds between reads of the store's logs for changes made elsewhere (CLI, other nodes).
FOLLOW_EVERY = 0.5
#: How often the store's byte count (a walk of every snapshot) is refreshed for /metrics.
STORE_BYTES_EVERY = 300.0
#: Request prefix of the temporary directories a POST's files are written to.
_REQUEST_DIR = "envfs-api-"
_STATUS: dict[type[EnvfsError], int] = {
    BadInput: 422,
    InterpreterNotFound: 422,
    NotFound: 404,
    Busy: 409,
    EnvironmentProblem: 503,
}


class Builds:
    """Background builds: one per snapshot id in this server at a time (the store's lease
    makes it one across nodes)."""

    def __init__(self, service: Service, metrics: Metrics) -> None:
        self.service = service
        self.metrics = metrics
        self.pool = ThreadPoolExecutor(BUILD_WORKERS, thread_name_prefix="envfs-build")
        self.running: set[str] = set()
        self.lock = threading.Lock()

    def start(self, snapshot_id: str) -> None:
        with self.lock:
            if snapshot_id in self.running:
                return
            self.running.add(snapshot_id)
        self.pool.submit(self._build, snapshot_id)

    def active(self, snapshot_id: str) -> bool:
        with self.lock:
            return snapshot_id in self.running

    def _build(self, snapshot_id: str) -> None:
        t0 = time.monotonic()
        try:
            self.service.ensure_built(snapshot_id)
        except EnvfsError:  # the failure record in the store says why; GET shows it
            self.metrics.builds.labels("failed").inc()
        except Exception:  # a bug: keep serving, and say so in the server's log
            self.metrics.builds.labels("failed").inc()
            log.exception("build of %s crashed", snapshot_id[:12])
        else:
            self.metrics.builds.labels("ok").inc()
        finally:
            self.metrics.build_seconds.observe(time.monotonic() - t0)
            with self.lock:
                self.running.discard(snapshot_id)

    def stop(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class Api:
    """What the routes share: the service, the background builds, the token, the mount."""

    def __init__(
        self, service: Service, tokens: Tokens, mount_path: Path | None, audit: PgAudit | None
    ) -> None:
        self.service = service
        self.audit = audit
        self.service.user = "api"
        self.tokens = tokens
        #: serve-api's --index-url / --extra-index-url: requirement lists are locked there
        self.indexes: tuple[str | None, tuple[str, ...]] = (None, ())
        self.mount_path = mount_path
        self.metrics = Metrics()
        self.builds = Builds(service, self.metrics)
        self.mutations = threading.Lock()  # one resolve at a time: 20 POSTs, one lock
        self._names = {
            str(service.store.root): "<store>",
            str(service.settings.index): "<index>",
        }
        longest_first = sorted(self._names, key=len, reverse=True)
        self._private = re.compile("|".join(re.escape(p) for p in longest_first))
        tmp = re.escape(os.path.join(tempfile.gettempdir(), _REQUEST_DIR))
        self._request_dirs = re.compile(tmp + r"[^/\s'\"]*")
        self._bytes_at = 0.0
        self._stop = threading.Event()
        self._follower = threading.Thread(target=self._follow, name="envfs-follow", daemon=True)
        self._follower.start()

    def _follow(self) -> None:
        """Keep the index up with what other processes and nodes bind, as a daemon does
        (the logs twice a second, the binding files every few seconds)."""
        while not self._stop.wait(FOLLOW_EVERY):
            try:
                if self.service.store.exists():
                    self.service.index.follow_changes()
            except EnvfsError as exc:  # the store unreachable for a while: keep serving
                log.warning("cannot follow the store's changes: %s", exc.message)

    def allow(self, request: Request, workflow: str) -> None:
        """403 unless the request's token may use ``workflow`` (anonymous: reads left open)."""
        token = _token(request)
        if token is not None and not token.allows(workflow):
            raise HTTPException(403, f"this token may not use workflow {workflow!r}")

    def acting(self, request: Request) -> None:
        """Name the caller's token in what the next mutation writes (under `mutations`)."""
        token = _token(request)
        self.service.user = "api" if token is None else f"api:{token.name}"

    def stop(self) -> None:
        self._stop.set()
        self._follower.join(5)
        self.builds.stop()

    def mount(self) -> Path:
        """Where engines find the envs: --mount-path, else this store's live mount, else /envs."""
        if self.mount_path is not None:
            return self.mount_path
        from envfs.fs.mounted import live_mount_of

        return live_mount_of(self.service.store.root) or Path("/envs")

    def public(self, text: str) -> str:
        """``text`` without this server's paths (the store, the index, a request's temporary
        directory): a client learns what went wrong, not how the server is laid out."""
        text = self._private.sub(lambda m: self._names[m.group(0)], text)
        return self._request_dirs.sub("<request>", text)

    def view(self, info: EnvInfo) -> EnvView:
        env = self.mount() / info.workflow / info.node
        state = info.state
        if state == "bound" and self.builds.active(info.snapshot_id):
            state = "building"
        return EnvView(
            workflow_id=info.workflow,
            node_id=info.node,
            revision=info.revision,
            snapshot_id=info.snapshot_id,
            state=state,
            reason=self.public(info.reason) if info.reason is not None else None,
            python_version=info.python,
            env_path=str(env),
            python_path=str(env / "bin/python"),
            pinned_path=str(env.with_name(f"{info.node}@{info.revision}")),
        )

    def audited(
        self, request: Request, action: str, wf: str, node: str, status: int, **fields: Any
    ) -> None:
        """A mutation done: into PostgreSQL too, with --audit-dsn (the store's log has it)."""
        if self.audit is None:
            return
        client = request.client.host if request.client is not None else "unknown"
        token = _token(request)
        actor = f"api:{token.name}@{client}" if token is not None else f"api@{client}"
        row = {"host": self.service.host, "actor": actor, "action": action}
        self.audit.record(
            AuditRow.model_validate(dict(row, workflow=wf, node=node, status=status, **fields))
        )

    def post_env(self, req: EnvRequest, request: Request) -> tuple[int, EnvView]:
        """Bind as `envfs bind` does (the request's files in a temporary directory)."""
        with tempfile.TemporaryDirectory(prefix=_REQUEST_DIR) as name:
            tmp = Path(name)
            requirements_file = project = None
            if req.requirements is not None:
                requirements_file = tmp / "requirements.txt"
                requirements_file.write_text(req.requirements)
            elif req.pyproject is not None and req.uv_lock is not None:
                (tmp / "pyproject.toml").write_text(req.pyproject)
                (tmp / "uv.lock").write_text(req.uv_lock)
                project = tmp
            default, extra = self.indexes if project is None else (None, ())
            inputs = Inputs(
                packages=tuple(req.packages),
                requirements_file=requirements_file,
                project=project,
                python=req.python,
                index_only=True,
                index_url=default,
                extra_index_urls=extra,
            )
            with self.mutations:
                self.acting(request)
                rev, reused = self.service.bind_inputs(
                    req.workflow_id, req.node_id, inputs, req.reason, build=False
                )
        if reused:
            self.metrics.reuse.inc()
        elif req.build == "now":
            self.builds.start(rev.snapshot_id)
        info = self.service.show(req.workflow_id, req.node_id)
        return (200 if reused else 202), self.view(info)

    def refresh_gauges(self) -> None:
        svc = self.service
        if not svc.store.exists():  # an empty or uninitialised directory: nothing yet
            return
        self.metrics.snapshots.set(len(svc.store.snapshot_ids()))
        self.metrics.bindings.set(len(svc.index.all_bindings()))
        if self.audit is not None:
            self.metrics.audit_queued.set(self.audit.queued())
        if time.monotonic() - self._bytes_at > STORE_BYTES_EVERY or not self._bytes_at:
            self._bytes_at = time.monotonic()
            self.metrics.store_bytes.set(svc.disk_usage().real_bytes)


def _error_response(exc: EnvfsError, api: Api) -> JSONResponse:
    code = next((c for t, c in _STATUS.items() if isinstance(exc, t)), 500)
    return JSONResponse({"detail": api.public(exc.message)}, status_code=code)


def _validation_message(errors: Sequence[Any]) -> str:
    """Validation errors (pydantic's, or FastAPI's of a request) as one sentence a person
    understands: each as ``field: what is wrong``."""
    parts = []
    for err in errors:
        where = ".".join(str(x) for x in err["loc"] if x not in ("body", "query", "path"))
        msg = str(err["msg"]).removeprefix("Value error, ")
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts)


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
        raise HTTPException(422, _validation_message(exc.errors())) from None


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


def create_app(
    service: Service,
    tokens: Tokens,
    mount_path: Path | None = None,
    audit: PgAudit | None = None,
    indexes: tuple[str | None, tuple[str, ...]] = (None, ()),
) -> FastAPI:
    """The API over ``service``, for ``tokens``; ``audit`` also gets each mutation;
    ``indexes`` (default, extra) are where every requirement list is locked from."""
    api = Api(service, tokens, mount_path, audit)
    api.indexes = indexes

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        await run_in_threadpool(api.stop)
        if audit is not None:
            await run_in_threadpool(audit.close)

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
        """In the schema: the route needs a token (`token_first` has checked it already)."""
        if credentials is None or _token(request) is None:
            raise HTTPException(401, NEEDS_TOKEN, headers={"WWW-Authenticate": "Bearer"})

    @app.middleware("http")
    async def token_first(request: Request, call_next: Callable[[Request], Awaitable[Any]]) -> Any:
        """Who calls, and whether it may call this route at all, before a body is read or
        parsed (the route's own check, documented in the schema, runs after FastAPI has
        parsed a body; which workflows a token reaches is each route's to check)."""
        admitted = admit(
            api.tokens, request.method, request.url.path, request.headers.get("authorization", "")
        )
        request.state.token = admitted.token
        if admitted.status != 200:
            headers = {"WWW-Authenticate": "Bearer"} if admitted.status == 401 else None
            return JSONResponse({"detail": admitted.detail}, admitted.status, headers=headers)
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _validation_message(exc.errors())}, status_code=422)

    @app.exception_handler(EnvfsError)
    async def envfs_error(_request: Request, exc: EnvfsError) -> JSONResponse:
        return _error_response(exc, api)

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
            api.metrics.requests.labels(path, request.method, str(code)).inc()

    @app.get("/healthz")
    def healthz() -> Health:
        return Health(
            ok=True,
            version=__version__,
            store_exists=service.store.root.exists(),
            audit_queued=audit.queued() if audit is not None else None,
        )

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
        api.allow(request, req.workflow_id)
        code, view = await run_in_threadpool(api.post_env, req, request)
        fields = {"revision": view.revision, "snapshot_id": view.snapshot_id}
        detail = {"state": view.state, "build": req.build}
        api.audited(
            request, "post_env", req.workflow_id, req.node_id, code, detail=detail, **fields
        )
        return JSONResponse(view.model_dump(), status_code=code)

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
            raise HTTPException(422, _validation_message(exc.errors())) from None
        for b in body.bindings:  # all or nothing: one workflow out of reach binds none
            api.allow(request, b.workflow_id)
        service.require_store()
        entries = [
            (i, f"{b.workflow_id}/{b.node_id}", b.snapshot_id) for i, b in enumerate(body.bindings)
        ]

        def bind() -> BatchReport:
            with api.mutations:
                api.acting(request)
                return service.bind_entries(entries, body.reason)

        report = await run_in_threadpool(bind)
        for rev in report.revisions:
            api.audited(request, "post_batch", rev.workflow, rev.node, 200,
                        revision=rev.revision, snapshot_id=rev.snapshot_id)  # fmt: skip
        return BatchAnswer(
            bound=report.bound,
            unchanged=report.unchanged,
            failed=[BatchFailure(index=i, error=api.public(why)) for i, why in report.failed],
        )

    @app.get("/envs")
    def list_envs(
        request: Request,
        workflow: str | None = None,
        offset: int = Query(0, ge=0),
        limit: int = Query(100, ge=1, le=1000),
    ) -> EnvPage:
        if workflow is not None:
            api.allow(request, validate_name(workflow, "workflow"))
        if not service.store.exists():  # nothing bound yet
            return EnvPage(items=[], total=0, offset=offset, limit=limit)
        views = service.binding_views(workflow)
        token = _token(request)
        if token is not None:  # only what it may see, counted as such
            views = [v for v in views if token.allows(v.workflow)]
        page = [api.view(service.describe(v)) for v in views[offset : offset + limit]]
        return EnvPage(items=page, total=len(views), offset=offset, limit=limit)

    def _names(wf: str, node: str, request: Request) -> tuple[str, str]:
        names = validate_name(wf, "workflow"), validate_name(node, "node")
        api.allow(request, names[0])
        return names

    @app.get("/envs/{wf}/{node}")
    def get_env(request: Request, wf: Wf, node: Node) -> EnvView:
        service.require_store()
        return api.view(service.show(*_names(wf, node, request)))

    @app.get("/envs/{wf}/{node}/history")
    def history(request: Request, wf: Wf, node: Node) -> list[Revision]:
        service.require_store()
        return service.revisions(*_names(wf, node, request))

    @app.post("/envs/{wf}/{node}/rollback", dependencies=[Depends(authorized)])
    def rollback(
        request: Request, wf: Wf, node: Node, body: RollbackRequest | None = None
    ) -> EnvView:
        service.require_store()
        wf, node = _names(wf, node, request)
        with api.mutations:
            api.acting(request)
            rev = service.rollback(wf, node, body.to if body is not None else None)
        api.audited(request, "rollback", wf, node, 200, revision=rev.revision,
                    snapshot_id=rev.snapshot_id, detail={"to": rev.rollback_to})  # fmt: skip
        return api.view(service.show(wf, node))

    @app.delete("/envs/{wf}/{node}", dependencies=[Depends(authorized)])
    def delete_env(request: Request, wf: Wf, node: Node) -> dict[str, int]:
        service.require_store()
        wf, node = _names(wf, node, request)
        with api.mutations:
            api.acting(request)
            removed = service.remove(wf, node)
        api.audited(request, "delete", wf, node, 200, detail={"revisions_removed": removed})
        return {"revisions_removed": removed}

    exports.add_routes(app, service, authorized, api.allow)

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics() -> PlainTextResponse:
        api.refresh_gauges()
        return PlainTextResponse(
            generate_latest(api.metrics.registry).decode(),
            media_type="text/plain; version=0.0.4",
        )

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


def _token(request: Request) -> Token | None:
    """The token `token_first` found for this request (None: anonymous)."""
    token: Token | None = getattr(request.state, "token", None)
    return token
