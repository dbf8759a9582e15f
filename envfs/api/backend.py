"""The API's privileged side: every operation of the HTTP API on the `Service`, and who
may do it, decided here from the request's ``Authorization`` header as sent.

`envfs serve-api` as root keeps this side (the store, the index, the tokens, builds) in
the root process and runs the HTTP side (uvicorn, parsing, the routes of
`envfs.api.server`) in a child as the unprivileged API user (`envfs.api.privsep`): the
child names an operation of `OPERATIONS` with JSON arguments and gets JSON back
(`envfs.api.link`), so nothing a client sends is parsed as root but these typed
arguments, and a child that is taken over can do no more than the tokens it is shown
allow. Not as root, both sides run in one process over the same calls.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
from fastapi import HTTPException
from prometheus_client import generate_latest

from envfs import __version__
from envfs.api import stream
from envfs.api.audit import AuditRow, PgAudit
from envfs.api.metrics import Metrics
from envfs.api.models import (
    BatchAnswer,
    BatchFailure,
    BatchRequest,
    EnvPage,
    EnvRequest,
    EnvView,
    Health,
)
from envfs.api.tokens import NEEDS_TOKEN, READ_ONLY, Token, Tokens, admit
from envfs.core.errors import (
    BadInput,
    Busy,
    EnvfsError,
    EnvironmentProblem,
    InterpreterNotFound,
    NotFound,
)
from envfs.core.names import validate_name
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
STATUS: dict[type[EnvfsError], int] = {
    BadInput: 422,
    InterpreterNotFound: 422,
    NotFound: 404,
    Busy: 409,
    EnvironmentProblem: 503,
}

Offset = Annotated[int, pydantic.Field(ge=0)]
Limit = Annotated[int, pydantic.Field(ge=1, le=1000)]
Format = Literal["bundle", "oci-archive", "template"]


class Caller(pydantic.BaseModel):
    """Who asks, as the HTTP side saw the request."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    authorization: str = ""  # the Authorization header, as sent
    client: str = "unknown"  # the peer's address, for the audit


class Admitted(pydantic.BaseModel):
    """What a request's head earns it: the name of its token (None: anonymous) or a refusal."""

    token: str | None
    status: int = 200
    detail: str = ""


def _reaches(token: Token, workflow: str) -> None:
    """403 unless ``token`` may use ``workflow``."""
    if not token.allows(workflow):
        raise HTTPException(403, f"this token may not use workflow {workflow!r}")


class EnvAnswer(pydantic.BaseModel):
    code: int
    view: EnvView


class Builds:
    """Background builds: one per snapshot id in this server at a time (the store's lease
    makes it one across nodes)."""

    def __init__(self, service: Service, metrics: Metrics) -> None:
        self.service = service
        self.counters = metrics
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
            self.counters.builds.labels("failed").inc()
        except Exception:  # a bug: keep serving, and say so in the server's log
            self.counters.builds.labels("failed").inc()
            log.exception("build of %s crashed", snapshot_id[:12])
        else:
            self.counters.builds.labels("ok").inc()
        finally:
            self.counters.build_seconds.observe(time.monotonic() - t0)
            with self.lock:
                self.running.discard(snapshot_id)

    def stop(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


#: The operations the HTTP side may ask for; every one takes the `Caller` first.
OPERATIONS = frozenset({
    "admit", "health", "post_env", "post_batch", "list_envs", "get_env", "history",
    "rollback", "delete_env", "export", "sbom", "metrics",
})  # fmt: skip


class Backend:
    """The API's operations over ``service``, for ``tokens``; ``audit`` also gets each
    mutation; ``indexes`` (default, extra) are where every requirement list is locked."""

    def __init__(
        self,
        service: Service,
        tokens: Tokens,
        mount_path: Path | None = None,
        audit: PgAudit | None = None,
        indexes: tuple[str | None, tuple[str, ...]] = (None, ()),
    ) -> None:
        self.service = service
        self.audit = audit
        self.service.user = "api"
        self.tokens = tokens
        self.indexes = indexes
        self.mount_path = mount_path
        self.counters = Metrics()
        self.builds = Builds(service, self.counters)
        self.mutations = threading.Lock()  # one resolve at a time: 20 POSTs, one lock
        self._hidden = {
            str(service.store.root): "<store>",
            str(service.settings.index): "<index>",
        }
        longest_first = sorted(self._hidden, key=len, reverse=True)
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

    def stop(self) -> None:
        """Stop following and wait for the builds running (in-flight builds finish)."""
        self._stop.set()
        self._follower.join(5)
        self.builds.stop()
        if self.audit is not None:
            self.audit.close()

    # -- who calls --------------------------------------------------------------------

    def _token(self, caller: Caller) -> Token | None:
        scheme, _, given = caller.authorization.partition(" ")
        return self.tokens.identify(given.strip()) if scheme.lower() == "bearer" else None

    def _reader(self, caller: Caller, token_needed: bool = False) -> Token | None:
        """The caller's token, if it may read at all (401 otherwise; None: anonymous reads
        are open). Which workflows it reaches is `_reaches`'s to say."""
        token = self._token(caller)
        if token is None and (token_needed or not self.tokens.open_reads):
            raise HTTPException(401, NEEDS_TOKEN, headers={"WWW-Authenticate": "Bearer"})
        return token

    def _writer(self, caller: Caller, workflow: str | None) -> Token:
        """The caller's token, if it may change ``workflow`` (401/403 otherwise)."""
        token = self._reader(caller, token_needed=True)
        assert token is not None
        if not token.writes:
            raise HTTPException(403, READ_ONLY)
        if workflow is not None:
            _reaches(token, workflow)
        return token

    def _acting(self, token: Token) -> None:
        """Name the caller's token in what the next mutation writes (under `mutations`)."""
        self.service.user = f"api:{token.name}"

    def _audited(
        self, caller: Caller, token: Token, action: str, wf: str, node: str, status: int,
        **fields: Any,
    ) -> None:  # fmt: skip
        """A mutation done: into PostgreSQL too, with --audit-dsn (the store's log has it)."""
        if self.audit is None:
            return
        row = {"host": self.service.host, "actor": f"api:{token.name}@{caller.client}"}
        self.audit.record(
            AuditRow.model_validate(
                dict(row, action=action, workflow=wf, node=node, status=status, **fields)
            )
        )

    def public(self, text: str) -> str:
        """``text`` without this server's paths (the store, the index, a request's temporary
        directory): a client learns what went wrong, not how the server is laid out."""
        text = self._private.sub(lambda m: self._hidden[m.group(0)], text)
        return self._request_dirs.sub("<request>", text)

    def mount(self) -> Path:
        """Where engines find the envs: --mount-path, else this store's live mount, else /envs."""
        if self.mount_path is not None:
            return self.mount_path
        from envfs.fs.mounted import live_mount_of

        return live_mount_of(self.service.store.root) or Path("/envs")

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

    def _access(
        self, caller: Caller, wf: str, node: str, write: bool = False, token_needed: bool = False
    ) -> tuple[str, str, Token | None]:
        """The names checked, then whether the caller may read (or ``write``) them, in the
        order a client learns of it: no token (401), a bad name (422), another workflow
        (403), no store (404)."""
        token = self._writer(caller, None) if write else self._reader(caller, token_needed)
        wf, node = validate_name(wf, "workflow"), validate_name(node, "node")
        if token is not None:
            _reaches(token, wf)
        self.service.require_store()
        return wf, node, token

    # -- the operations -----------------------------------------------------------------

    def admit(self, caller: Caller, method: str, path: str) -> Admitted:
        """Before a body is read: whether the request may call ``path`` at all."""
        got = admit(self.tokens, method, path, caller.authorization)
        name = got.token.name if got.token is not None else None
        return Admitted(token=name, status=got.status, detail=got.detail)

    def health(self, caller: Caller) -> Health:
        return Health(
            ok=True,
            version=__version__,
            store_exists=self.service.store.root.exists(),
            audit_queued=self.audit.queued() if self.audit is not None else None,
        )

    def post_env(self, caller: Caller, req: EnvRequest) -> EnvAnswer:
        """Bind as `envfs bind` does (the request's files in a temporary directory)."""
        token = self._writer(caller, req.workflow_id)
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
                self._acting(token)
                rev, reused = self.service.bind_inputs(
                    req.workflow_id, req.node_id, inputs, req.reason, build=False
                )
        if reused:
            self.counters.reuse.inc()
        elif req.build == "now":
            self.builds.start(rev.snapshot_id)
        view = self.view(self.service.show(req.workflow_id, req.node_id))
        code = 200 if reused else 202
        self._audited(caller, token, "post_env", req.workflow_id, req.node_id, code,
                      revision=view.revision, snapshot_id=view.snapshot_id,
                      detail={"state": view.state, "build": req.build})  # fmt: skip
        return EnvAnswer(code=code, view=view)

    def post_batch(self, caller: Caller, body: BatchRequest) -> BatchAnswer:
        """Bind many nodes to snapshots the store has, each all or nothing."""
        token = self._writer(caller, None)
        for b in body.bindings:  # all or nothing: one workflow out of reach binds none
            _reaches(token, b.workflow_id)
        self.service.require_store()
        entries = [
            (i, f"{b.workflow_id}/{b.node_id}", b.snapshot_id) for i, b in enumerate(body.bindings)
        ]
        with self.mutations:
            self._acting(token)
            report = self.service.bind_entries(entries, body.reason)
        for rev in report.revisions:
            self._audited(caller, token, "post_batch", rev.workflow, rev.node, 200,
                          revision=rev.revision, snapshot_id=rev.snapshot_id)  # fmt: skip
        return BatchAnswer(
            bound=report.bound,
            unchanged=report.unchanged,
            failed=[BatchFailure(index=i, error=self.public(why)) for i, why in report.failed],
        )

    def list_envs(
        self, caller: Caller, workflow: str | None, offset: Offset, limit: Limit
    ) -> EnvPage:
        token = self._reader(caller)
        if workflow is not None:
            workflow = validate_name(workflow, "workflow")
            if token is not None:
                _reaches(token, workflow)
        if not self.service.store.exists():  # nothing bound yet
            return EnvPage(items=[], total=0, offset=offset, limit=limit)
        views = self.service.binding_views(workflow)
        if token is not None:  # only what it may see, counted as such
            views = [v for v in views if token.allows(v.workflow)]
        page = [self.view(self.service.describe(v)) for v in views[offset : offset + limit]]
        return EnvPage(items=page, total=len(views), offset=offset, limit=limit)

    def get_env(self, caller: Caller, wf: str, node: str) -> EnvView:
        wf, node, _token = self._access(caller, wf, node)
        return self.view(self.service.show(wf, node))

    def history(self, caller: Caller, wf: str, node: str) -> list[Revision]:
        wf, node, _token = self._access(caller, wf, node)
        return self.service.revisions(wf, node)

    def rollback(self, caller: Caller, wf: str, node: str, to: int | None) -> EnvView:
        wf, node, token = self._access(caller, wf, node, write=True)
        assert token is not None
        with self.mutations:
            self._acting(token)
            rev = self.service.rollback(wf, node, to)
        self._audited(caller, token, "rollback", wf, node, 200, revision=rev.revision,
                      snapshot_id=rev.snapshot_id, detail={"to": rev.rollback_to})  # fmt: skip
        return self.view(self.service.show(wf, node))

    def delete_env(self, caller: Caller, wf: str, node: str) -> dict[str, int]:
        wf, node, token = self._access(caller, wf, node, write=True)
        assert token is not None
        with self.mutations:
            self._acting(token)
            removed = self.service.remove(wf, node)
        self._audited(caller, token, "delete", wf, node, 200, detail={"revisions_removed": removed})
        return {"revisions_removed": removed}

    def export(self, caller: Caller, wf: str, node: str, format: Format) -> tuple[int, int]:
        """The env as a bundle, an OCI image archive or its template: the read ends of
        the pipes (`envfs.api.stream`) a thread of this side writes it into."""
        wf, node, _token = self._access(caller, wf, node, token_needed=True)  # every byte
        self.service.show(wf, node)  # a missing binding is a 404 before anything streams
        target = f"{wf}/{node}"
        svc = self.service
        writers = {
            "bundle": lambda out: svc.export_bundle(target, out),
            "oci-archive": lambda out: svc.export_oci_archive(target, out),
            "template": lambda out: svc.template_tar(target, out),
        }
        ours, theirs = stream.pipes()
        threading.Thread(
            target=stream.produce, args=(writers[format], *theirs), name="export", daemon=True
        ).start()
        return ours

    def sbom(self, caller: Caller, wf: str, node: str) -> str:
        """The env's CycloneDX 1.6 SBOM (``envfs sbom``)."""
        wf, node, _token = self._access(caller, wf, node)
        return self.service.sbom(f"{wf}/{node}")

    def metrics(self, caller: Caller) -> str:
        """This side's Prometheus text: builds, reuse, the store's gauges."""
        svc = self.service
        if svc.store.exists():  # an empty or uninitialised directory: nothing yet
            self.counters.snapshots.set(len(svc.store.snapshot_ids()))
            self.counters.bindings.set(len(svc.index.all_bindings()))
            if self.audit is not None:
                self.counters.audit_queued.set(self.audit.queued())
            if time.monotonic() - self._bytes_at > STORE_BYTES_EVERY or not self._bytes_at:
                self._bytes_at = time.monotonic()
                self.counters.store_bytes.set(svc.disk_usage().real_bytes)
        return generate_latest(self.counters.registry).decode()
